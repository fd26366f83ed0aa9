//! The key file format, reading key files safely and writing new ones.
//!
//! Layout (format 1):
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `CANOPYKY` |
//! | 1 | format, 1 |
//! | 1 | kind: 1 trusted key file, 2 relay verify file |
//! | 1 + n | volume name length, volume name |
//! | 32 | ed25519 verifying key |
//! | 32 | trusted only: ed25519 signing key seed |
//! | 32 | trusted only: data key |
//! | 32 | BLAKE3 hash of everything before it |
//!
//! The trailing hash catches truncation and corruption, so a damaged file is
//! refused with a clear error instead of yielding wrong keys.

use crate::error::KeyError;
use crate::id::{check_volume_name, VolumeId};
use crate::trusted::TrustedKeys;
use crate::verifier::Verifier;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The first bytes of every key file.
pub const MAGIC: &[u8; 8] = b"CANOPYKY";
/// The format this build reads and writes.
pub const FORMAT: u8 = 1;
/// Length of magic, format, kind and name length.
const HEADER_LEN: usize = MAGIC.len() + 3;
const KEY_LEN: usize = 32;
const CHECKSUM_LEN: usize = 32;
/// The longest possible key file: a trusted file with a 255-byte name field.
/// Reads stop past it, so pointing `load` at a large file costs nothing.
const MAX_FILE_LEN: usize = HEADER_LEN + 255 + 3 * KEY_LEN + CHECKSUM_LEN;

/// The shortest possible key file: a relay verify file with a one-byte name.
const MIN_FILE_LEN: usize = HEADER_LEN + 1 + KEY_LEN + CHECKSUM_LEN;

/// Stands for the path in errors from [`TrustedKeys::from_bytes`] and
/// [`Verifier::from_bytes`], which have no file.
pub(crate) const IN_MEMORY: &str = "<key bytes>";

/// Which of the two key files a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFileKind {
    /// `<volume>.key`: data key, signing key and verifying key, for trusted
    /// nodes only.
    Trusted,
    /// `<volume>.verify`: the verifying key only, for relays.
    Relay,
}

impl KeyFileKind {
    fn byte(self) -> u8 {
        match self {
            KeyFileKind::Trusted => 1,
            KeyFileKind::Relay => 2,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(KeyFileKind::Trusted),
            2 => Some(KeyFileKind::Relay),
            _ => None,
        }
    }

    /// What a file of this kind holds, for people.
    pub fn holds(self) -> &'static str {
        match self {
            KeyFileKind::Trusted => "data key, signing key, verifying key",
            KeyFileKind::Relay => "verifying key only",
        }
    }

    fn file_len(self, name_len: usize) -> usize {
        let keys = match self {
            KeyFileKind::Trusted => 3,
            KeyFileKind::Relay => 1,
        };
        HEADER_LEN + name_len + keys * KEY_LEN + CHECKSUM_LEN
    }
}

impl fmt::Display for KeyFileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyFileKind::Trusted => "trusted key file",
            KeyFileKind::Relay => "relay verify file",
        })
    }
}

/// The secret half of a trusted key file, borrowed from the file's buffer.
pub(crate) struct Secrets<'a> {
    pub(crate) signing_seed: &'a [u8; KEY_LEN],
    pub(crate) data_key: &'a [u8; KEY_LEN],
}

/// A parsed key file, borrowing from its bytes.
pub(crate) struct Parsed<'a> {
    pub(crate) kind: KeyFileKind,
    pub(crate) volume: &'a str,
    pub(crate) verifying_key: &'a [u8; KEY_LEN],
    /// Present exactly when `kind` is `Trusted`.
    pub(crate) secrets: Option<Secrets<'a>>,
}

