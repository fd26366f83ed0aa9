//! Sealing, opening and verifying chunk records; their encodings.

use super::{flip, keys, seeded};
use crate::{DecodeError, SealError, SealedRecord, RECORD_HEADER_LEN, SEAL_OVERHEAD, VERIFIER_LEN};
use bytes::Bytes;
use proptest::prelude::*;

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + 7) as u8).collect()
}

#[test]
fn seal_open_round_trip_at_every_chunk_size() {
    let k = keys();
    for len in [0, 1, 4096, 65536, 1 << 20] {
        let plain = data(len);
        let rec = k.seal(9, 3, &plain);
        assert_eq!(rec.ciphertext.len(), len + SEAL_OVERHEAD);
        assert_eq!(rec.plaintext_len(), len);
        assert_eq!((rec.chunk, rec.version), (9, 3));
        // One byte of ciphertext equals its plaintext one time in 256; from
        // 16 bytes on, a match means no encryption.
        if len >= 16 {
            assert_ne!(
                &rec.ciphertext[..len],
                &plain[..],
                "plaintext left in clear"
            );
        }
        assert_eq!(k.verifier().verify(&rec), Ok(()));
        assert_eq!(k.open(&rec).as_deref(), Ok(&plain[..]));
        assert_eq!(k.open_unverified_signature(&rec).as_deref(), Ok(&plain[..]));

        // Unsigned, for a trusted node only: it opens by its tag; the
        // signature check (a relay's, or `open`) refuses it.
        let bare = k.seal_unsigned(9, 3, &plain);
        assert_eq!(bare.signature, [0; 64]);
        assert_eq!(
            k.open_unverified_signature(&bare).as_deref(),
            Ok(&plain[..])
        );
        assert_eq!(k.verifier().verify(&bare), Err(SealError::BadSignature));
        assert_eq!(k.open(&bare), Err(SealError::BadSignature));
    }
}

#[test]
fn nonces_are_fresh() {
    let k = keys();
    let a = k.seal(1, 1, b"same");
    let b = k.seal(1, 1, b"same");
    assert_ne!(a.nonce, b.nonce);
    assert_ne!(a.ciphertext, b.ciphertext);
}

/// Every field a bit of which can be flipped, with its length in bits.
fn fields(rec: &SealedRecord) -> [(&'static str, usize); 5] {
    [
        ("chunk", 64),
        ("version", 64),
        ("nonce", 24 * 8),
        ("signature", 64 * 8),
        ("ciphertext", rec.ciphertext.len() * 8),
    ]
}

fn flipped(rec: &SealedRecord, field: &str, bit: usize) -> SealedRecord {
    let mut r = rec.clone();
    match field {
        "chunk" => r.chunk ^= 1 << bit,
        "version" => r.version ^= 1 << bit,
        "nonce" => flip(&mut r.nonce, bit),
        "signature" => flip(&mut r.signature, bit),
        _ => {
            let mut ct = r.ciphertext.to_vec();
            flip(&mut ct, bit);
            r.ciphertext = Bytes::from(ct);
        }
    }
    r
}

#[test]
fn every_single_bit_flip_is_refused() {
    let k = keys();
    let rec = k.seal(5, 8, b"twenty-four bytes of dat");
    for (field, bits) in fields(&rec) {
        for bit in 0..bits {
            let bad = flipped(&rec, field, bit);
            assert_eq!(
                k.verifier().verify(&bad),
                Err(SealError::BadSignature),
                "{field} bit {bit}"
            );
            assert_eq!(
                k.open(&bad),
                Err(SealError::BadSignature),
                "{field} bit {bit}"
            );
            // The AEAD covers everything but the signature on its own, so a
            // caller that skipped the signature is still protected.
            if field != "signature" {
                assert_eq!(
                    k.open_unverified_signature(&bad),
                    Err(SealError::BadCiphertext),
                    "{field} bit {bit}"
                );
            }
        }
    }
}

proptest! {
    #[test]
    fn random_bit_flips_are_refused(
        plain in proptest::collection::vec(any::<u8>(), 0..2048),
        chunk in any::<u64>(),
        version in any::<u64>(),
        which in 0usize..5,
        pick in any::<usize>(),
    ) {
        let k = keys();
        let rec = k.seal(chunk, version, &plain);
        let (field, bits) = fields(&rec)[which];
        let bad = flipped(&rec, field, pick % bits);
        prop_assert_eq!(k.verifier().verify(&bad), Err(SealError::BadSignature));
        prop_assert!(k.open(&bad).is_err());
        let opened = k.open(&rec);
        prop_assert_eq!(opened.as_deref(), Ok(&plain[..]));
    }

    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(rec) = SealedRecord::decode(Bytes::from(bytes.clone())) {
            prop_assert_eq!(&rec.encode()[..], &bytes[..]);
        }
    }
}

