//! canopy's volume keys: key files, sealed chunk records, signatures,
//! cookies and grants.
//!
//! A volume has three keys, made once by `canopy-keys new`:
//! - a **data key** (XChaCha20-Poly1305) that encrypts every chunk,
//! - an ed25519 **signing key** that signs every sealed chunk, cookie,
//!   receipt and grant,
//! - the matching **verifying key**, which is public; a BLAKE3 hash of it is
//!   the volume's global [`VolumeId`].
//!
//! Trusted nodes hold all three ([`TrustedKeys`]). Untrusted relays hold only
//! the verifying key ([`Verifier`]): they can check that a record, a baked
//! cookie, a receipt or a grant is genuine, but cannot read data, forge a
//! record, bake or burn a cookie, or sign a grant. Those operations simply do
//! not exist on [`Verifier`].
//!
//! Every signed message is a BLAKE3 hash made in `derive_key` mode under its
//! own context string and including the volume id, so no signature verifies
//! as another kind of message or for another volume.
//!
//! Nothing here panics on input from a file or the network: decoders return
//! [`DecodeError`], [`KeyError`], [`SealError`] or [`CookieError`].
#![warn(missing_docs)]

mod aead;
mod cookie;
mod domain;
mod error;
#[cfg(any(test, fuzzing))]
pub mod fuzzing;
mod grant;
mod id;
mod keyfile;
mod record;
mod trusted;
mod verifier;

#[cfg(test)]
mod tests;

pub use cookie::{
    BakedCookie, RawCookie, Receipt, SealedCookie, BAKED_COOKIE_LEN, COOKIE_VALUE_LEN, RECEIPT_LEN,
    SEALED_COOKIE_LEN,
};
pub use error::{CookieError, DecodeError, KeyError, SealError};
pub use grant::{SignedGrant, GRANT_LEN, GRANT_MAC_LEN};
pub use id::{check_volume_name, ParseVolumeIdError, VolumeId, MAX_VOLUME_NAME};
pub use keyfile::{inspect, write_new, KeyFileInfo, KeyFileKind, FORMAT, MAGIC};
pub use record::{
    SealedRecord, NONCE_LEN, RECORD_FORMAT, RECORD_HEADER_LEN, SEAL_OVERHEAD, SIGNATURE_LEN,
    VERIFIER_LEN,
};
pub use trusted::TrustedKeys;
pub use verifier::Verifier;