/// Parses a key file's bytes. Every error names `path`.
pub(crate) fn parse<'a>(bytes: &'a [u8], path: &Path) -> Result<Parsed<'a>, KeyError> {
    let path_buf = || path.to_path_buf();
    let magic_len = bytes.len().min(MAGIC.len());
    if bytes.get(..magic_len) != MAGIC.get(..magic_len) {
        return Err(KeyError::BadMagic { path: path_buf() });
    }
    let Some(&[.., format, kind_byte, name_len]) = bytes.get(..HEADER_LEN) else {
        return Err(KeyError::Truncated {
            path: path_buf(),
            len: bytes.len(),
            expected: MIN_FILE_LEN,
        });
    };
    // A later format may lay out (and checksum) the rest differently, so the
    // format is judged before anything after it.
    if format != FORMAT {
        return Err(KeyError::UnknownFormat {
            path: path_buf(),
            version: format,
        });
    }
    let kind = KeyFileKind::from_byte(kind_byte);
    let expected = kind.map(|k| k.file_len(usize::from(name_len)));

    let intact = bytes.len() >= CHECKSUM_LEN && {
        let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        blake3::hash(body) == *sum
    };
    if !intact {
        // A short file whose header is intact was cut off; anything else
        // that fails the checksum was changed.
        return Err(match expected {
            Some(expected) if bytes.len() < expected => KeyError::Truncated {
                path: path_buf(),
                len: bytes.len(),
                expected,
            },
            _ => KeyError::BadChecksum { path: path_buf() },
        });
    }
    // The checksum holds, so what follows catches files that were made
    // consistently but not by canopy-keys.
    let malformed = |reason| KeyError::Malformed {
        path: path_buf(),
        reason,
    };
    let (Some(kind), Some(expected)) = (kind, expected) else {
        return Err(malformed("unknown kind of key file"));
    };
    if bytes.len() != expected {
        return Err(malformed("its length does not match its kind"));
    }
    let rest = bytes.get(HEADER_LEN..).unwrap_or_default();
    let (name, rest) = rest
        .split_at_checked(usize::from(name_len))
        .ok_or(malformed("its length does not match its kind"))?;
    let volume = std::str::from_utf8(name).map_err(|_| malformed("bad volume name"))?;
    check_volume_name(volume).map_err(|_| malformed("bad volume name"))?;
    let key = |s: Option<&'a [u8]>| -> Result<&'a [u8; KEY_LEN], KeyError> {
        s.and_then(|s| s.try_into().ok())
            .ok_or(malformed("its length does not match its kind"))
    };
    let verifying_key = key(rest.get(..KEY_LEN))?;
    let secrets = match kind {
        KeyFileKind::Relay => None,
        KeyFileKind::Trusted => Some(Secrets {
            signing_seed: key(rest.get(KEY_LEN..2 * KEY_LEN))?,
            data_key: key(rest.get(2 * KEY_LEN..3 * KEY_LEN))?,
        }),
    };
    Ok(Parsed {
        kind,
        volume,
        verifying_key,
        secrets,
    })
}

/// Encodes a key file. Secret bytes only ever go into the returned buffer,
/// which is wiped when dropped; its capacity is reserved up front so growing
/// it never leaves an unwiped copy behind.
pub(crate) fn encode(
    volume: &str,
    verifying_key: &[u8; KEY_LEN],
    secrets: Option<Secrets<'_>>,
) -> Zeroizing<Vec<u8>> {
    let kind = match secrets {
        Some(_) => KeyFileKind::Trusted,
        None => KeyFileKind::Relay,
    };
    // Volume names are checked to be at most 64 bytes when keys are made.
    let name_len = u8::try_from(volume.len()).unwrap_or(u8::MAX);
    let name = volume
        .as_bytes()
        .get(..usize::from(name_len))
        .unwrap_or_default();
    let mut out = Zeroizing::new(Vec::with_capacity(kind.file_len(name.len())));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[FORMAT, kind.byte(), name_len]);
    out.extend_from_slice(name);
    out.extend_from_slice(verifying_key);
    if let Some(s) = secrets {
        out.extend_from_slice(s.signing_seed);
        out.extend_from_slice(s.data_key);
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// A key file read from disk, with the mode it had when read.
pub(crate) struct ReadFile {
    pub(crate) bytes: Zeroizing<Vec<u8>>,
    pub(crate) mode: u32,
}

/// Reads a key file into a buffer that is wiped on drop. The mode comes from
/// the open file, so it describes the file actually read.
pub(crate) fn read(path: &Path) -> Result<ReadFile, KeyError> {
    let io = |op| {
        let path = path.to_path_buf();
        move |source| KeyError::Io { path, op, source }
    };
    let file = File::open(path).map_err(io("open"))?;
    let mode = file.metadata().map_err(io("stat"))?.mode();
    let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_FILE_LEN + 1));
    // Never past the capacity, so the buffer never reallocates (which would
    // leave a copy of the secrets in freed memory).
    file.take((MAX_FILE_LEN + 1) as u64)
        .read_to_end(&mut bytes)
        .map_err(io("read"))?;
    Ok(ReadFile { bytes, mode })
}

