//! Unit tests that need the deterministic test keys ([`TrustedKeys::from_seed`]).

mod aead;
mod cookies;
mod fuzz_seeds;
mod records;
mod secrets;

use crate::TrustedKeys;

/// The test volume's keys.
pub(crate) fn keys() -> TrustedKeys {
    seeded("vol", 1)
}

/// Keys of a volume of the given name, from a seed of one repeated byte.
pub(crate) fn seeded(volume: &str, seed: u8) -> TrustedKeys {
    match TrustedKeys::from_seed(volume, [seed; 32]) {
        Ok(k) => k,
        Err(e) => panic!("test keys: {e}"),
    }
}

/// Flips bit `bit` of `bytes`.
pub(crate) fn flip(bytes: &mut [u8], bit: usize) {
    bytes[bit / 8] ^= 1 << (bit % 8);
}
