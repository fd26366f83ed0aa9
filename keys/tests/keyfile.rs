//! Key files on disk: writing, loading, and refusing every bad file with an
//! error that names it.

use canopy_keys::{inspect, write_new, KeyError, KeyFileKind, TrustedKeys, Verifier};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn new_volume(dir: &Path, volume: &str) -> (TrustedKeys, PathBuf, PathBuf) {
    let keys = TrustedKeys::generate(volume).unwrap();
    let (key, verify) = write_new(dir, &keys).unwrap();
    (keys, key, verify)
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn set_mode(p: &Path, m: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
}

#[test]
fn write_new_then_load_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");
    let (keys, key, verify) = new_volume(&dir, "vol-1");
    assert_eq!(key, dir.join("vol-1.key"));
    assert_eq!(verify, dir.join("vol-1.verify"));
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&dir), 0o700);

    let loaded = TrustedKeys::load(&key).unwrap();
    assert_eq!(loaded.volume(), "vol-1");
    assert_eq!(loaded.id(), keys.id());
    assert_eq!(*loaded.to_bytes(), *keys.to_bytes());
    let loaded = TrustedKeys::load_for(&key, "vol-1").unwrap();
    // The loaded keys open what the generated ones sealed.
    let rec = keys.seal(3, 1, b"data");
    assert_eq!(&loaded.open(&rec).unwrap()[..], b"data");

    for path in [&verify, &key] {
        let relay = Verifier::load_for(path, "vol-1").unwrap();
        assert_eq!(relay.id(), keys.id());
        assert_eq!(relay.verify(&rec), Ok(()));
    }
    assert_eq!(fs::read(&verify).unwrap(), keys.verifier().to_bytes());
}

#[test]
fn the_relay_file_is_world_readable_and_needs_no_permission_check() {
    let tmp = tempfile::tempdir().unwrap();
    let (keys, _, verify) = new_volume(tmp.path(), "vol");
    // 0644 unless the umask removes more.
    assert_eq!(mode(&verify) & !0o644, 0);
    set_mode(&verify, 0o666);
    assert_eq!(Verifier::load(&verify).unwrap().id(), keys.id());
}

#[test]
fn refuses_to_overwrite_either_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, key, verify) = new_volume(tmp.path(), "vol");
    let again = TrustedKeys::generate("vol").unwrap();
    match write_new(tmp.path(), &again) {
        Err(e @ KeyError::AlreadyExists(_)) => {
            assert!(e.to_string().contains(&key.display().to_string()), "{e}");
        }
        other => panic!("{other:?}"),
    }

    // Only the verify file exists: nothing is written, not even the key file.
    fs::remove_file(&key).unwrap();
    let before = fs::read(&verify).unwrap();
    match write_new(tmp.path(), &again) {
        Err(KeyError::AlreadyExists(p)) => assert_eq!(p, verify),
        other => panic!("{other:?}"),
    }
    assert!(!key.exists(), "the key file was written before the check");
    assert_eq!(fs::read(&verify).unwrap(), before);

    // Only the key file exists.
    fs::remove_file(&verify).unwrap();
    fs::write(&key, b"precious").unwrap();
    match write_new(tmp.path(), &again) {
        Err(KeyError::AlreadyExists(p)) => assert_eq!(p, key),
        other => panic!("{other:?}"),
    }
    assert_eq!(fs::read(&key).unwrap(), b"precious");
    assert!(!verify.exists());
}

#[test]
fn a_group_readable_trusted_file_is_refused_with_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, key, _) = new_volume(tmp.path(), "vol");
    for bad in [0o640, 0o604, 0o660, 0o602, 0o610] {
        set_mode(&key, bad);
        for err in [
            TrustedKeys::load(&key).unwrap_err(),
            Verifier::load(&key).unwrap_err(),
            inspect(&key).unwrap_err(),
        ] {
            assert!(matches!(err, KeyError::Permissions { mode, .. } if mode == bad));
            let msg = err.to_string();
            assert!(msg.contains(&format!("{bad:04o}")), "{msg}");
            assert!(
                msg.contains(&format!("chmod 600 {}", key.display())),
                "{msg}"
            );
        }
    }
    set_mode(&key, 0o400);
    assert!(TrustedKeys::load(&key).is_ok());
}

