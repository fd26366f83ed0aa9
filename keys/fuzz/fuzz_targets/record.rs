//! Decodes arbitrary bytes as a sealed chunk record, both as a relay cache's
//! blob (`SealedRecord::decode`) and as a message's chunk, version, verifier
//! and data (`SealedRecord::from_parts`), then verifies and opens it with the
//! fixed fuzz keys. Nothing may panic; whatever decodes must re-encode to the
//! same bytes; batch and single verification must agree; and a record opens
//! exactly when its signature verifies. The checks live in
//! `canopy_keys::fuzzing`, where the unit tests run them over the seeds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    canopy_keys::fuzzing::record(data);
});
