//! What can be tested of keeping secrets secret: types that wipe themselves,
//! and `Debug` output without secrets.

use super::keys;
use crate::{RawCookie, TrustedKeys};
use zeroize::{ZeroizeOnDrop, Zeroizing};

fn wipes_on_drop<T: ZeroizeOnDrop>() {}
fn shareable<T: Send + Sync>() {}

#[test]
fn secret_types_wipe_themselves() {
    wipes_on_drop::<TrustedKeys>();
    wipes_on_drop::<RawCookie>();
    wipes_on_drop::<ed25519_dalek::SigningKey>();
    let _: Zeroizing<Vec<u8>> = keys().to_bytes();
    // Nodes share one copy behind an Arc rather than cloning secrets.
    shareable::<TrustedKeys>();
    shareable::<crate::Verifier>();
}

/// The hex of the signing key seed and the data key, read from the key file
/// encoding: magic 8, format, kind, name length, name, verifying key 32,
/// seed 32, data key 32.
pub(crate) fn secret_hex(k: &TrustedKeys) -> [String; 2] {
    let bytes = k.to_bytes();
    let at = 11 + k.volume().len() + 32;
    [
        hex::encode(&bytes[at..at + 32]),
        hex::encode(&bytes[at + 32..at + 64]),
    ]
}

#[test]
fn debug_shows_no_secrets() {
    let k = keys();
    let shown = format!("{k:?} {k:#?} {:?}", k.verifier());
    assert!(shown.contains("vol"));
    assert!(shown.contains(&k.id().to_string()));
    for secret in secret_hex(&k) {
        // Any 8 bytes of a secret would be too many.
        for window in secret.as_bytes().chunks(16) {
            let w = std::str::from_utf8(window).unwrap();
            assert!(!shown.contains(w), "{shown}");
        }
    }
    let raw = k.open_cookie(&k.issue_cookie(5)).unwrap();
    let shown = format!("{raw:?}");
    assert!(!shown.contains(&hex::encode(raw.value)), "{shown}");
    assert!(shown.contains("expires_ms: 5"));
}
