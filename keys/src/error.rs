//! The error types. Messages are written for the operator who reads them in a
//! log or a terminal: they say what is wrong and what to do about it.

use std::io;
use std::path::PathBuf;

/// Loading, writing or generating a key file failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The operating system refused an operation on a path.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// What was being done ("read", "create", ...).
        op: &'static str,
        /// The operating system's reason.
        #[source]
        source: io::Error,
    },
    /// `write_new` found a file where it was about to write one.
    #[error(
        "{} already exists; refusing to overwrite a key file (move it away or choose another output directory)",
        .0.display()
    )]
    AlreadyExists(PathBuf),
    /// A trusted key file can be read or written by its group or by others.
    #[error(
        "{} has mode {mode:04o}, so users other than its owner can read or change the volume's secret keys; run `chmod 600 {}` (and consider whether the keys have leaked)",
        path.display(),
        path.display()
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file ends before a complete key file of its kind would.
    #[error(
        "{} is truncated: {len} bytes where a complete key file is {expected}; restore it from the original or a backup",
        path.display()
    )]
    Truncated {
        /// The key file.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The length a complete file of its kind has (the shortest key
        /// file's when the file is too short to tell its kind).
        expected: usize,
    },
    /// The file does not start with the key file magic.
    #[error("{} is not a canopy key file (it does not start with CANOPYKY); check the path", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// The checksum at the end of the file does not match its contents.
    #[error(
        "{} is corrupted (its checksum does not match); restore it from the original or a backup",
        path.display()
    )]
    BadChecksum {
        /// The key file.
        path: PathBuf,
    },
    /// The file was written in a key file format this build does not know.
    #[error(
        "{} is in key file format {version}, but this canopy-keys reads only format {}; use a newer canopy-keys",
        path.display(),
        crate::keyfile::FORMAT
    )]
    UnknownFormat {
        /// The key file.
        path: PathBuf,
        /// The format byte found.
        version: u8,
    },
    /// The checksum matches but the contents make no sense: the file was not
    /// written by `canopy-keys`.
    #[error("{} is not a valid key file: {reason}; regenerate it with `canopy-keys new`", path.display())]
    Malformed {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A relay verify file was given where a trusted key file is needed.
    #[error(
        "{} holds only the verifying key; trusted nodes need the trusted key file (<volume>.key from `canopy-keys new`)",
        .0.display()
    )]
    NotTrusted(PathBuf),
    /// The key file belongs to another volume.
    #[error(
        "{} holds the keys of volume {found:?}, not {expected:?}; check the path and the volume name",
        path.display()
    )]
    WrongVolume {
        /// The key file.
        path: PathBuf,
        /// The volume named in the file.
        found: String,
        /// The volume the caller asked for.
        expected: String,
    },
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed: {0}")]
    Entropy(String),
    /// A volume name outside 1..=64 bytes of `[A-Za-z0-9._-]`.
    #[error(
        "invalid volume name {0:?}: use 1 to 64 characters from A-Z, a-z, 0-9, '.', '_' and '-'"
    )]
    BadVolumeName(String),
}

/// A byte string has the wrong length or format for what it claims to be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A fixed-length item of the wrong length.
    #[error("{what} is {len} bytes, expected {expected}")]
    Length {
        /// What was being decoded.
        what: &'static str,
        /// The length found.
        len: usize,
        /// The length required.
        expected: usize,
    },
    /// An item shorter than its minimum.
    #[error("{what} is {len} bytes, shorter than the minimum {min}")]
    TooShort {
        /// What was being decoded.
        what: &'static str,
        /// The length found.
        len: usize,
        /// The minimum length.
        min: usize,
    },
    /// An unknown format byte.
    #[error("unknown record format {0} (this build reads format {fmt})", fmt = crate::record::RECORD_FORMAT)]
    Format(u8),
}

/// A sealed chunk record, or a grant, failed its checks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The signature does not verify under the volume's verifying key.
    #[error(
        "signature does not verify: the data was corrupted or forged, or belongs to another volume, chunk or version"
    )]
    BadSignature,
    /// The AEAD tag does not verify: wrong data key or corrupted ciphertext.
    #[error(
        "record does not decrypt: corrupted ciphertext, or sealed with another volume's data key"
    )]
    BadCiphertext,
    /// A grant's MAC does not check under the data key: forged or
    /// corrupted, or made for another volume.
    #[error("grant MAC does not check: forged or corrupted, or made for another volume")]
    BadMac,
    /// The record is malformed.
    #[error("malformed record: {0}")]
    Decode(#[from] DecodeError),
}

/// A cookie, its binding to a write, or a receipt failed its checks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CookieError {
    /// The baked cookie's or the receipt's signature does not verify.
    #[error("cookie signature does not verify: forged or corrupted, or made for another volume")]
    BadSignature,
    /// The write's record does not verify (see [`SealError`]).
    #[error("the written record does not verify: {0}")]
    BadRecord(SealError),
    /// The baked cookie is bound to another write.
    #[error("the baked cookie is bound to another write: its {what} differs from the record's")]
    Mismatch {
        /// Which binding differs: "chunk", "version" or "digest".
        what: &'static str,
    },
    /// The cookie's lifetime is over.
    #[error(
        "the cookie expired at {expires_ms} ms, now is {now_ms} ms; ask the root for fresh cookies"
    )]
    Expired {
        /// When the cookie stopped being valid.
        expires_ms: u64,
        /// The time of the check.
        now_ms: u64,
    },
    /// A sealed cookie does not decrypt under the data key.
    #[error("sealed cookie does not decrypt: corrupted, or issued for another volume")]
    Undecryptable,
    /// The cookie's encoding is malformed.
    #[error("malformed cookie: {0}")]
    Decode(#[from] DecodeError),
}
