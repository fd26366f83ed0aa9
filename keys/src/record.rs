//! The sealed chunk record: a chunk's ciphertext with the nonce and the
//! signature that let a relay check it and a trusted node open it.

use crate::domain;
use crate::error::DecodeError;
use crate::id::VolumeId;
use bytes::{BufMut, Bytes, BytesMut};

/// Ciphertext length minus plaintext length: the Poly1305 tag.
pub const SEAL_OVERHEAD: usize = 16;

/// Length of an XChaCha20-Poly1305 nonce.
pub const NONCE_LEN: usize = 24;

/// Length of an ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Length of a record's verifier (nonce ‖ signature): what travels in the
/// protocol's `VERIFIER` parameter beside the ciphertext in `DATA`.
pub const VERIFIER_LEN: usize = NONCE_LEN + SIGNATURE_LEN;

/// The format byte of [`SealedRecord::encode`].
pub const RECORD_FORMAT: u8 = 1;

/// Length of [`SealedRecord::encode`]'s header: format, chunk, version,
/// nonce, signature, ciphertext length.
pub const RECORD_HEADER_LEN: usize = 1 + 8 + 8 + VERIFIER_LEN + 8;

/// One chunk at one version, encrypted and signed by the volume's keys.
///
/// `ciphertext` is the plaintext encrypted with XChaCha20-Poly1305 under the
/// data key with `nonce`, the 16-byte tag appended; its associated data is
/// volume id ‖ chunk ‖ version (little-endian), so a ciphertext cannot be
/// passed off as another chunk's or version's. `signature` is the signing
/// key's ed25519 signature over [`SealedRecord::digest`], which a relay can
/// check with the verifying key alone.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedRecord {
    /// The chunk number.
    pub chunk: u64,
    /// The chunk's version.
    pub version: u64,
    /// The AEAD nonce, random per seal.
    pub nonce: [u8; NONCE_LEN],
    /// ed25519 signature over the digest.
    pub signature: [u8; SIGNATURE_LEN],
    /// Ciphertext with the 16-byte tag appended.
    pub ciphertext: Bytes,
}

impl std::fmt::Debug for SealedRecord {
    // The ciphertext can be a megabyte: show its length, not its bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedRecord")
            .field("chunk", &self.chunk)
            .field("version", &self.version)
            .field("nonce", &hex::encode(self.nonce))
            .field("signature", &hex::encode(self.signature))
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}

