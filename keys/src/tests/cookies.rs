//! Cookies (raw, baked, burnt), grants, and that no kind of signature passes
//! for another.

use super::{flip, keys, seeded};
use crate::{
    BakedCookie, CookieError, DecodeError, Receipt, SealError, SealedCookie, SealedRecord,
    SignedGrant, BAKED_COOKIE_LEN, GRANT_LEN, GRANT_MAC_LEN, RECEIPT_LEN, SEALED_COOKIE_LEN,
    SIGNATURE_LEN,
};

const NOW: u64 = 1_000_000;
const LATER: u64 = NOW + 30_000;

#[test]
fn issue_open_bake_check_burn_verify_round_trip() {
    let root = keys();
    // The writer is another trusted node: it has its own copy of the keys.
    let writer = keys();
    let relay = root.verifier().clone();

    let sealed = root.issue_cookie(LATER);
    assert_eq!(sealed.as_bytes().len(), SEALED_COOKIE_LEN);
    let sealed = SealedCookie::from_bytes(sealed.as_bytes()).unwrap();

    let raw = writer.open_cookie(&sealed).unwrap();
    assert_eq!(raw.expires_ms, LATER);
    let rec = writer.seal(12, 5, b"new contents");
    let baked = writer.bake(&raw, &rec);
    assert_eq!(baked.value, raw.value);
    assert_eq!((baked.chunk, baked.version), (12, 5));
    assert_eq!(baked.digest, rec.digest(&root.id()));

    // Every hop on the way, relays included, can check the write.
    let baked = BakedCookie::decode(&baked.encode()).unwrap();
    assert_eq!(relay.verify_baked(&baked), Ok(()));
    assert_eq!(relay.check_write(&rec, &baked, NOW), Ok(()));

    let receipt = root.burn(&baked);
    let receipt = Receipt::decode(&receipt.encode()).unwrap();
    assert_eq!(writer.verifier().verify_receipt(&baked, &receipt), Ok(()));
    assert_eq!(relay.verify_receipt(&baked, &receipt), Ok(()));
}

#[test]
fn issued_cookies_are_distinct_and_only_this_volume_opens_them() {
    let k = keys();
    let a = k.issue_cookie(LATER);
    let b = k.issue_cookie(LATER);
    assert_ne!(a, b);
    assert_ne!(
        k.open_cookie(&a).unwrap().value,
        k.open_cookie(&b).unwrap().value
    );
    for other in [seeded("other", 2), seeded("vol", 3)] {
        assert_eq!(other.open_cookie(&a), Err(CookieError::Undecryptable));
    }
    for bit in 0..SEALED_COOKIE_LEN * 8 {
        let mut bytes = *a.as_bytes();
        flip(&mut bytes, bit);
        let bad = SealedCookie::from_bytes(&bytes).unwrap();
        assert_eq!(
            k.open_cookie(&bad),
            Err(CookieError::Undecryptable),
            "bit {bit}"
        );
    }
}

#[test]
fn a_sealed_record_cannot_be_opened_as_a_cookie_or_back() {
    let k = keys();
    // A 24-byte plaintext makes a record whose nonce ‖ ciphertext is exactly
    // a sealed cookie's length: only the associated data tells them apart.
    let rec = k.seal(0, 0, &[0; 24]);
    let mut bytes = Vec::from(rec.nonce);
    bytes.extend_from_slice(&rec.ciphertext);
    let as_cookie = SealedCookie::from_bytes(&bytes).unwrap();
    assert_eq!(k.open_cookie(&as_cookie), Err(CookieError::Undecryptable));

    let cookie = k.issue_cookie(LATER);
    let (nonce, ct) = cookie.as_bytes().split_at(24);
    let as_rec = SealedRecord {
        chunk: 0,
        version: 0,
        nonce: nonce.try_into().unwrap(),
        signature: [0; 64],
        ciphertext: bytes::Bytes::copy_from_slice(ct),
    };
    assert_eq!(
        k.open_unverified_signature(&as_rec),
        Err(SealError::BadCiphertext)
    );
}