#[test]
fn a_record_for_one_chunk_or_version_is_refused_for_another() {
    let k = keys();
    let rec = k.seal(100, 4, b"chunk a");
    let mut as_b = rec.clone();
    as_b.chunk = 101;
    assert_eq!(k.verifier().verify(&as_b), Err(SealError::BadSignature));
    assert_eq!(k.open(&as_b), Err(SealError::BadSignature));
    assert_eq!(
        k.open_unverified_signature(&as_b),
        Err(SealError::BadCiphertext)
    );
    let mut older = rec.clone();
    older.version = 3;
    assert_eq!(k.verifier().verify(&older), Err(SealError::BadSignature));
    assert_eq!(
        k.open_unverified_signature(&older),
        Err(SealError::BadCiphertext)
    );
}

#[test]
fn another_volume_can_neither_verify_nor_open() {
    let k = keys();
    let rec = k.seal(1, 1, b"secret");
    // Another volume, and another volume of the same name.
    for other in [seeded("other", 2), seeded("vol", 3)] {
        assert_ne!(other.id(), k.id());
        assert_eq!(other.verifier().verify(&rec), Err(SealError::BadSignature));
        assert_eq!(other.open(&rec), Err(SealError::BadSignature));
        assert_eq!(
            other.open_unverified_signature(&rec),
            Err(SealError::BadCiphertext)
        );
        assert!(other.verifier().verify_batch(&[&rec]).is_err());
    }
}

#[test]
fn encode_decode_round_trip_without_copying() {
    let k = keys();
    for len in [0, 1, 300] {
        let rec = k.seal(u64::MAX, 77, &data(len));
        let blob = rec.encode();
        assert_eq!(blob.len(), RECORD_HEADER_LEN + len + SEAL_OVERHEAD);
        let back = SealedRecord::decode(blob.clone()).unwrap();
        assert_eq!(back, rec);
        // The ciphertext is a view into the blob, not a copy.
        assert_eq!(back.ciphertext.as_ptr(), blob[RECORD_HEADER_LEN..].as_ptr());
        assert_eq!(k.open(&back).as_deref(), Ok(&data(len)[..]));
    }
}

#[test]
fn every_truncation_and_extension_fails_to_decode() {
    let k = keys();
    let blob = k.seal(3, 4, b"some data").encode();
    for n in 0..blob.len() {
        assert!(
            SealedRecord::decode(blob.slice(..n)).is_err(),
            "prefix of {n}"
        );
    }
    let mut longer = blob.to_vec();
    longer.push(0);
    assert_eq!(
        SealedRecord::decode(Bytes::from(longer)),
        Err(DecodeError::Length {
            what: "record",
            len: blob.len() + 1,
            expected: blob.len()
        })
    );
    let mut other_format = blob.to_vec();
    other_format[0] = 2;
    assert_eq!(
        SealedRecord::decode(Bytes::from(other_format)),
        Err(DecodeError::Format(2))
    );
    // A length field near u64::MAX must not overflow.
    let mut huge = blob.to_vec();
    huge[RECORD_HEADER_LEN - 8..RECORD_HEADER_LEN].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(SealedRecord::decode(Bytes::from(huge)).is_err());
}

