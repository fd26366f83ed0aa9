//! The `canopy-keys` binary, run as an operator would run it.

use canopy_keys::TrustedKeys;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn canopy_keys(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_canopy-keys"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

/// Runs `canopy-keys new` and returns the two paths.
fn new(dir: &Path, volume: &str) -> (String, String) {
    let out = canopy_keys(&["new", "--volume", volume, "--out", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    (
        dir.join(format!("{volume}.key")).display().to_string(),
        dir.join(format!("{volume}.verify")).display().to_string(),
    )
}

/// A failed run: non-zero exit, nothing on stdout, one line on stderr.
fn fails(o: &Output) -> String {
    assert!(!o.status.success());
    assert_ne!(o.status.code(), Some(0));
    assert_eq!(stdout(o), "");
    let err = stderr(o);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    err
}

#[test]
fn new_writes_both_files_and_says_where_they_go() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    let out = canopy_keys(&["new", "--volume", "data", "--out", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let key = dir.join("data.key");
    let verify = dir.join("data.verify");
    let keys = TrustedKeys::load(&key).unwrap();
    assert!(text.contains(&key.display().to_string()), "{text}");
    assert!(text.contains(&verify.display().to_string()), "{text}");
    assert!(text.contains(&keys.id().to_string()), "{text}");
    let advice = text.lines().find(|l| l.contains("--keys")).unwrap();
    assert!(
        advice.contains("trusted") && advice.contains("data.key"),
        "{advice}"
    );
    assert!(
        advice.contains("--verify-key") && advice.contains("data.verify"),
        "{advice}"
    );
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn inspect_shows_both_files_without_secrets() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, verify) = new(tmp.path(), "vol");
    let keys = TrustedKeys::load(Path::new(&key)).unwrap();
    // The secrets, read through the library: the key file's bytes after the
    // header (11), the name and the verifying key (32).
    let bytes = keys.to_bytes();
    let at = 11 + "vol".len() + 32;
    let secrets = [&bytes[at..at + 32], &bytes[at + 32..at + 64]];
    let vk = hex::encode(keys.verifier().verifying_key_bytes());

    for (file, kind, holds) in [
        (
            &key,
            "trusted key file",
            "data key, signing key, verifying key",
        ),
        (&verify, "relay verify file", "verifying key only"),
    ] {
        for args in [
            vec!["inspect", file],
            vec!["inspect", file, "--volume", "vol"],
        ] {
            let out = canopy_keys(&args);
            assert!(out.status.success(), "{}", stderr(&out));
            let text = stdout(&out);
            assert!(text.contains(kind), "{text}");
            assert!(text.contains(holds), "{text}");
            assert!(text.contains("vol"), "{text}");
            assert!(text.contains(&keys.id().to_string()), "{text}");
            assert!(text.contains(&vk), "{text}");
            for secret in secrets {
                // Not the whole secret, nor any 8 bytes of it, in any case.
                let lower = text.to_lowercase();
                for window in secret.windows(8) {
                    assert!(!lower.contains(&hex::encode(window)), "{text}");
                }
            }
        }
    }
}

#[test]
fn new_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, _) = new(tmp.path(), "vol");
    let before = fs::read(&key).unwrap();
    let out = canopy_keys(&[
        "new",
        "--volume",
        "vol",
        "--out",
        tmp.path().to_str().unwrap(),
    ]);
    let err = fails(&out);
    assert!(
        err.contains(&key) && err.contains("already exists"),
        "{err}"
    );
    assert_eq!(fs::read(&key).unwrap(), before);
}

#[test]
fn inspect_with_another_volume_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, verify) = new(tmp.path(), "alpha");
    for file in [&key, &verify] {
        let err = fails(&canopy_keys(&["inspect", file, "--volume", "beta"]));
        assert!(
            err.contains("\"alpha\"") && err.contains("\"beta\""),
            "{err}"
        );
        assert!(err.contains(file.as_str()), "{err}");
    }
}

#[test]
fn inspect_refuses_a_trusted_file_others_can_read() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, verify) = new(tmp.path(), "vol");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let err = fails(&canopy_keys(&["inspect", &key]));
    assert!(err.contains("0644"), "{err}");
    assert!(err.contains(&format!("chmod 600 {key}")), "{err}");
    // The relay file may be world-readable.
    fs::set_permissions(&verify, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(canopy_keys(&["inspect", &verify]).status.success());
}

#[test]
fn inspect_refuses_damaged_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, _) = new(tmp.path(), "vol");
    let full = fs::read(&key).unwrap();
    let bad = tmp.path().join("bad.key");
    let bad_str = bad.display().to_string();
    let cases: [(&str, Vec<u8>); 5] = [
        ("truncated", full[..full.len() / 2].to_vec()),
        ("truncated", Vec::new()),
        ("corrupted", {
            let mut b = full.clone();
            b[50] ^= 4;
            b
        }),
        (
            "not a canopy key file",
            b"-----BEGIN PRIVATE KEY-----".to_vec(),
        ),
        ("format 7", {
            let mut b = full.clone();
            b[8] = 7;
            b
        }),
    ];
    for (what, bytes) in cases {
        let _ = fs::remove_file(&bad);
        fs::write(&bad, bytes).unwrap();
        fs::set_permissions(&bad, fs::Permissions::from_mode(0o600)).unwrap();
        let err = fails(&canopy_keys(&["inspect", &bad_str]));
        assert!(
            err.contains(what) && err.contains(&bad_str),
            "{what}: {err}"
        );
    }
    let err = fails(&canopy_keys(&[
        "inspect",
        &tmp.path().join("missing").display().to_string(),
    ]));
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn every_command_has_help() {
    for args in [&["--help"][..], &["new", "--help"], &["inspect", "--help"]] {
        let out = canopy_keys(args);
        assert!(out.status.success());
        let text = stdout(&out);
        assert!(text.contains("Usage: canopy-keys"), "{text}");
    }
    let new = stdout(&canopy_keys(&["new", "--help"]));
    assert!(
        new.contains("--volume <NAME>") && new.contains("--out <DIR>"),
        "{new}"
    );
    assert!(
        new.contains("0600") && new.contains("Refuses to overwrite"),
        "{new}"
    );
    let inspect = stdout(&canopy_keys(&["inspect", "--help"]));
    assert!(
        inspect.contains("<FILE>") && inspect.contains("--volume <NAME>"),
        "{inspect}"
    );
    // A usage error is clap's exit code 2, not a crash.
    assert_eq!(canopy_keys(&["new"]).status.code(), Some(2));
    let bad_name = fails(&canopy_keys(&[
        "new",
        "--volume",
        "a/b",
        "--out",
        "/nonexistent",
    ]));
    assert!(bad_name.contains("invalid volume name"), "{bad_name}");
}
