//! What a trusted node holds: the data key and the signing key, and every
//! operation that needs them.

use crate::aead;
use crate::cookie::{cookie_aad, BakedCookie, RawCookie, Receipt, SealedCookie};
use crate::cookie::{COOKIE_PLAINTEXT_LEN, COOKIE_VALUE_LEN};
use crate::error::{CookieError, DecodeError, KeyError, SealError};
use crate::grant::SignedGrant;
use crate::id::{check_volume_name, VolumeId};
use crate::keyfile::{self, KeyFileKind, Parsed, Secrets};
use crate::record::{fixed, SealedRecord, NONCE_LEN, SEAL_OVERHEAD};
use crate::verifier::Verifier;
use bytes::{Bytes, BytesMut};
use ed25519_dalek::{Signer, SigningKey};
use rand_core::{OsRng, RngCore};
use std::fmt;
use std::path::Path;
use zeroize::{ZeroizeOnDrop, Zeroizing};

/// A volume's secret keys: what a trusted node (root, trusted proxy, writer)
/// holds. Both secrets are wiped from memory when this is dropped, and
/// `Debug` shows only the volume name and id.
pub struct TrustedKeys {
    data_key: Zeroizing<[u8; 32]>,
    /// The grants' MAC key, derived from the data key (`grant.rs`).
    grant_mac_key: Zeroizing<[u8; 32]>,
    /// `SigningKey` wipes itself on drop (ed25519-dalek's `zeroize` feature).
    signing: SigningKey,
    verifier: Verifier,
}

impl fmt::Debug for TrustedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustedKeys")
            .field("volume", &self.volume())
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

// Both fields holding secrets wipe themselves on drop.
impl ZeroizeOnDrop for TrustedKeys {}

/// The associated data of a record's AEAD: volume id ‖ chunk ‖ version.
fn record_aad(id: &VolumeId, chunk: u64, version: u64) -> [u8; 48] {
    let mut aad = [0u8; 48];
    let (a, rest) = aad.split_at_mut(32);
    let (c, v) = rest.split_at_mut(8);
    a.copy_from_slice(id.as_bytes());
    c.copy_from_slice(&chunk.to_le_bytes());
    v.copy_from_slice(&version.to_le_bytes());
    aad
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    OsRng.fill_bytes(&mut b);
    b
}

impl TrustedKeys {
    /// Generates a new volume's keys from the operating system's random
    /// number generator.
    pub fn generate(volume: &str) -> Result<Self, KeyError> {
        check_volume_name(volume)?;
        let mut seed = Zeroizing::new([0u8; 32]);
        let mut data_key = Zeroizing::new([0u8; 32]);
        for buf in [&mut seed, &mut data_key] {
            OsRng
                .try_fill_bytes(&mut buf[..])
                .map_err(|e| KeyError::Entropy(e.to_string()))?;
        }
        Ok(Self::from_secrets(volume, &seed, data_key))
    }

    fn from_secrets(volume: &str, seed: &[u8; 32], data_key: Zeroizing<[u8; 32]>) -> Self {
        let signing = SigningKey::from_bytes(seed);
        let verifier = Verifier::from_key(volume, signing.verifying_key());
        let grant_mac_key = Zeroizing::new(blake3::derive_key(
            crate::domain::GRANT_MAC_KEY,
            &data_key[..],
        ));
        TrustedKeys {
            data_key,
            grant_mac_key,
            signing,
            verifier,
        }
    }

    /// Deterministic keys from a seed, for tests and fuzz targets only: they
    /// are as secret as the seed, which is in the source. Never compiled into
    /// a normal build.
    #[cfg(any(test, fuzzing))]
    pub fn from_seed(volume: &str, seed: [u8; 32]) -> Result<Self, KeyError> {
        check_volume_name(volume)?;
        let signing = Zeroizing::new(blake3::derive_key("canopy test signing seed", &seed));
        let data = Zeroizing::new(blake3::derive_key("canopy test data key", &seed));
        Ok(Self::from_secrets(volume, &signing, data))
    }

