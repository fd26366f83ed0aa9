//! `aead.rs` computes XChaCha20-Poly1305 from HChaCha20 and ring's
//! ChaCha20-Poly1305; RustCrypto's `XChaCha20Poly1305` is the reference it
//! must match byte for byte, so that records and cookies sealed by either
//! open with the other.

use crate::aead;
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{KeyInit, Tag, XChaCha20Poly1305, XNonce};
use proptest::prelude::*;

/// The reference: ciphertext and tag.
fn reference(key: &[u8; 32], nonce: &[u8; 24], aad: &[u8], plain: &[u8]) -> (Vec<u8>, [u8; 16]) {
    let mut buf = plain.to_vec();
    let tag = XChaCha20Poly1305::new(key.into())
        .encrypt_in_place_detached(&XNonce::from(*nonce), aad, &mut buf)
        .unwrap();
    (buf, tag.into())
}

proptest! {
    #[test]
    fn seals_as_the_reference_and_opens_what_it_seals(
        key in any::<[u8; 32]>(),
        nonce in any::<[u8; 24]>(),
        aad in proptest::collection::vec(any::<u8>(), 0..64),
        plain in proptest::collection::vec(any::<u8>(), 0..3000),
    ) {
        let (want_ct, want_tag) = reference(&key, &nonce, &aad, &plain);
        let mut buf = plain.clone();
        let tag = aead::seal(&key, &nonce, &aad, &mut buf);
        prop_assert_eq!(&buf, &want_ct);
        prop_assert_eq!(tag, want_tag);

        // The reference opens ours; we open the reference's.
        let mut theirs = buf.clone();
        XChaCha20Poly1305::new((&key).into())
            .decrypt_in_place_detached(&XNonce::from(nonce), &aad, &mut theirs, &Tag::from(tag))
            .unwrap();
        prop_assert_eq!(&theirs, &plain);
        let mut ours = want_ct.clone();
        prop_assert!(aead::open(&key, &nonce, &aad, &mut ours, &want_tag).is_ok());
        prop_assert_eq!(&ours, &plain);
    }

    #[test]
    fn any_change_fails_the_tag(
        key in any::<[u8; 32]>(),
        nonce in any::<[u8; 24]>(),
        plain in proptest::collection::vec(any::<u8>(), 1..512),
        what in 0..5usize,
        at in any::<prop::sample::Index>(),
    ) {
        let aad = b"chunk 7 version 3";
        let mut ct = plain.clone();
        let mut tag = aead::seal(&key, &nonce, aad, &mut ct);
        let (mut key, mut nonce, mut aad) = (key, nonce, aad.to_vec());
        match what {
            0 => {
                let i = at.index(ct.len());
                ct[i] ^= 1;
            }
            1 => tag[at.index(16)] ^= 1,
            2 => nonce[at.index(24)] ^= 1,
            3 => {
                let i = at.index(aad.len());
                aad[i] ^= 1;
            }
            _ => key[at.index(32)] ^= 1,
        }
        prop_assert!(aead::open(&key, &nonce, &aad, &mut ct, &tag).is_err());
    }
}

/// Chunk-sized buffers, the sizes records have, across ring's block and
/// batch boundaries.
#[test]
fn chunk_sizes_match_the_reference() {
    let key = [0x42; 32];
    let nonce = [0x17; 24];
    for len in [4096, 64 << 10, (64 << 10) + 1, 256 << 10, 1 << 20] {
        let plain: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let (want_ct, want_tag) = reference(&key, &nonce, b"aad", &plain);
        let mut buf = plain.clone();
        let tag = aead::seal(&key, &nonce, b"aad", &mut buf);
        assert!(buf == want_ct && tag == want_tag, "{len} bytes");
        assert!(aead::open(&key, &nonce, b"aad", &mut buf, &tag).is_ok());
        assert!(buf == plain, "{len} bytes");
    }
}