#[test]
fn cookie_decoders_check_lengths() {
    assert!(matches!(
        SealedCookie::from_bytes(&[0; SEALED_COOKIE_LEN - 1]),
        Err(DecodeError::Length {
            expected: SEALED_COOKIE_LEN,
            ..
        })
    ));
    for n in [0, BAKED_COOKIE_LEN - 1, BAKED_COOKIE_LEN + 1] {
        assert!(BakedCookie::decode(&vec![0; n]).is_err());
    }
    for n in [0, RECEIPT_LEN - 1, RECEIPT_LEN + 1] {
        assert!(Receipt::decode(&vec![0; n]).is_err());
    }
    for n in [0, GRANT_LEN - 1, GRANT_LEN + 1] {
        assert!(SignedGrant::decode(&vec![0; n]).is_err());
    }
}

#[test]
fn a_receipt_for_one_baked_cookie_does_not_verify_for_another() {
    let k = keys();
    let rec = k.seal(1, 2, b"x");
    let x = k.bake(&k.open_cookie(&k.issue_cookie(LATER)).unwrap(), &rec);
    let y = k.bake(&k.open_cookie(&k.issue_cookie(LATER)).unwrap(), &rec);
    let receipt_x = k.burn(&x);
    assert_eq!(k.verifier().verify_receipt(&x, &receipt_x), Ok(()));
    assert_eq!(
        k.verifier().verify_receipt(&y, &receipt_x),
        Err(CookieError::BadSignature)
    );
    // Nor for X with any one bit changed, nor from another volume.
    for bit in 0..BAKED_COOKIE_LEN * 8 {
        let mut bytes = x.encode();
        flip(&mut bytes, bit);
        let x2 = BakedCookie::decode(&bytes).unwrap();
        assert_eq!(
            k.verifier().verify_receipt(&x2, &receipt_x),
            Err(CookieError::BadSignature),
            "bit {bit}"
        );
        assert_eq!(
            k.verifier().verify_baked(&x2),
            Err(CookieError::BadSignature)
        );
    }
    let other = seeded("other", 2);
    assert_eq!(
        other.verifier().verify_receipt(&x, &receipt_x),
        Err(CookieError::BadSignature)
    );
    assert_eq!(
        other.verifier().verify_baked(&x),
        Err(CookieError::BadSignature)
    );
}

#[test]
fn a_baked_cookie_authorises_its_own_record_only() {
    let k = keys();
    let v = k.verifier();
    let rec = k.seal(40, 7, b"the write");
    let baked = k.bake(&k.open_cookie(&k.issue_cookie(LATER)).unwrap(), &rec);
    assert_eq!(v.check_write(&rec, &baked, NOW), Ok(()));

    let other_chunk = k.seal(41, 7, b"the write");
    let other_version = k.seal(40, 8, b"the write");
    let other_data = k.seal(40, 7, b"another write");
    // Same plaintext, same place, fresh nonce: still another record.
    let resealed = k.seal(40, 7, b"the write");
    assert_eq!(
        v.check_write(&other_chunk, &baked, NOW),
        Err(CookieError::Mismatch { what: "chunk" })
    );
    assert_eq!(
        v.check_write(&other_version, &baked, NOW),
        Err(CookieError::Mismatch { what: "version" })
    );
    for r in [&other_data, &resealed] {
        assert_eq!(
            v.check_write(r, &baked, NOW),
            Err(CookieError::Mismatch { what: "digest" })
        );
    }

    // A forged record is refused before the cookie is looked at.
    let mut forged = rec.clone();
    forged.ciphertext = bytes::Bytes::from(vec![0; rec.ciphertext.len()]);
    assert_eq!(
        v.check_write(&forged, &baked, NOW),
        Err(CookieError::BadRecord(SealError::BadSignature))
    );
    // A cookie re-bound by hand (without the signing key) is refused.
    let mut rebound = baked.clone();
    rebound.chunk = 41;
    rebound.digest = other_chunk.digest(&k.id());
    assert_eq!(
        v.check_write(&other_chunk, &rebound, NOW),
        Err(CookieError::BadSignature)
    );
}

#[test]
fn expired_cookies_are_refused() {
    let k = keys();
    let rec = k.seal(1, 1, b"x");
    let baked = k.bake(&k.open_cookie(&k.issue_cookie(LATER)).unwrap(), &rec);
    assert_eq!(k.verifier().check_write(&rec, &baked, LATER - 1), Ok(()));
    for now in [LATER, LATER + 1, u64::MAX] {
        assert_eq!(
            k.verifier().check_write(&rec, &baked, now),
            Err(CookieError::Expired {
                expires_ms: LATER,
                now_ms: now
            })
        );
    }
    // Extending the expiry by hand breaks the signature.
    let mut extended = baked.clone();
    extended.expires_ms = u64::MAX;
    assert_eq!(
        k.verifier().check_write(&rec, &extended, LATER),
        Err(CookieError::BadSignature)
    );
}

