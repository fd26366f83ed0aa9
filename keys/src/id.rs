//! The volume's global identity and the rules for volume names.

use crate::domain;
use crate::error::KeyError;
use std::fmt;
use std::str::FromStr;

/// The longest volume name, in bytes.
pub const MAX_VOLUME_NAME: usize = 64;

/// A volume's global identity: a BLAKE3 hash of its verifying key.
///
/// Signatures bind this id, never the per-hop `VOLUME_ID` of the protocol,
/// which proxies may remap. Displayed as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId(pub [u8; 32]);

impl VolumeId {
    /// The id of the volume whose verifying key is `verifying_key`.
    pub fn from_verifying_key(verifying_key: &[u8; 32]) -> Self {
        VolumeId(blake3::derive_key(domain::VOLUME_ID, verifying_key))
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::LowerHex for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(self, f)
    }
}

impl fmt::Debug for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VolumeId({self:x})")
    }
}

/// The string is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a volume id is 64 hex digits (as `canopy-keys inspect` prints it)")]
pub struct ParseVolumeIdError;

impl FromStr for VolumeId {
    type Err = ParseVolumeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut id = [0u8; 32];
        hex::decode_to_slice(s, &mut id).map_err(|_| ParseVolumeIdError)?;
        Ok(VolumeId(id))
    }
}

/// Checks a volume name: 1..=64 bytes of `[A-Za-z0-9._-]`.
///
/// The name becomes a file name (`<volume>.key`), so the alphabet keeps it
/// free of path separators, whitespace and shell metacharacters.
pub fn check_volume_name(name: &str) -> Result<(), KeyError> {
    let ok = (1..=MAX_VOLUME_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(KeyError::BadVolumeName(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_hex_round_trip() {
        let id = VolumeId::from_verifying_key(&[7; 32]);
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s, format!("{id:x}"));
        assert!(s
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(s.parse::<VolumeId>(), Ok(id));
        assert_eq!(format!("{id:?}"), format!("VolumeId({s})"));
        assert!("abc".parse::<VolumeId>().is_err());
        assert!("zz".repeat(32).parse::<VolumeId>().is_err());
    }

    #[test]
    fn id_is_the_derived_key_of_the_verifying_key() {
        let vk = [3u8; 32];
        assert_eq!(
            VolumeId::from_verifying_key(&vk).0,
            blake3::derive_key("canopy volume id v1", &vk)
        );
        assert_ne!(
            VolumeId::from_verifying_key(&vk),
            VolumeId::from_verifying_key(&[4; 32])
        );
    }

    #[test]
    fn volume_names() {
        for good in ["a", "vol-1", "A.b_c-9", &"x".repeat(64)] {
            assert!(check_volume_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            &"x".repeat(65),
            "a/b",
            "a b",
            "vol\n",
            "é",
            "../x",
            "a\0",
        ] {
            assert!(
                matches!(check_volume_name(bad), Err(KeyError::BadVolumeName(n)) if n == bad),
                "{bad:?}"
            );
        }
    }
}
