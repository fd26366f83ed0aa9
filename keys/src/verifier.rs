//! What a relay holds: the volume's verifying key, and every check that needs
//! nothing more.
//!
//! A [`Verifier`] has no method that opens, seals, bakes or signs anything:
//! those need the data key or the signing key, which only
//! [`crate::TrustedKeys`] holds.

use crate::cookie::{BakedCookie, Receipt};
use crate::error::{CookieError, DecodeError, KeyError, SealError};
use crate::grant::SignedGrant;
use crate::id::VolumeId;
use crate::keyfile::{self, KeyFileKind, Parsed};
use crate::record::{SealedRecord, SEAL_OVERHEAD};
use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};
use std::fmt;
use std::path::Path;

/// A volume's public identity: name, id and ed25519 verifying key.
///
/// A relay checks what passes through it:
/// ```
/// # use canopy_keys::{TrustedKeys, Verifier};
/// let keys = TrustedKeys::generate("vol").unwrap();
/// let relay: Verifier = Verifier::from_bytes(&keys.verifier().to_bytes()).unwrap();
/// let rec = keys.seal(0, 1, b"data");
/// relay.verify(&rec).unwrap();
/// ```
/// but holds nothing to open, seal, bake, burn or sign with, so it has no
/// such methods (each of these fails to compile with "no method named", as
/// the doctests check):
/// ```compile_fail,E0599
/// # use canopy_keys::TrustedKeys;
/// # let keys = TrustedKeys::generate("vol").unwrap();
/// # let rec = keys.seal(0, 1, b"data");
/// let relay = keys.verifier().clone();
/// relay.open(&rec);
/// ```
/// ```compile_fail,E0599
/// # use canopy_keys::TrustedKeys;
/// # let keys = TrustedKeys::generate("vol").unwrap();
/// # let rec = keys.seal(0, 1, b"data");
/// let relay = keys.verifier().clone();
/// relay.open_unverified_signature(&rec);
/// ```
/// ```compile_fail,E0599
/// # use canopy_keys::TrustedKeys;
/// # let keys = TrustedKeys::generate("vol").unwrap();
/// let relay = keys.verifier().clone();
/// relay.seal(0, 1, b"forged");
/// ```
/// ```compile_fail,E0599
/// # use canopy_keys::TrustedKeys;
/// # let keys = TrustedKeys::generate("vol").unwrap();
/// # let cookie = keys.issue_cookie(1);
/// let relay = keys.verifier().clone();
/// relay.open_cookie(&cookie);
/// ```
/// ```compile_fail,E0599
/// # use canopy_keys::TrustedKeys;
/// # let keys = TrustedKeys::generate("vol").unwrap();
/// # let rec = keys.seal(0, 1, b"data");
/// # let raw = keys.open_cookie(&keys.issue_cookie(1)).unwrap();
/// let relay = keys.verifier().clone();
/// relay.bake(&raw, &rec);
/// ```
/// ```compile_fail,E0599
/// # use canopy_keys::TrustedKeys;
/// # let keys = TrustedKeys::generate("vol").unwrap();
/// # let rec = keys.seal(0, 1, b"data");
/// # let baked = keys.bake(&keys.open_cookie(&keys.issue_cookie(1)).unwrap(), &rec);
/// let relay = keys.verifier().clone();
/// relay.burn(&baked);
/// ```
/// ```compile_fail,E0599
/// # use canopy_keys::TrustedKeys;
/// # let keys = TrustedKeys::generate("vol").unwrap();
/// let relay = keys.verifier().clone();
/// relay.issue_cookie(1);
/// ```
/// ```compile_fail,E0599
/// # use canopy_keys::TrustedKeys;
/// # let keys = TrustedKeys::generate("vol").unwrap();
/// let relay = keys.verifier().clone();
/// relay.sign_grant(0, 1, 2, 3);
/// ```
/// ```compile_fail,E0599
/// # use canopy_keys::TrustedKeys;
/// # let keys = TrustedKeys::generate("vol").unwrap();
/// let relay = keys.verifier().clone();
/// relay.mac_grant(0, 1, 2, 3);
/// ```
/// ```compile_fail,E0599
/// # use canopy_keys::TrustedKeys;
/// # let keys = TrustedKeys::generate("vol").unwrap();
/// # let g = keys.sign_grant(0, 1, 2, 3);
/// let relay = keys.verifier().clone();
/// relay.check_grant(&g);
/// ```
/// ```compile_fail,E0599
/// # use canopy_keys::TrustedKeys;
/// # let keys = TrustedKeys::generate("vol").unwrap();
/// let relay = keys.verifier().clone();
/// relay.seal_unsigned(0, 1, b"forged");
/// ```
/// The same calls on [`crate::TrustedKeys`] compile and work:
/// ```
/// # use canopy_keys::TrustedKeys;
/// let keys = TrustedKeys::generate("vol").unwrap();
/// let rec = keys.seal(0, 1, b"data");
/// assert_eq!(&keys.open(&rec).unwrap()[..], b"data");
/// keys.open_unverified_signature(&rec).unwrap();
/// let raw = keys.open_cookie(&keys.issue_cookie(1)).unwrap();
/// let baked = keys.bake(&raw, &rec);
/// let receipt = keys.burn(&baked);
/// keys.verifier().verify_receipt(&baked, &receipt).unwrap();
/// keys.verifier().verify_grant(&keys.sign_grant(0, 1, 2, 3)).unwrap();
/// keys.check_grant(&keys.mac_grant(0, 1, 2, 3)).unwrap();
/// keys.open_unverified_signature(&keys.seal_unsigned(0, 1, b"data")).unwrap();
/// ```
#[derive(Clone)]
pub struct Verifier {
    volume: String,
    id: VolumeId,
    key: VerifyingKey,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("volume", &self.volume)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Loads the verifying key from a relay verify file, or from a trusted
    /// key file (keeping only its verifying key). A relay verify file may have
    /// any mode; a trusted key file must still be private to its owner, since
    /// it holds the secrets whoever reads it.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let file = keyfile::read(path)?;
        let parsed = keyfile::parse(&file.bytes, path)?;
        if parsed.kind == KeyFileKind::Trusted {
            keyfile::check_private(path, file.mode)?;
        }
        Self::from_parsed(&parsed, path)
    }

    /// As [`Verifier::load`], and refuses a file of another volume.
    pub fn load_for(path: &Path, volume: &str) -> Result<Self, KeyError> {
        let v = Self::load(path)?;
        keyfile::check_volume(path, &v.volume, volume)?;
        Ok(v)
    }

    /// Parses a key file of either kind from bytes (no permission check).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let path = Path::new(keyfile::IN_MEMORY);
        Self::from_parsed(&keyfile::parse(bytes, path)?, path)
    }

    pub(crate) fn from_parsed(p: &Parsed<'_>, path: &Path) -> Result<Self, KeyError> {
        let malformed = |reason| KeyError::Malformed {
            path: path.to_path_buf(),
            reason,
        };
        let key = VerifyingKey::from_bytes(p.verifying_key)
            .map_err(|_| malformed("the verifying key is not a valid ed25519 key"))?;
        // A small-order key would accept forged signatures.
        if key.is_weak() {
            return Err(malformed("the verifying key is a weak ed25519 key"));
        }
        Ok(Verifier {
            volume: p.volume.to_owned(),
            id: VolumeId::from_verifying_key(p.verifying_key),
            key,
        })
    }

    pub(crate) fn from_key(volume: &str, key: VerifyingKey) -> Self {
        Verifier {
            volume: volume.to_owned(),
            id: VolumeId::from_verifying_key(key.as_bytes()),
            key,
        }
    }

    /// The relay verify file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        keyfile::encode(&self.volume, self.key.as_bytes(), None).to_vec()
    }

    /// The volume name.
    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// The volume's global id.
    pub fn id(&self) -> VolumeId {
        self.id
    }

    /// The ed25519 verifying key's bytes (public).
    pub fn verifying_key_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// Whether `signature` is this volume's signature over `hash`.
    ///
    /// The RFC 8032 check (canonical S, R compared as bytes), not
    /// `verify_strict`: its extra small-order checks guard against keys an
    /// attacker chose, and this key is the volume's own, refused at load if
    /// weak. They cost about 12% of a verification, which is a relay's whole
    /// cost per small chunk.
    fn signed(&self, hash: &[u8; 32], signature: &[u8; 64]) -> bool {
        self.key
            .verify(hash, &Signature::from_bytes(signature))
            .is_ok()
    }

    /// Refuses a record whose ciphertext cannot even hold the tag.
    fn check_len(rec: &SealedRecord) -> Result<(), SealError> {
        if rec.ciphertext.len() < SEAL_OVERHEAD {
            return Err(SealError::Decode(DecodeError::TooShort {
                what: "record ciphertext",
                len: rec.ciphertext.len(),
                min: SEAL_OVERHEAD,
            }));
        }
        Ok(())
    }

    /// Checks a record's signature: it was sealed by this volume's signing
    /// key, for exactly this chunk, version, nonce and ciphertext.
    pub fn verify(&self, rec: &SealedRecord) -> Result<(), SealError> {
        self.verify_digest(rec, &rec.digest(&self.id))
    }

    fn verify_digest(&self, rec: &SealedRecord, digest: &[u8; 32]) -> Result<(), SealError> {
        Self::check_len(rec)?;
        if self.signed(digest, &rec.signature) {
            Ok(())
        } else {
            Err(SealError::BadSignature)
        }
    }

    /// Checks many records' signatures at once with ed25519 batch
    /// verification (about twice as fast per record). An error says only that
    /// some record is bad; [`Verifier::verify_each`] says which.
    pub fn verify_batch(&self, recs: &[&SealedRecord]) -> Result<(), SealError> {
        if recs.is_empty() {
            return Ok(());
        }
        for rec in recs {
            Self::check_len(rec)?;
        }
        let digests: Vec<[u8; 32]> = recs.iter().map(|r| r.digest(&self.id)).collect();
        let messages: Vec<&[u8]> = digests.iter().map(|d| &d[..]).collect();
        let signatures: Vec<Signature> = recs
            .iter()
            .map(|r| Signature::from_bytes(&r.signature))
            .collect();
        let keys = vec![self.key; recs.len()];
        ed25519_dalek::verify_batch(&messages, &signatures, &keys)
            .map_err(|_| SealError::BadSignature)
    }

    /// Checks every record, one result per record in order: one batch check
    /// when all are good (the common case), and only when the batch fails,
    /// one check per record to find the bad ones.
    pub fn verify_each(&self, recs: &[&SealedRecord]) -> Vec<Result<(), SealError>> {
        // A batch of one costs more than a single check.
        if let [rec] = recs {
            return vec![self.verify(rec)];
        }
        match self.verify_batch(recs) {
            Ok(()) => vec![Ok(()); recs.len()],
            Err(_) => recs.iter().map(|r| self.verify(r)).collect(),
        }
    }

    /// Checks that a baked cookie was signed by a holder of the signing key.
    pub fn verify_baked(&self, baked: &BakedCookie) -> Result<(), CookieError> {
        if self.signed(&baked.signed_hash(&self.id), &baked.signature) {
            Ok(())
        } else {
            Err(CookieError::BadSignature)
        }
    }

    /// Checks a write before it is stored or forwarded: the record's
    /// signature, the baked cookie's signature, that the cookie is bound to
    /// this record's chunk, version and digest, and that it has not expired
    /// (it is valid while `now_ms < expires_ms`).
    ///
    /// Whether the cookie was already spent is the root's ledger's business,
    /// keyed by `baked.value`.
    pub fn check_write(
        &self,
        rec: &SealedRecord,
        baked: &BakedCookie,
        now_ms: u64,
    ) -> Result<(), CookieError> {
        let digest = rec.digest(&self.id);
        self.verify_digest(rec, &digest)
            .map_err(CookieError::BadRecord)?;
        self.verify_baked(baked)?;
        if baked.chunk != rec.chunk {
            return Err(CookieError::Mismatch { what: "chunk" });
        }
        if baked.version != rec.version {
            return Err(CookieError::Mismatch { what: "version" });
        }
        if baked.digest != digest {
            return Err(CookieError::Mismatch { what: "digest" });
        }
        if now_ms >= baked.expires_ms {
            return Err(CookieError::Expired {
                expires_ms: baked.expires_ms,
                now_ms,
            });
        }
        Ok(())
    }

    /// Checks a receipt (burnt cookie): the root's signature over exactly
    /// this baked cookie. Only a trusted node can make one, so a good receipt
    /// proves the write reached one.
    pub fn verify_receipt(
        &self,
        baked: &BakedCookie,
        receipt: &Receipt,
    ) -> Result<(), CookieError> {
        if self.signed(&Receipt::signed_hash(&self.id, baked), &receipt.signature) {
            Ok(())
        } else {
            Err(CookieError::BadSignature)
        }
    }

    /// Checks a grant's signature. Its expiry is the caller's to compare
    /// with the clock ([`SignedGrant::is_expired`]).
    pub fn verify_grant(&self, g: &SignedGrant) -> Result<(), SealError> {
        if self.signed(&g.signed_hash(&self.id), &g.signature) {
            Ok(())
        } else {
            Err(SealError::BadSignature)
        }
    }
}