    /// Loads a trusted key file (`<volume>.key`).
    ///
    /// Refuses a file that its group or others can access (fix: `chmod 600`),
    /// a relay verify file, and any truncated, corrupted or unknown file, each
    /// with an error that names the path.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let file = keyfile::read(path)?;
        let parsed = keyfile::parse(&file.bytes, path)?;
        if parsed.kind != KeyFileKind::Trusted {
            return Err(KeyError::NotTrusted(path.to_path_buf()));
        }
        keyfile::check_private(path, file.mode)?;
        Self::from_parsed(&parsed, path)
    }

    /// As [`TrustedKeys::load`], and refuses a file of another volume.
    pub fn load_for(path: &Path, volume: &str) -> Result<Self, KeyError> {
        let keys = Self::load(path)?;
        keyfile::check_volume(path, keys.volume(), volume)?;
        Ok(keys)
    }

    /// Parses a trusted key file's bytes (no permission check).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let path = Path::new(keyfile::IN_MEMORY);
        Self::from_parsed(&keyfile::parse(bytes, path)?, path)
    }

    pub(crate) fn from_parsed(p: &Parsed<'_>, path: &Path) -> Result<Self, KeyError> {
        let Some(secrets) = &p.secrets else {
            return Err(KeyError::NotTrusted(path.to_path_buf()));
        };
        let verifier = Verifier::from_parsed(p, path)?;
        let keys = Self::from_secrets(
            p.volume,
            secrets.signing_seed,
            Zeroizing::new(*secrets.data_key),
        );
        // Keys that sign what they cannot verify would make every record of
        // the volume look forged: refuse the file instead.
        if keys.verifier.verifying_key_bytes() != verifier.verifying_key_bytes() {
            return Err(KeyError::Malformed {
                path: path.to_path_buf(),
                reason: "the signing key does not match the verifying key",
            });
        }
        Ok(keys)
    }

    /// The trusted key file's bytes, in a buffer wiped on drop.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        keyfile::encode(
            self.volume(),
            self.signing.verifying_key().as_bytes(),
            Some(Secrets {
                signing_seed: self.signing.as_bytes(),
                data_key: &self.data_key,
            }),
        )
    }

    /// The volume name.
    pub fn volume(&self) -> &str {
        self.verifier.volume()
    }

    /// The volume's global id.
    pub fn id(&self) -> VolumeId {
        self.verifier.id()
    }

    /// The public half, as a relay would hold it.
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    fn sign(&self, hash: &[u8; 32]) -> [u8; 64] {
        self.signing.sign(hash).to_bytes()
    }

    /// Encrypts and signs one chunk at one version, with a fresh random
    /// nonce. Allocates only the record's ciphertext buffer.
    ///
    /// # Panics
    /// If the operating system's random number generator fails, or the
    /// plaintext is longer than XChaCha20-Poly1305's limit of 256 GiB.
    pub fn seal(&self, chunk: u64, version: u64, plaintext: &[u8]) -> SealedRecord {
        let mut rec = self.seal_unsigned(chunk, version, plaintext);
        rec.signature = self.sign(&rec.digest(&self.id()));
        rec
    }

    /// As [`TrustedKeys::seal`], but without the signature (all zeros):
    /// a record for a trusted node only, which opens it by its AEAD tag
    /// ([`TrustedKeys::open_unverified_signature`]). It saves a BLAKE3 pass
    /// over the ciphertext and an ed25519 signature; a relay refuses it.
    ///
    /// # Panics
    /// As [`TrustedKeys::seal`].
    pub fn seal_unsigned(&self, chunk: u64, version: u64, plaintext: &[u8]) -> SealedRecord {
        let nonce = random::<NONCE_LEN>();
        let mut buf = BytesMut::with_capacity(plaintext.len() + SEAL_OVERHEAD);
        buf.extend_from_slice(plaintext);
        let tag = aead::seal(
            &self.data_key,
            &nonce,
            &record_aad(&self.id(), chunk, version),
            &mut buf,
        );
        buf.extend_from_slice(&tag);
        SealedRecord {
            chunk,
            version,
            nonce,
            signature: [0; 64],
            ciphertext: buf.freeze(),
        }
    }

    /// Checks a record's signature, then decrypts it.
    pub fn open(&self, rec: &SealedRecord) -> Result<Bytes, SealError> {
        self.verifier.verify(rec)?;
        self.open_unverified_signature(rec)
    }

    /// Decrypts a record without checking its signature; the AEAD tag is
    /// checked, with volume id, chunk and version as associated data.
    ///
    /// This is how a trusted node opens what it receives: a tag that checks
    /// proves that a holder of the data key sealed exactly this ciphertext
    /// for this chunk and version, and only trusted nodes hold it, as only
    /// they hold the signing key. The signature adds nothing a trusted node
    /// needs; it is for relays, which cannot check the tag. Skipping it
    /// saves a BLAKE3 pass and an ed25519 verification per record (issue 5,
    /// B2: a quarter of a sealed cold read's crypto).
    pub fn open_unverified_signature(&self, rec: &SealedRecord) -> Result<Bytes, SealError> {
        let ct_len =
            rec.ciphertext
                .len()
                .checked_sub(SEAL_OVERHEAD)
                .ok_or(DecodeError::TooShort {
                    what: "record ciphertext",
                    len: rec.ciphertext.len(),
                    min: SEAL_OVERHEAD,
                })?;
        let (ct, tag) = rec.ciphertext.split_at(ct_len);
        let tag: [u8; SEAL_OVERHEAD] = fixed(tag, "record tag")?;
        let mut out = Vec::with_capacity(ct_len);
        out.extend_from_slice(ct);
        aead::open(
            &self.data_key,
            &rec.nonce,
            &record_aad(&self.id(), rec.chunk, rec.version),
            &mut out,
            &tag,
        )
        .map_err(|_| SealError::BadCiphertext)?;
        Ok(Bytes::from(out))
    }

    /// Issues a fresh raw cookie (a random 16-byte value) valid until
    /// `expires_ms`, sealed under the data key so that only trusted nodes
    /// can read or use it.
    ///
    /// # Panics
    /// If the operating system's random number generator fails.
    pub fn issue_cookie(&self, expires_ms: u64) -> SealedCookie {
        let mut value = Zeroizing::new([0u8; COOKIE_VALUE_LEN]);
        OsRng.fill_bytes(&mut value[..]);
        self.issue_cookie_value(&value, expires_ms)
    }

    /// Issues a raw cookie with a value the issuer chose (for example one
    /// that carries the issuer's own tag, so that it accepts only the
    /// cookies it issued), sealed like [`TrustedKeys::issue_cookie`].
    pub fn issue_cookie_value(
        &self,
        value: &[u8; COOKIE_VALUE_LEN],
        expires_ms: u64,
    ) -> SealedCookie {
        let mut plain = Zeroizing::new([0u8; COOKIE_PLAINTEXT_LEN]);
        let (v, expiry) = plain.split_at_mut(COOKIE_VALUE_LEN);
        v.copy_from_slice(value);
        expiry.copy_from_slice(&expires_ms.to_le_bytes());
        let nonce = random::<NONCE_LEN>();
        let tag = aead::seal(
            &self.data_key,
            &nonce,
            &cookie_aad(&self.id()),
            &mut plain[..],
        );
        let mut out = [0u8; crate::cookie::SEALED_COOKIE_LEN];
        let (n, rest) = out.split_at_mut(NONCE_LEN);
        let (c, t) = rest.split_at_mut(COOKIE_PLAINTEXT_LEN);
        n.copy_from_slice(&nonce);
        c.copy_from_slice(&plain[..]);
        t.copy_from_slice(&tag);
        SealedCookie(out)
    }

    /// Opens a sealed cookie issued by this volume's root.
    pub fn open_cookie(&self, sealed: &SealedCookie) -> Result<RawCookie, CookieError> {
        let (nonce, rest) = sealed.0.split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(COOKIE_PLAINTEXT_LEN);
        let nonce: [u8; NONCE_LEN] = fixed(nonce, "cookie nonce")?;
        let tag: [u8; SEAL_OVERHEAD] = fixed(tag, "cookie tag")?;
        let mut plain: Zeroizing<[u8; COOKIE_PLAINTEXT_LEN]> =
            Zeroizing::new(fixed(ct, "cookie ciphertext")?);
        aead::open(
            &self.data_key,
            &nonce,
            &cookie_aad(&self.id()),
            &mut plain[..],
            &tag,
        )
        .map_err(|_| CookieError::Undecryptable)?;
        let (value, expiry) = plain.split_at(COOKIE_VALUE_LEN);
        Ok(RawCookie {
            value: fixed(value, "cookie value")?,
            expires_ms: u64::from_le_bytes(fixed(expiry, "cookie expiry")?),
        })
    }

    /// Bakes a raw cookie for one write: signs it bound to `rec`'s chunk,
    /// version and digest, so it authorises that record and nothing else.
    pub fn bake(&self, raw: &RawCookie, rec: &SealedRecord) -> BakedCookie {
        let mut baked = BakedCookie {
            value: raw.value,
            expires_ms: raw.expires_ms,
            chunk: rec.chunk,
            version: rec.version,
            digest: rec.digest(&self.id()),
            signature: [0; 64],
        };
        baked.signature = self.sign(&baked.signed_hash(&self.id()));
        baked
    }

    /// Burns a baked cookie: the receipt that tells the writer its write
    /// reached a trusted node. The root calls this once it has accepted the
    /// write (after [`Verifier::check_write`] and its spent-cookie ledger).
    pub fn burn(&self, baked: &BakedCookie) -> Receipt {
        Receipt {
            signature: self.sign(&Receipt::signed_hash(&self.id(), baked)),
        }
    }

    /// Signs a permission grant on `chunk` at `version`, valid until
    /// `expires_ms`, and MACs it for trusted nodes.
    pub fn sign_grant(&self, chunk: u64, version: u64, perm: u8, expires_ms: u64) -> SignedGrant {
        let mut g = self.mac_grant(chunk, version, perm, expires_ms);
        g.signature = self.sign(&g.signed_hash(&self.id()));
        g
    }

    /// As [`TrustedKeys::sign_grant`], but with the MAC alone (the
    /// signature all zeros): a grant for a trusted node only, which checks
    /// the MAC ([`TrustedKeys::check_grant`]); a relay refuses it. It saves
    /// an ed25519 signature.
    pub fn mac_grant(&self, chunk: u64, version: u64, perm: u8, expires_ms: u64) -> SignedGrant {
        let mut g = SignedGrant {
            chunk,
            version,
            perm,
            expires_ms,
            signature: [0; 64],
            mac: [0; crate::grant::GRANT_MAC_LEN],
        };
        g.mac = *g.mac_with(&self.id(), &self.grant_mac_key).as_bytes();
        g
    }

    /// Checks a grant's MAC: a trusted node's check of a grant, which
    /// proves that a holder of the data key made it as a signature would
    /// (only trusted nodes hold either secret), for the cost of two short
    /// hashes instead of an ed25519 verification. Its expiry is the
    /// caller's to compare with the clock.
    pub fn check_grant(&self, g: &SignedGrant) -> Result<(), SealError> {
        // blake3::Hash compares in constant time.
        if g.mac_with(&self.id(), &self.grant_mac_key) == blake3::Hash::from_bytes(g.mac) {
            Ok(())
        } else {
            Err(SealError::BadMac)
        }
    }
}