/// Refuses a trusted key file that its group or others could read or write.
pub(crate) fn check_private(path: &Path, mode: u32) -> Result<(), KeyError> {
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_path_buf(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// Refuses a key file of another volume than `expected`.
pub(crate) fn check_volume(path: &Path, found: &str, expected: &str) -> Result<(), KeyError> {
    if found != expected {
        return Err(KeyError::WrongVolume {
            path: path.to_path_buf(),
            found: found.to_owned(),
            expected: expected.to_owned(),
        });
    }
    Ok(())
}

/// Writes a new volume's two key files into `dir`: `<volume>.key`, the
/// trusted key file (mode 0600), and `<volume>.verify`, the relay verify
/// file (mode 0644). Returns their paths, trusted first.
///
/// Creates `dir` (mode 0700) if it is missing. Refuses to overwrite either
/// file, and checks both before writing anything, so a volume's keys are
/// never replaced by accident (that would orphan its data). The trusted file
/// is created with mode 0600 in the same call that creates it, so it is never
/// readable by others, not even briefly. Files and directory are fsynced
/// before returning.
pub fn write_new(dir: &Path, keys: &TrustedKeys) -> Result<(PathBuf, PathBuf), KeyError> {
    let io = |path: &Path, op| {
        let path = path.to_path_buf();
        move |source| KeyError::Io { path, op, source }
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir, "create directory"))?;
    let key_path = dir.join(format!("{}.key", keys.volume()));
    let verify_path = dir.join(format!("{}.verify", keys.volume()));
    for p in [&key_path, &verify_path] {
        // symlink_metadata: a dangling symlink counts as existing too.
        if fs::symlink_metadata(p).is_ok() {
            return Err(KeyError::AlreadyExists(p.clone()));
        }
    }
    write_exclusive(&key_path, 0o600, &keys.to_bytes())?;
    if let Err(e) = write_exclusive(&verify_path, 0o644, &keys.verifier().to_bytes()) {
        // Lost a race with another writer: leave no half-made pair behind.
        let _ = fs::remove_file(&key_path);
        return Err(e);
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "sync directory"))?;
    Ok((key_path, verify_path))
}

/// Creates `path` (failing if it exists) with `mode` and writes `bytes`.
fn write_exclusive(path: &Path, mode: u32, bytes: &[u8]) -> Result<(), KeyError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::AlreadyExists(path.to_path_buf())
            } else {
                KeyError::Io {
                    path: path.to_path_buf(),
                    op: "create",
                    source,
                }
            }
        })?;
    let written = f.write_all(bytes).and_then(|()| f.sync_all());
    if let Err(source) = written {
        let _ = fs::remove_file(path);
        return Err(KeyError::Io {
            path: path.to_path_buf(),
            op: "write",
            source,
        });
    }
    Ok(())
}

/// What `canopy-keys inspect` shows about a key file: nothing secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFileInfo {
    /// Trusted key file or relay verify file.
    pub kind: KeyFileKind,
    /// The volume name.
    pub volume: String,
    /// The volume id.
    pub id: VolumeId,
    /// The ed25519 verifying key (public).
    pub verifying_key: [u8; 32],
}

/// Reads and checks a key file of either kind, as the node that uses it
/// would (a trusted key file must be private to its owner), and describes it.
pub fn inspect(path: &Path) -> Result<KeyFileInfo, KeyError> {
    let file = read(path)?;
    let parsed = parse(&file.bytes, path)?;
    if parsed.kind == KeyFileKind::Trusted {
        check_private(path, file.mode)?;
        // Check the secrets the way TrustedKeys::load does, so inspect
        // approves only files a trusted node would accept.
        TrustedKeys::from_parsed(&parsed, path)?;
    }
    let verifier = Verifier::from_parsed(&parsed, path)?;
    Ok(KeyFileInfo {
        kind: parsed.kind,
        volume: verifier.volume().to_owned(),
        id: verifier.id(),
        verifying_key: verifier.verifying_key_bytes(),
    })
}
