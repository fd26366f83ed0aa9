//! Root-signed permission grants with an expiry.
//!
//! A relay can withhold an invalidation, but it cannot extend a grant: a
//! reader trusts a chunk's copy only until the root-signed expiry, so a
//! malicious relay can delay it but never make it use older data than that.
//!
//! A grant carries two proofs of the same fields: an ed25519 signature,
//! which a relay checks with the verifying key, and a BLAKE3 MAC under a
//! key derived from the data key, which a trusted node checks instead. Only
//! holders of the trusted key file can make either, so for a trusted node
//! the MAC proves as much as the signature, at a fraction of a
//! microsecond against some 40 µs: every read reply carries a grant, and
//! its verification was a tenth of a cold read's CPU (issue 5, B2).

use crate::domain;
use crate::error::DecodeError;
use crate::id::VolumeId;
use crate::record::{fixed, Reader, SIGNATURE_LEN};
use std::fmt;

/// Length of a grant's MAC (a BLAKE3 keyed hash).
pub const GRANT_MAC_LEN: usize = 32;

/// Length of [`SignedGrant::encode`].
pub const GRANT_LEN: usize = 8 + 8 + 1 + 8 + SIGNATURE_LEN + GRANT_MAC_LEN;

/// A permission on one chunk at one version, until an expiry, signed with the
/// volume's signing key and MACed with a key derived from its data key.
///
/// The signature covers `derive_key("canopy grant v1")` over volume id ‖
/// chunk ‖ version ‖ perm ‖ expiry (integers u64 little-endian); the MAC is
/// BLAKE3 keyed with `derive_key("canopy grant mac key v1", data key)` over
/// that same hash. Neither covers the other: a relay that spoils the MAC
/// only makes trusted nodes refuse the grant, which it could do by
/// dropping it.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedGrant {
    /// The chunk.
    pub chunk: u64,
    /// The chunk's version the grant covers.
    pub version: u64,
    /// The permission, as canopy-proto numbers it (NO, READ, WRITE).
    pub perm: u8,
    /// When the grant stops being valid (ms, in the root's clock).
    pub expires_ms: u64,
    /// The signature.
    pub signature: [u8; SIGNATURE_LEN],
    /// The MAC, for trusted nodes.
    pub mac: [u8; GRANT_MAC_LEN],
}

impl fmt::Debug for SignedGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedGrant")
            .field("chunk", &self.chunk)
            .field("version", &self.version)
            .field("perm", &self.perm)
            .field("expires_ms", &self.expires_ms)
            .field("signature", &hex::encode(self.signature))
            .field("mac", &hex::encode(self.mac))
            .finish()
    }
}

impl SignedGrant {
    /// The hash the root signs.
    pub(crate) fn signed_hash(&self, id: &VolumeId) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key(domain::GRANT);
        h.update(id.as_bytes());
        h.update(&self.chunk.to_le_bytes());
        h.update(&self.version.to_le_bytes());
        h.update(&[self.perm]);
        h.update(&self.expires_ms.to_le_bytes());
        *h.finalize().as_bytes()
    }

    /// The MAC a trusted node makes and checks, keyed with `key` (derived
    /// from the data key).
    pub(crate) fn mac_with(&self, id: &VolumeId, key: &[u8; 32]) -> blake3::Hash {
        blake3::keyed_hash(key, &self.signed_hash(id))
    }

    /// Whether the grant has expired at `now_ms` (valid while
    /// `now_ms < expires_ms`). Check the signature first.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_ms
    }

    /// chunk ‖ version ‖ perm ‖ expiry ‖ signature ‖ MAC.
    pub fn encode(&self) -> [u8; GRANT_LEN] {
        let mut out = [0u8; GRANT_LEN];
        let fields: [&[u8]; 6] = [
            &self.chunk.to_le_bytes(),
            &self.version.to_le_bytes(),
            &[self.perm],
            &self.expires_ms.to_le_bytes(),
            &self.signature,
            &self.mac,
        ];
        let mut rest = &mut out[..];
        for field in fields {
            let (head, tail) = rest.split_at_mut(field.len());
            head.copy_from_slice(field);
            rest = tail;
        }
        out
    }

    /// Decodes [`SignedGrant::encode`]'s bytes (lengths only; the signature
    /// is checked by [`crate::Verifier::verify_grant`], the MAC by
    /// [`crate::TrustedKeys::check_grant`]).
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let b: &[u8; GRANT_LEN] = &fixed(b, "grant")?;
        let mut r = Reader(b);
        Ok(SignedGrant {
            chunk: r.u64()?,
            version: r.u64()?,
            perm: r.u8()?,
            expires_ms: r.u64()?,
            signature: r.array()?,
            mac: r.array()?,
        })
    }
}