#[test]
fn grants_verify_and_refuse_tampering() {
    let k = keys();
    let g = k.sign_grant(3, 9, 2, LATER);
    let g = SignedGrant::decode(&g.encode()).unwrap();
    assert_eq!((g.chunk, g.version, g.perm, g.expires_ms), (3, 9, 2, LATER));
    assert_eq!(k.verifier().verify_grant(&g), Ok(()));
    assert_eq!(k.check_grant(&g), Ok(()));
    assert!(!g.is_expired(LATER - 1));
    assert!(g.is_expired(LATER));
    // A flipped field fails both proofs; a flipped signature only the
    // relay's check, a flipped MAC only the trusted node's (neither covers
    // the other: spoiling either only gets the grant refused).
    let fields = GRANT_LEN - SIGNATURE_LEN - GRANT_MAC_LEN;
    for bit in 0..GRANT_LEN * 8 {
        let mut bytes = g.encode();
        flip(&mut bytes, bit);
        let bad = SignedGrant::decode(&bytes).unwrap();
        let byte = bit / 8;
        let (sig_ok, mac_ok) = if byte < fields {
            (false, false)
        } else if byte < fields + SIGNATURE_LEN {
            (false, true)
        } else {
            (true, false)
        };
        let expect_sig = if sig_ok {
            Ok(())
        } else {
            Err(SealError::BadSignature)
        };
        let expect_mac = if mac_ok {
            Ok(())
        } else {
            Err(SealError::BadMac)
        };
        assert_eq!(k.verifier().verify_grant(&bad), expect_sig, "bit {bit}");
        assert_eq!(k.check_grant(&bad), expect_mac, "bit {bit}");
    }
    let other = seeded("other", 2);
    assert_eq!(
        other.verifier().verify_grant(&g),
        Err(SealError::BadSignature)
    );
    assert_eq!(other.check_grant(&g), Err(SealError::BadMac));
    // Keys of another volume with the same name.
    assert_eq!(seeded("vol", 3).check_grant(&g), Err(SealError::BadMac));

    // MAC only, for a trusted node: the same MAC, no signature.
    let bare = k.mac_grant(3, 9, 2, LATER);
    assert_eq!((bare.signature, bare.mac), ([0; 64], g.mac));
    assert_eq!(k.check_grant(&bare), Ok(()));
    assert_eq!(
        k.verifier().verify_grant(&bare),
        Err(SealError::BadSignature)
    );
}

#[test]
fn no_kind_of_signature_verifies_as_another() {
    let k = keys();
    let v = k.verifier();
    let rec = k.seal(1, 2, b"data");
    let baked = k.bake(&k.open_cookie(&k.issue_cookie(LATER)).unwrap(), &rec);
    let receipt = k.burn(&baked);
    let grant = k.sign_grant(1, 2, 2, LATER);
    let sigs = [
        ("record", rec.signature),
        ("baked cookie", baked.signature),
        ("receipt", receipt.signature),
        ("grant", grant.signature),
    ];
    for (kind, sig) in sigs {
        if kind != "record" {
            let mut r = rec.clone();
            r.signature = sig;
            assert_eq!(
                v.verify(&r),
                Err(SealError::BadSignature),
                "{kind} as record"
            );
        }
        if kind != "baked cookie" {
            let mut b = baked.clone();
            b.signature = sig;
            assert_eq!(
                v.verify_baked(&b),
                Err(CookieError::BadSignature),
                "{kind} as baked"
            );
        }
        if kind != "receipt" {
            // Notably the baked cookie's own signature: a relay must not be
            // able to hand it back to the writer as the receipt.
            let r = Receipt { signature: sig };
            assert_eq!(
                v.verify_receipt(&baked, &r),
                Err(CookieError::BadSignature),
                "{kind} as receipt"
            );
        }
        if kind != "grant" {
            let mut g = grant.clone();
            g.signature = sig;
            assert_eq!(
                v.verify_grant(&g),
                Err(SealError::BadSignature),
                "{kind} as grant"
            );
        }
    }
}
