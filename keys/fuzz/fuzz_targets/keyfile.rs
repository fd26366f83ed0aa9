//! Parses arbitrary bytes as a key file, trusted (`TrustedKeys::from_bytes`)
//! and relay (`Verifier::from_bytes`). Nothing may panic, a file that parses
//! must re-encode to the same bytes, and the two parsers must agree on the
//! volume. The checks live in `canopy_keys::fuzzing`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    canopy_keys::fuzzing::keyfile(data);
});