impl SealedRecord {
    /// The BLAKE3 digest the signature covers: `derive_key("canopy sealed
    /// chunk v1")` over volume id ‖ chunk ‖ version ‖ nonce ‖ ciphertext
    /// length ‖ ciphertext (integers as u64 little-endian).
    ///
    /// The length prefix keeps the encoding unambiguous even though the
    /// ciphertext is last; the id makes it volume-specific.
    pub fn digest(&self, id: &VolumeId) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key(domain::SEALED_CHUNK);
        h.update(id.as_bytes());
        h.update(&self.chunk.to_le_bytes());
        h.update(&self.version.to_le_bytes());
        h.update(&self.nonce);
        h.update(&(self.ciphertext.len() as u64).to_le_bytes());
        h.update(&self.ciphertext);
        *h.finalize().as_bytes()
    }

    /// The plaintext's length (the ciphertext's less the tag).
    pub fn plaintext_len(&self) -> usize {
        self.ciphertext.len().saturating_sub(SEAL_OVERHEAD)
    }

    /// nonce ‖ signature, for the protocol's `VERIFIER` parameter.
    pub fn verifier_bytes(&self) -> [u8; VERIFIER_LEN] {
        let mut v = [0u8; VERIFIER_LEN];
        let (nonce, sig) = v.split_at_mut(NONCE_LEN);
        nonce.copy_from_slice(&self.nonce);
        sig.copy_from_slice(&self.signature);
        v
    }

    /// Rebuilds a record from a message's fields: `verifier` is the
    /// `VERIFIER` parameter (nonce ‖ signature), `ciphertext` the `DATA`.
    /// Checks lengths only; the signature is checked by
    /// [`crate::Verifier::verify`].
    pub fn from_parts(
        chunk: u64,
        version: u64,
        verifier: &[u8],
        ciphertext: Bytes,
    ) -> Result<Self, DecodeError> {
        if verifier.len() != VERIFIER_LEN {
            return Err(DecodeError::Length {
                what: "record verifier",
                len: verifier.len(),
                expected: VERIFIER_LEN,
            });
        }
        let (nonce, signature) = verifier.split_at(NONCE_LEN);
        Self::checked(chunk, version, nonce, signature, ciphertext)
    }

    fn checked(
        chunk: u64,
        version: u64,
        nonce: &[u8],
        signature: &[u8],
        ciphertext: Bytes,
    ) -> Result<Self, DecodeError> {
        if ciphertext.len() < SEAL_OVERHEAD {
            return Err(DecodeError::TooShort {
                what: "record ciphertext",
                len: ciphertext.len(),
                min: SEAL_OVERHEAD,
            });
        }
        Ok(SealedRecord {
            chunk,
            version,
            nonce: fixed(nonce, "record nonce")?,
            signature: fixed(signature, "record signature")?,
            ciphertext,
        })
    }

    /// One self-describing blob, for a relay's cache: format byte, chunk,
    /// version, nonce, signature, ciphertext length (u64 LE), ciphertext.
    ///
    /// The explicit length makes a truncated blob a decode error rather than
    /// a shorter ciphertext that only the signature check would catch.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(RECORD_HEADER_LEN + self.ciphertext.len());
        b.put_u8(RECORD_FORMAT);
        b.put_u64_le(self.chunk);
        b.put_u64_le(self.version);
        b.put_slice(&self.nonce);
        b.put_slice(&self.signature);
        b.put_u64_le(self.ciphertext.len() as u64);
        b.put_slice(&self.ciphertext);
        b.freeze()
    }

    /// Decodes [`SealedRecord::encode`]'s blob. The ciphertext is a slice of
    /// `b`, not a copy.
    pub fn decode(b: Bytes) -> Result<Self, DecodeError> {
        let Some((&format, _)) = b.split_first() else {
            return Err(DecodeError::TooShort {
                what: "record",
                len: 0,
                min: RECORD_HEADER_LEN + SEAL_OVERHEAD,
            });
        };
        if format != RECORD_FORMAT {
            return Err(DecodeError::Format(format));
        }
        let header = b.get(..RECORD_HEADER_LEN).ok_or(DecodeError::TooShort {
            what: "record",
            len: b.len(),
            min: RECORD_HEADER_LEN + SEAL_OVERHEAD,
        })?;
        let mut r = Reader(header);
        r.u8()?; // the format byte, checked above
        let chunk = r.u64()?;
        let version = r.u64()?;
        let nonce = r.take(NONCE_LEN)?;
        let signature = r.take(SIGNATURE_LEN)?;
        let ct_len = r.u64()?;
        let expected = usize::try_from(ct_len)
            .ok()
            .and_then(|n| n.checked_add(RECORD_HEADER_LEN))
            .unwrap_or(usize::MAX);
        if b.len() != expected {
            return Err(DecodeError::Length {
                what: "record",
                len: b.len(),
                expected,
            });
        }
        let ciphertext = b.slice(RECORD_HEADER_LEN..);
        Self::checked(chunk, version, nonce, signature, ciphertext)
    }
}

/// A fixed-size array from a slice, as a decode error when the length is off.
pub(crate) fn fixed<const N: usize>(s: &[u8], what: &'static str) -> Result<[u8; N], DecodeError> {
    s.try_into().map_err(|_| DecodeError::Length {
        what,
        len: s.len(),
        expected: N,
    })
}

/// Reads fields off the front of a slice, every read checked.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::TooShort {
                what: "field",
                len: self.0.len(),
                min: n,
            });
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        fixed(self.take(N)?, "field")
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        let [b] = self.array()?;
        Ok(b)
    }
}