#[test]
fn from_parts_checks_lengths() {
    let k = keys();
    let rec = k.seal(6, 2, b"abc");
    let v = rec.verifier_bytes();
    assert_eq!(v.len(), VERIFIER_LEN);
    assert_eq!(&v[..24], &rec.nonce);
    assert_eq!(&v[24..], &rec.signature);
    let back = SealedRecord::from_parts(6, 2, &v, rec.ciphertext.clone()).unwrap();
    assert_eq!(back, rec);
    assert_eq!(k.open(&back).as_deref(), Ok(&b"abc"[..]));
    for n in [0, 87, 89] {
        assert!(matches!(
            SealedRecord::from_parts(6, 2, &vec![0; n], rec.ciphertext.clone()),
            Err(DecodeError::Length { len, expected: 88, .. }) if len == n
        ));
    }
    assert!(matches!(
        SealedRecord::from_parts(6, 2, &v, rec.ciphertext.slice(..15)),
        Err(DecodeError::TooShort {
            len: 15,
            min: 16,
            ..
        })
    ));
    assert!(SealedRecord::from_parts(6, 2, &v, rec.ciphertext.slice(..16)).is_ok());
}

#[test]
fn a_ciphertext_shorter_than_the_tag_is_a_decode_error_not_a_panic() {
    let k = keys();
    let mut rec = k.seal(1, 1, b"");
    rec.ciphertext = Bytes::from_static(b"short");
    assert!(matches!(
        k.verifier().verify(&rec),
        Err(SealError::Decode(_))
    ));
    assert!(matches!(k.open(&rec), Err(SealError::Decode(_))));
    assert!(matches!(
        k.open_unverified_signature(&rec),
        Err(SealError::Decode(_))
    ));
    assert!(matches!(
        k.verifier().verify_batch(&[&rec]),
        Err(SealError::Decode(_))
    ));
    assert_eq!(rec.plaintext_len(), 0);
}

#[test]
fn batch_verify_accepts_good_batches() {
    let k = keys();
    let recs: Vec<SealedRecord> = (0..16)
        .map(|i| k.seal(i, i + 1, &data(64 + i as usize)))
        .collect();
    let refs: Vec<&SealedRecord> = recs.iter().collect();
    let v = k.verifier();
    assert_eq!(v.verify_batch(&refs), Ok(()));
    assert_eq!(v.verify_batch(&[]), Ok(()));
    assert_eq!(v.verify_batch(&refs[..1]), Ok(()));
    assert!(v.verify_each(&refs).iter().all(Result::is_ok));
    assert_eq!(v.verify_each(&refs).len(), 16);
    assert!(v.verify_each(&[]).is_empty());
}

#[test]
fn verify_each_pinpoints_the_one_bad_record_among_16() {
    let k = keys();
    let v = k.verifier();
    let recs: Vec<SealedRecord> = (0..16).map(|i| k.seal(i, 1, &data(100))).collect();
    for bad in 0..16 {
        let mut batch = recs.clone();
        batch[bad] = flipped(&batch[bad], "ciphertext", 3);
        let refs: Vec<&SealedRecord> = batch.iter().collect();
        assert_eq!(v.verify_batch(&refs), Err(SealError::BadSignature));
        let results = v.verify_each(&refs);
        assert_eq!(results.len(), 16);
        for (i, r) in results.iter().enumerate() {
            if i == bad {
                assert_eq!(r, &Err(SealError::BadSignature));
            } else {
                assert_eq!(r, &Ok(()), "record {i} with the bad one at {bad}");
            }
        }
    }
    // A record of another volume in the batch is just as bad.
    let foreign = seeded("other", 9).seal(0, 1, b"x");
    let mut refs: Vec<&SealedRecord> = recs.iter().collect();
    refs[7] = &foreign;
    let results = v.verify_each(&refs);
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
    assert!(results[7].is_err());
}