#[test]
fn every_truncation_is_refused_as_truncated() {
    let tmp = tempfile::tempdir().unwrap();
    let (keys, key, verify) = new_volume(tmp.path(), "vol");
    for (path, full) in [
        (&key, keys.to_bytes().to_vec()),
        (&verify, keys.verifier().to_bytes()),
    ] {
        let cut = tmp.path().join("cut");
        for n in 0..full.len() {
            let _ = fs::remove_file(&cut);
            fs::write(&cut, &full[..n]).unwrap();
            set_mode(&cut, 0o600);
            for err in [
                TrustedKeys::load(&cut).unwrap_err(),
                Verifier::load(&cut).unwrap_err(),
            ] {
                match &err {
                    KeyError::Truncated {
                        path,
                        len,
                        expected,
                    } => {
                        assert_eq!((path, *len), (&cut, n));
                        assert!(*expected > n);
                    }
                    other => panic!("{} prefix {n}: {other:?}", path.display()),
                }
                assert!(err.to_string().contains(&cut.display().to_string()));
            }
        }
    }
}

#[test]
fn a_flipped_byte_is_a_bad_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    let (keys, _, _) = new_volume(tmp.path(), "vol");
    let full = keys.to_bytes().to_vec();
    // Every byte past the header (magic, format, kind, name length), where a
    // flip can only be caught by the checksum.
    for i in 11..full.len() {
        let mut bad = full.clone();
        bad[i] ^= 0x10;
        assert!(
            matches!(
                TrustedKeys::from_bytes(&bad),
                Err(KeyError::BadChecksum { .. })
            ),
            "byte {i}"
        );
    }
    let path = tmp.path().join("flipped.key");
    let mut bad = full.clone();
    bad[40] ^= 1;
    fs::write(&path, &bad).unwrap();
    set_mode(&path, 0o600);
    let err = TrustedKeys::load(&path).unwrap_err();
    assert!(matches!(err, KeyError::BadChecksum { .. }));
    assert!(err.to_string().contains(&path.display().to_string()));
}

#[test]
fn header_damage_has_its_own_errors() {
    let keys = TrustedKeys::generate("vol").unwrap();
    let full = keys.to_bytes().to_vec();
    let mut bad = full.clone();
    bad[0] = b'X';
    assert!(matches!(
        TrustedKeys::from_bytes(&bad),
        Err(KeyError::BadMagic { .. })
    ));
    assert!(matches!(
        TrustedKeys::from_bytes(b"hello"),
        Err(KeyError::BadMagic { .. })
    ));
    assert!(matches!(
        TrustedKeys::from_bytes(&[b"CANOPYKY", &[0xff; 40][..]].concat()),
        Err(KeyError::UnknownFormat { version: 0xff, .. })
    ));
    let mut bad = full.clone();
    bad[8] = 2;
    let err = TrustedKeys::from_bytes(&bad).unwrap_err();
    assert!(matches!(err, KeyError::UnknownFormat { version: 2, .. }));
    assert!(err.to_string().contains("format 2"), "{err}");
    // A kind byte changed to the other kind, or to none.
    for kind in [2, 3] {
        let mut bad = full.clone();
        bad[9] = kind;
        assert!(matches!(
            TrustedKeys::from_bytes(&bad),
            Err(KeyError::BadChecksum { .. })
        ));
    }
}

/// Re-seals a hand-edited key file with a valid checksum.
fn with_checksum(mut body: Vec<u8>) -> Vec<u8> {
    let sum = blake3::hash(&body);
    body.extend_from_slice(sum.as_bytes());
    body
}

