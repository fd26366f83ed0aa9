//! BLAKE3 `derive_key` contexts, one per kind of hashed or signed message.
//!
//! Every signature in canopy is an ed25519 signature over a 32-byte BLAKE3
//! hash made in `derive_key` mode with one of these contexts. Because the
//! contexts differ, a signature of one kind (say a grant) is a signature over
//! a hash no other kind can produce, so a relay cannot replay it as another
//! kind (say a receipt). The `v1` lets a later format change its hashing
//! without any old signature verifying under the new rules.

/// The global volume id from the verifying key.
pub(crate) const VOLUME_ID: &str = "canopy volume id v1";
/// A sealed chunk record's digest.
pub(crate) const SEALED_CHUNK: &str = "canopy sealed chunk v1";
/// What a writer signs when it bakes a cookie.
pub(crate) const BAKED_COOKIE: &str = "canopy baked cookie v1";
/// What the root signs when it burns a baked cookie (the receipt).
pub(crate) const BURNT_COOKIE: &str = "canopy burnt cookie v1";
/// A permission grant with its expiry.
pub(crate) const GRANT: &str = "canopy grant v1";
/// The key of a grant's MAC, derived from the data key (a key, not a
/// hashed message, but a context all the same, and distinct).
pub(crate) const GRANT_MAC_KEY: &str = "canopy grant mac key v1";

/// All of the above, for the test that they are distinct.
#[cfg(test)]
pub(crate) const ALL: [&str; 6] = [
    VOLUME_ID,
    SEALED_CHUNK,
    BAKED_COOKIE,
    BURNT_COOKIE,
    GRANT,
    GRANT_MAC_KEY,
];

#[cfg(test)]
mod tests {
    use super::ALL;
    use std::collections::HashSet;

    #[test]
    fn contexts_are_distinct() {
        let set: HashSet<_> = ALL.iter().collect();
        assert_eq!(set.len(), ALL.len());
    }
}
