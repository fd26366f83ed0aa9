//! The binary's answers to bad input: one line on stderr, a non-zero exit,
//! never a panic. Runs on hosts without the ublk driver (the driver and
//! root checks themselves are exercised in the VM scenarios).

use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_canopy-ublk"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("run canopy-ublk");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

fn assert_refused(args: &[&str], needle: &str) {
    let (code, stderr) = run(args);
    assert_ne!(code, 0, "{args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    // The error itself is one line (clap adds a "try --help" hint after a
    // blank line for argument errors).
    let first = stderr.lines().next().unwrap_or_default();
    assert!(
        first.contains(needle),
        "{args:?}: expected '{needle}' on the first line of: {stderr}"
    );
    assert!(
        stderr.lines().nth(1).is_none_or(|l| l.is_empty()),
        "{args:?}: error spans several lines: {stderr}"
    );
}

#[test]
fn bad_sizes_and_paths_are_refused_before_touching_the_kernel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = dir.path().join("vol");
    let o = origin.to_str().expect("utf-8 path");
    assert_refused(&["add", "--origin", o, "--size", "1000"], "multiple of 512");
    assert_refused(&["add", "--origin", o, "--size", "0"], "multiple of 512");
    assert_refused(&["add", "--origin", o, "--size", "12Q"], "is not a size");
    assert_refused(
        &["add", "--origin", o, "--size", "1M", "--chunk-size", "3000"],
        "power of two",
    );
    assert_refused(
        &["add", "--origin", o, "--size", "1M", "--chunk-size", "2M"],
        "power of two",
    );
    assert_refused(&["add", "--origin", o], "does not exist");
    assert_refused(
        &["add", "--origin", o, "--size", "1M", "--cache-mem", "1K"],
        "smaller than one",
    );
    assert_refused(
        &[
            "add",
            "--origin",
            o,
            "--size",
            "1M",
            "--cache-disk",
            "nosize",
        ],
        "PATH:SIZE",
    );
    assert!(!origin.exists(), "a refused add must not create the origin");
}

#[test]
fn missing_driver_or_daemon_is_explained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = dir.path().join("vol");
    let o = o.to_str().expect("utf-8 path");
    let (code, stderr) = run(&["add", "--origin", o, "--size", "1M"]);
    assert_ne!(code, 0);
    assert!(!stderr.contains("panicked"), "{stderr}");
    if !std::path::Path::new("/dev/ublk-control").exists() {
        assert!(stderr.contains("ublk driver is not loaded"), "{stderr}");
    }
    // No daemon serves device 4000: stats says so in one line.
    assert_refused(&["stats", "--id", "4000"], "no canopy daemon answers");
}

#[test]
fn help_documents_every_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_canopy-ublk"))
        .arg("--help")
        .output()
        .expect("run --help");
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["add", "recover", "list", "del", "stats", "cache"] {
        assert!(text.contains(cmd), "--help lacks {cmd}: {text}");
    }
}

#[test]
fn config_file_stands_for_the_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("vol0.toml");
    let origin = dir.path().join("vol");
    let c = cfg.to_str().expect("utf-8 path");
    // A value from the file is checked by the same code as the flag.
    std::fs::write(&cfg, format!("origin = {:?}\nsize = \"1000\"\n", origin)).expect("write");
    assert_refused(&["add", "--config", c], "multiple of 512");
    // The same setting in the file and on the command line is refused.
    assert_refused(
        &["add", "--config", c, "--size", "1M"],
        "cannot be used multiple times",
    );
    // A misspelt key is named, with its line.
    std::fs::write(
        &cfg,
        format!("origin = {:?}\nchunk_sise = \"64K\"\n", origin),
    )
    .expect("write");
    let (code, stderr) = run(&["add", "--config", c]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("chunk_sise") && stderr.contains("line 2"),
        "{stderr}"
    );
    assert_refused(
        &["add", "--config", "/nonexistent/vol.toml"],
        "/nonexistent/vol.toml",
    );
}

#[test]
fn a_leafs_disk_tier_is_checked_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tier = dir.path().join("missing-dir/t.cache");
    let tier = format!("{}:1G", tier.display());
    let sock = format!("unix:{}", dir.path().join("s").display());
    // --no-device, so no ublk driver is needed to get as far as the node.
    assert_refused(
        &[
            "add",
            "--parent",
            "127.0.0.1:1",
            "--volume",
            "v",
            "--no-device",
            "--export-nbd",
            &sock,
            "--cache-disk",
            &tier,
        ],
        "missing-dir/t.cache",
    );
    assert_refused(
        &[
            "add",
            "--parent",
            "127.0.0.1:1",
            "--volume",
            "v",
            "--cache-disk",
            "/c/t:64K",
        ],
        "at least 1M",
    );
}
