//! Cookies, receipts and grants from arbitrary bytes. The first byte picks
//! the kind: 0 a sealed cookie (opened, then baked, checked and burnt with
//! the fixed fuzz keys); 1 a baked cookie followed by an encoded record
//! (`check_write`); 2 a receipt followed by a baked cookie
//! (`verify_receipt`); 3 a grant (`verify_grant`, `check_grant`). Nothing
//! may panic, what decodes must re-encode to the same bytes, and a write
//! that passes `check_write` must have a good record, a good cookie bound
//! to it and an unexpired one. The checks live in `canopy_keys::fuzzing`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    canopy_keys::fuzzing::cookie(data);
});
