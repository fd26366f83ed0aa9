//! XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha), as records and cookies
//! are sealed: HChaCha20 from the `chacha20` crate turns the data key and
//! the nonce's first 16 bytes into a subkey, and ring's ChaCha20-Poly1305
//! (BoringSSL's assembly) seals under it with the nonce's last 8 bytes.
//!
//! Why not RustCrypto's `XChaCha20Poly1305`, which computes the same
//! bytes: on 64 KiB chunks ring's ChaCha20-Poly1305 ran 2.40 GB/s per core
//! here against its 1.22 GB/s, and a sealed chunk crosses the AEAD twice
//! (seal at the sender, open at the receiver), which made it the largest
//! part of a sealed cold read's CPU (issue 5, B2). The tests check the two
//! agree byte for byte (`tests/aead.rs`), so records sealed before this
//! change still open.
//!
//! The data key never reaches ring: only the subkey does, and it opens
//! only records whose nonce starts with the same 16 random bytes. We wipe
//! our copy; ring's copy inside its key schedule is not wiped on drop.

use chacha20::cipher::consts::U10;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};
use zeroize::{Zeroize, Zeroizing};

use crate::record::{NONCE_LEN, SEAL_OVERHEAD};

/// The AEAD tag failed to check: the ciphertext, nonce, associated data or
/// key is not what it was sealed with.
#[derive(Debug)]
pub(crate) struct Unauthentic;

/// The ChaCha20-Poly1305 key and 96-bit nonce that XChaCha20-Poly1305
/// with `key` and `nonce` comes down to.
fn derive(key: &[u8; 32], nonce: &[u8; NONCE_LEN]) -> (LessSafeKey, Nonce) {
    let (head, tail) = nonce.split_at(16);
    let mut sub = chacha20::hchacha::<U10>(key.into(), head.into());
    let mut subkey = Zeroizing::new([0u8; 32]);
    subkey.copy_from_slice(&sub);
    sub.as_mut_slice().zeroize();
    // ring refuses only a key of the wrong length, and this one is 32
    // bytes by construction.
    let key = LessSafeKey::new(
        UnboundKey::new(&CHACHA20_POLY1305, &subkey[..]).expect("a 32-byte ChaCha20 key"),
    );
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(tail);
    (key, Nonce::assume_unique_for_key(n))
}

/// Encrypts `buf` in place and returns the tag.
///
/// # Panics
/// If `buf` is longer than ChaCha20-Poly1305's limit of 256 GiB (a chunk is
/// at most 1 MiB).
pub(crate) fn seal(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
) -> [u8; SEAL_OVERHEAD] {
    let (k, n) = derive(key, nonce);
    let tag = k
        .seal_in_place_separate_tag(n, Aad::from(aad), buf)
        .expect("a buffer far below ChaCha20-Poly1305's 256 GiB limit");
    let mut out = [0u8; SEAL_OVERHEAD];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Checks `tag` and decrypts `buf` in place. On failure `buf`'s contents
/// are unspecified (ring may have decrypted them); callers discard it.
pub(crate) fn open(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; SEAL_OVERHEAD],
) -> Result<(), Unauthentic> {
    let (k, n) = derive(key, nonce);
    k.open_in_place_separate_tag(n, Aad::from(aad), Tag::from(*tag), buf, 0..)
        .map(|_| ())
        .map_err(|_| Unauthentic)
}