#[test]
fn consistent_but_wrong_files_are_malformed() {
    let keys = TrustedKeys::generate("vol").unwrap();
    let full = keys.to_bytes().to_vec();
    let body = &full[..full.len() - 32];
    let malformed = |bytes: Vec<u8>| match TrustedKeys::from_bytes(&bytes) {
        Err(KeyError::Malformed { reason, .. }) => reason,
        other => panic!("{other:?}"),
    };
    // The signing key of another volume beside this verifying key.
    let mut mixed = body.to_vec();
    let seed_at = 11 + 3 + 32;
    mixed[seed_at] ^= 1;
    assert_eq!(
        malformed(with_checksum(mixed)),
        "the signing key does not match the verifying key"
    );
    let mut kind = body.to_vec();
    kind[9] = 9;
    assert_eq!(malformed(with_checksum(kind)), "unknown kind of key file");
    let mut name = body.to_vec();
    name[11] = b'/';
    assert_eq!(malformed(with_checksum(name)), "bad volume name");
    let mut longer = body.to_vec();
    longer.push(0);
    assert_eq!(
        malformed(with_checksum(longer)),
        "its length does not match its kind"
    );
}

#[test]
fn a_relay_file_is_not_a_trusted_key_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, _, verify) = new_volume(tmp.path(), "vol");
    let err = TrustedKeys::load(&verify).unwrap_err();
    assert!(matches!(&err, KeyError::NotTrusted(p) if *p == verify));
    let msg = err.to_string();
    assert!(msg.contains("holds only the verifying key"), "{msg}");
    assert!(
        msg.contains("trusted nodes need the trusted key file"),
        "{msg}"
    );
    assert!(msg.contains(&verify.display().to_string()), "{msg}");
    assert!(matches!(
        TrustedKeys::from_bytes(&fs::read(&verify).unwrap()),
        Err(KeyError::NotTrusted(_))
    ));
}

#[test]
fn load_for_another_volume_is_wrong_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, key, verify) = new_volume(tmp.path(), "alpha");
    for err in [
        TrustedKeys::load_for(&key, "beta").unwrap_err(),
        Verifier::load_for(&verify, "beta").unwrap_err(),
        Verifier::load_for(&key, "beta").unwrap_err(),
    ] {
        match &err {
            KeyError::WrongVolume {
                found, expected, ..
            } => {
                assert_eq!((found.as_str(), expected.as_str()), ("alpha", "beta"));
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("\"alpha\""));
    }
}

#[test]
fn bad_volume_names_are_refused() {
    for bad in ["", "a/b", "a b", &"v".repeat(65)] {
        assert!(matches!(
            TrustedKeys::generate(bad),
            Err(KeyError::BadVolumeName(_))
        ));
    }
    let name = "V".repeat(64);
    let tmp = tempfile::tempdir().unwrap();
    let (_, key, _) = new_volume(tmp.path(), &name);
    assert_eq!(TrustedKeys::load(&key).unwrap().volume(), name);
}

#[test]
fn inspect_describes_both_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (keys, key, verify) = new_volume(tmp.path(), "vol");
    let a = inspect(&key).unwrap();
    let b = inspect(&verify).unwrap();
    assert_eq!(a.kind, KeyFileKind::Trusted);
    assert_eq!(b.kind, KeyFileKind::Relay);
    for info in [&a, &b] {
        assert_eq!(info.volume, "vol");
        assert_eq!(info.id, keys.id());
        assert_eq!(info.verifying_key, keys.verifier().verifying_key_bytes());
    }
    assert_eq!(a.kind.holds(), "data key, signing key, verifying key");
    assert_eq!(b.kind.holds(), "verifying key only");
}

#[test]
fn missing_files_and_directories_name_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope.key");
    let err = TrustedKeys::load(&missing).unwrap_err();
    assert!(matches!(err, KeyError::Io { .. }));
    assert!(err.to_string().contains(&missing.display().to_string()));
    // A file where the output directory should be.
    let file = tmp.path().join("file");
    fs::write(&file, b"").unwrap();
    let err = write_new(&file, &TrustedKeys::generate("vol").unwrap()).unwrap_err();
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err}"
    );
}
