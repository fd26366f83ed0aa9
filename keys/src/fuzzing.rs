//! The fuzz targets' bodies (`keys/fuzz/`), here so that the unit tests can
//! run the same checks over the seeds on a stable toolchain. Compiled only
//! for tests and under `cfg(fuzzing)`, never into a normal build.
//!
//! Each function takes arbitrary bytes, must never panic on them, asserts the
//! invariants that must hold for whatever decodes, and returns how far the
//! input got, so a test can check that the seeds reach the deep paths.

use crate::{
    BakedCookie, Receipt, SealedCookie, SealedRecord, SignedGrant, TrustedKeys, Verifier,
    BAKED_COOKIE_LEN, RECEIPT_LEN,
};
use bytes::Bytes;
use std::sync::OnceLock;

/// The fuzz volume's name.
pub const VOLUME: &str = "fuzz";
/// The clock the cookie target checks expiries against.
pub const NOW_MS: u64 = 1_700_000_000_000;

/// How far an input got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Depth {
    /// Refused by the decoders.
    Rejected,
    /// Decoded, but its signature (or AEAD) failed.
    Decoded,
    /// Its signature verified.
    Verified,
    /// A trusted node opened it.
    Opened,
}

/// The fixed keys every target checks against (the seeds are made with
/// them).
pub fn keys() -> &'static TrustedKeys {
    static KEYS: OnceLock<TrustedKeys> = OnceLock::new();
    KEYS.get_or_init(|| match TrustedKeys::from_seed(VOLUME, [0x5a; 32]) {
        Ok(k) => k,
        Err(e) => panic!("fuzz keys: {e}"),
    })
}

/// A fixed record of the fuzz volume, to bake opened cookies against.
pub fn fixed_record() -> &'static SealedRecord {
    static REC: OnceLock<SealedRecord> = OnceLock::new();
    REC.get_or_init(|| keys().seal(1, 1, b"fuzz"))
}

/// `SealedRecord::decode` on the input, and `SealedRecord::from_parts` on it
/// read as chunk (8, LE) ‖ version (8, LE) ‖ verifier (88) ‖ ciphertext;
/// whatever decodes is verified and opened.
pub fn record(data: &[u8]) -> Depth {
    let mut depth = Depth::Rejected;
    if let Ok(rec) = SealedRecord::decode(Bytes::copy_from_slice(data)) {
        assert_eq!(&rec.encode()[..], data, "re-encoding changed the record");
        depth = depth.max(check_record(&rec));
    }
    if let Some((head, rest)) = data.split_at_checked(16) {
        let (chunk, version) = head.split_at(8);
        let (verifier, ct) = rest.split_at(rest.len().min(crate::VERIFIER_LEN));
        if let (Ok(chunk), Ok(version)) = (chunk.try_into(), version.try_into()) {
            let (chunk, version) = (u64::from_le_bytes(chunk), u64::from_le_bytes(version));
            let parts =
                SealedRecord::from_parts(chunk, version, verifier, Bytes::copy_from_slice(ct));
            if let Ok(rec) = parts {
                assert_eq!(&rec.verifier_bytes()[..], verifier);
                assert_eq!(SealedRecord::decode(rec.encode()).as_ref(), Ok(&rec));
                depth = depth.max(check_record(&rec));
            }
        }
    }
    depth
}

fn check_record(rec: &SealedRecord) -> Depth {
    let k = keys();
    let verified = k.verifier().verify(rec).is_ok();
    assert_eq!(
        verified,
        k.verifier().verify_batch(&[rec]).is_ok(),
        "batch and single verification disagree"
    );
    let opened = k.open(rec);
    // Only this volume's keys sign, and they sign only what they sealed, so
    // a record that verifies must open.
    assert_eq!(
        opened.is_ok(),
        verified,
        "verified record did not open, or the reverse"
    );
    match opened {
        Ok(plain) => {
            assert_eq!(plain.len(), rec.plaintext_len());
            Depth::Opened
        }
        Err(_) => Depth::Decoded,
    }
}

