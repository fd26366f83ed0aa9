//! Write cookies (seed 001, "Untrusted Intermediaries"): raw, baked, burnt.
//!
//! The root issues raw cookies sealed under the data key, so a relay that
//! carries them can neither read nor use them. A trusted writer opens one and
//! bakes it: signs it bound to the exact record it writes. The root spends
//! each cookie once (its `value` is the ledger key) and burns it: signs the
//! baked cookie, which is the receipt the writer checks. Only holders of the
//! signing key can bake or burn, so a relay can neither originate a write nor
//! fake its acknowledgement.

use crate::domain;
use crate::error::DecodeError;
use crate::id::VolumeId;
use crate::record::{fixed, Reader, NONCE_LEN, SEAL_OVERHEAD, SIGNATURE_LEN};
use std::fmt;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of a cookie's random value.
pub const COOKIE_VALUE_LEN: usize = 16;

/// Length of the sealed cookie's plaintext: value ‖ expiry.
pub(crate) const COOKIE_PLAINTEXT_LEN: usize = COOKIE_VALUE_LEN + 8;

/// Length of a [`SealedCookie`]: nonce ‖ encrypted value and expiry ‖ tag.
pub const SEALED_COOKIE_LEN: usize = NONCE_LEN + COOKIE_PLAINTEXT_LEN + SEAL_OVERHEAD;

/// Length of [`BakedCookie::encode`].
pub const BAKED_COOKIE_LEN: usize = COOKIE_VALUE_LEN + 8 + 8 + 8 + 32 + SIGNATURE_LEN;

/// Length of [`Receipt::encode`].
pub const RECEIPT_LEN: usize = SIGNATURE_LEN;

/// A cookie as the root issued it, after a trusted node opened it.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct RawCookie {
    /// The random value; also the key of the root's spent-cookie ledger.
    pub value: [u8; COOKIE_VALUE_LEN],
    /// When the cookie stops being valid (ms, in the root's clock).
    pub expires_ms: u64,
}

impl fmt::Debug for RawCookie {
    // The value is what makes the cookie usable: keep it out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawCookie")
            .field("value", &"<redacted>")
            .field("expires_ms", &self.expires_ms)
            .finish()
    }
}

/// A raw cookie sealed under the data key: what the root hands out in write
/// replies and `GET_COOKIES`.
///
/// Layout: nonce (24) ‖ XChaCha20-Poly1305(value ‖ expiry LE) ‖ tag (16),
/// with associated data volume id ‖ `"cookie"`.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedCookie(pub(crate) [u8; SEALED_COOKIE_LEN]);

impl fmt::Debug for SealedCookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealedCookie({})", hex::encode(self.0))
    }
}

impl SealedCookie {
    /// The cookie's bytes, as they travel.
    pub fn as_bytes(&self) -> &[u8; SEALED_COOKIE_LEN] {
        &self.0
    }

    /// A sealed cookie from its bytes; only the length is checked here, the
    /// rest when a trusted node opens it.
    pub fn from_bytes(b: &[u8]) -> Result<Self, DecodeError> {
        Ok(SealedCookie(fixed(b, "sealed cookie")?))
    }
}

/// The associated data of a sealed cookie. Its length (38) differs from a
/// record's (48), so a sealed cookie can never open as a record or back.
pub(crate) fn cookie_aad(id: &VolumeId) -> [u8; 38] {
    let mut aad = [0u8; 38];
    let (a, b) = aad.split_at_mut(32);
    a.copy_from_slice(id.as_bytes());
    b.copy_from_slice(b"cookie");
    aad
}

/// A cookie a trusted writer has signed, bound to one write.
///
/// The signature covers `derive_key("canopy baked cookie v1")` over volume
/// id ‖ value ‖ expiry ‖ chunk ‖ version ‖ record digest.
#[derive(Clone, PartialEq, Eq)]
pub struct BakedCookie {
    /// The raw cookie's value (the ledger key).
    pub value: [u8; COOKIE_VALUE_LEN],
    /// The raw cookie's expiry (ms).
    pub expires_ms: u64,
    /// The chunk written.
    pub chunk: u64,
    /// The version written.
    pub version: u64,
    /// The written record's [`crate::SealedRecord::digest`].
    pub digest: [u8; 32],
    /// The writer's signature.
    pub signature: [u8; SIGNATURE_LEN],
}

impl fmt::Debug for BakedCookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BakedCookie")
            .field("value", &hex::encode(self.value))
            .field("expires_ms", &self.expires_ms)
            .field("chunk", &self.chunk)
            .field("version", &self.version)
            .field("digest", &hex::encode(self.digest))
            .field("signature", &hex::encode(self.signature))
            .finish()
    }
}

impl BakedCookie {
    /// The hash the writer signs.
    pub(crate) fn signed_hash(&self, id: &VolumeId) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key(domain::BAKED_COOKIE);
        h.update(id.as_bytes());
        h.update(&self.value);
        h.update(&self.expires_ms.to_le_bytes());
        h.update(&self.chunk.to_le_bytes());
        h.update(&self.version.to_le_bytes());
        h.update(&self.digest);
        *h.finalize().as_bytes()
    }

    /// value ‖ expiry ‖ chunk ‖ version ‖ digest ‖ signature, integers u64
    /// little-endian.
    pub fn encode(&self) -> [u8; BAKED_COOKIE_LEN] {
        let mut out = [0u8; BAKED_COOKIE_LEN];
        let fields: [&[u8]; 6] = [
            &self.value,
            &self.expires_ms.to_le_bytes(),
            &self.chunk.to_le_bytes(),
            &self.version.to_le_bytes(),
            &self.digest,
            &self.signature,
        ];
        let mut rest = &mut out[..];
        for field in fields {
            let (head, tail) = rest.split_at_mut(field.len());
            head.copy_from_slice(field);
            rest = tail;
        }
        out
    }

    /// Decodes [`BakedCookie::encode`]'s bytes (lengths only; the signature
    /// is checked by [`crate::Verifier::verify_baked`]).
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let b: &[u8; BAKED_COOKIE_LEN] = &fixed(b, "baked cookie")?;
        let mut r = Reader(b);
        Ok(BakedCookie {
            value: r.array()?,
            expires_ms: r.u64()?,
            chunk: r.u64()?,
            version: r.u64()?,
            digest: r.array()?,
            signature: r.array()?,
        })
    }
}

/// A burnt cookie: the root's signature over a baked cookie, the receipt a
/// writer checks to know its write reached a trusted node.
///
/// The signature covers `derive_key("canopy burnt cookie v1")` over volume
/// id ‖ the baked cookie's encoding.
#[derive(Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The signature.
    pub signature: [u8; SIGNATURE_LEN],
}

impl fmt::Debug for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Receipt({})", hex::encode(self.signature))
    }
}

impl Receipt {
    /// The hash the root signs for `baked`.
    pub(crate) fn signed_hash(id: &VolumeId, baked: &BakedCookie) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key(domain::BURNT_COOKIE);
        h.update(id.as_bytes());
        h.update(&baked.encode());
        *h.finalize().as_bytes()
    }

    /// The receipt's bytes.
    pub fn encode(&self) -> [u8; RECEIPT_LEN] {
        self.signature
    }

    /// A receipt from its bytes (length only; the signature is checked by
    /// [`crate::Verifier::verify_receipt`]).
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        Ok(Receipt {
            signature: fixed(b, "receipt")?,
        })
    }
}