/// The first byte picks what the rest is:
/// 0 a sealed cookie; 1 a baked cookie followed by an encoded record;
/// 2 a receipt followed by a baked cookie; 3 a grant.
pub fn cookie(data: &[u8]) -> Depth {
    let Some((&tag, rest)) = data.split_first() else {
        return Depth::Rejected;
    };
    let k = keys();
    let v = k.verifier();
    match tag % 4 {
        0 => {
            let Ok(sealed) = SealedCookie::from_bytes(rest) else {
                return Depth::Rejected;
            };
            assert_eq!(&sealed.as_bytes()[..], rest);
            let Ok(raw) = k.open_cookie(&sealed) else {
                return Depth::Decoded;
            };
            let rec = fixed_record();
            let baked = k.bake(&raw, rec);
            assert_eq!(v.verify_baked(&baked), Ok(()));
            let write = v.check_write(rec, &baked, NOW_MS);
            assert_eq!(write.is_ok(), raw.expires_ms > NOW_MS);
            assert_eq!(v.verify_receipt(&baked, &k.burn(&baked)), Ok(()));
            Depth::Opened
        }
        1 => {
            let Some(Ok(baked)) = rest.get(..BAKED_COOKIE_LEN).map(BakedCookie::decode) else {
                return Depth::Rejected;
            };
            assert_eq!(BakedCookie::decode(&baked.encode()).as_ref(), Ok(&baked));
            let baked_ok = v.verify_baked(&baked).is_ok();
            let tail = rest.get(BAKED_COOKIE_LEN..).unwrap_or_default();
            let Ok(rec) = SealedRecord::decode(Bytes::copy_from_slice(tail)) else {
                return if baked_ok {
                    Depth::Verified
                } else {
                    Depth::Decoded
                };
            };
            match v.check_write(&rec, &baked, NOW_MS) {
                Ok(()) => {
                    assert!(baked_ok && v.verify(&rec).is_ok());
                    assert!(baked.expires_ms > NOW_MS);
                    assert_eq!((baked.chunk, baked.version), (rec.chunk, rec.version));
                    Depth::Verified
                }
                Err(_) if baked_ok => Depth::Verified,
                Err(_) => Depth::Decoded,
            }
        }
        2 => {
            let Some(Ok(receipt)) = rest.get(..RECEIPT_LEN).map(Receipt::decode) else {
                return Depth::Rejected;
            };
            let tail = rest.get(RECEIPT_LEN..).unwrap_or_default();
            let Ok(baked) = BakedCookie::decode(tail) else {
                return Depth::Rejected;
            };
            assert_eq!(
                &receipt.encode()[..],
                rest.get(..RECEIPT_LEN).unwrap_or_default()
            );
            match v.verify_receipt(&baked, &receipt) {
                Ok(()) => Depth::Verified,
                Err(_) => Depth::Decoded,
            }
        }
        _ => {
            let Ok(grant) = SignedGrant::decode(rest) else {
                return Depth::Rejected;
            };
            assert_eq!(&grant.encode()[..], rest);
            // The relay's check and the trusted node's; each may pass
            // alone (a spoiled MAC or signature), and either is as deep.
            match (v.verify_grant(&grant), k.check_grant(&grant)) {
                (Ok(()), _) | (_, Ok(())) => Depth::Verified,
                _ => Depth::Decoded,
            }
        }
    }
}

/// `TrustedKeys::from_bytes` and `Verifier::from_bytes`: what parses must
/// re-encode to the same bytes, and both must agree on the volume.
pub fn keyfile(data: &[u8]) -> Depth {
    let trusted = TrustedKeys::from_bytes(data);
    let verifier = Verifier::from_bytes(data);
    if let Ok(t) = &trusted {
        assert_eq!(
            &t.to_bytes()[..],
            data,
            "re-encoding changed the trusted key file"
        );
        let Ok(v) = &verifier else {
            panic!("a trusted key file the verifier refuses");
        };
        assert_eq!((v.volume(), v.id()), (t.volume(), t.id()));
    }
    match verifier {
        Ok(v) => {
            if trusted.is_err() {
                // Either a relay file, which must round-trip, or a trusted
                // file whose secrets are inconsistent.
                if v.to_bytes() != data {
                    assert!(data.len() > v.to_bytes().len());
                }
            }
            Depth::Opened
        }
        Err(_) => {
            assert!(trusted.is_err());
            Depth::Rejected
        }
    }
}
