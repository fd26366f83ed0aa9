//! The fuzz seeds in `keys/fuzz/seeds/` must stay valid as formats change,
//! or the fuzzer would start from nothing past the decoders. This runs every
//! seed through its target's checks and asserts how deep it gets.
//!
//! Regenerate them with
//! `cargo test -p canopy-keys --lib -- --ignored write_fuzz_seeds`.

use crate::fuzzing::{self, Depth, NOW_MS};
use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

fn seeds_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds")
}

/// Every seed: target, file name, bytes, and the depth it must reach.
fn make_seeds() -> Vec<(&'static str, &'static str, Vec<u8>, Depth)> {
    let k = fuzzing::keys();
    let cat = |parts: &[&[u8]]| parts.concat();

    let rec = k.seal(5, 3, b"hello, fuzzer");
    let empty = k.seal(0, 0, b"");
    let parts = k.seal(7, 2, b"parts");
    let write = k.seal(9, 4, b"a write");
    let raw = k.open_cookie(&k.issue_cookie(NOW_MS + 60_000)).unwrap();
    let baked = k.bake(&raw, &write);
    let receipt = k.burn(&baked);
    let grant = k.sign_grant(9, 4, 2, NOW_MS + 60_000);

    vec![
        ("record", "encoded", rec.encode().to_vec(), Depth::Opened),
        (
            "record",
            "encoded_empty",
            empty.encode().to_vec(),
            Depth::Opened,
        ),
        (
            "record",
            "parts",
            cat(&[
                &parts.chunk.to_le_bytes(),
                &parts.version.to_le_bytes(),
                &parts.verifier_bytes(),
                &parts.ciphertext,
            ]),
            Depth::Opened,
        ),
        (
            "cookie",
            "sealed",
            cat(&[&[0], k.issue_cookie(NOW_MS + 60_000).as_bytes()]),
            Depth::Opened,
        ),
        (
            "cookie",
            "sealed_expired",
            cat(&[&[0], k.issue_cookie(NOW_MS - 1).as_bytes()]),
            Depth::Opened,
        ),
        (
            "cookie",
            "write",
            cat(&[&[1], &baked.encode(), &write.encode()]),
            Depth::Verified,
        ),
        (
            "cookie",
            "receipt",
            cat(&[&[2], &receipt.encode(), &baked.encode()]),
            Depth::Verified,
        ),
        (
            "cookie",
            "grant",
            cat(&[&[3], &grant.encode()]),
            Depth::Verified,
        ),
        ("keyfile", "trusted", k.to_bytes().to_vec(), Depth::Opened),
        ("keyfile", "relay", k.verifier().to_bytes(), Depth::Opened),
    ]
}

fn run(target: &str, data: &[u8]) -> Depth {
    match target {
        "record" => fuzzing::record(data),
        "cookie" => fuzzing::cookie(data),
        _ => fuzzing::keyfile(data),
    }
}

#[test]
fn made_seeds_reach_the_deep_paths() {
    for (target, name, bytes, depth) in make_seeds() {
        assert_eq!(run(target, &bytes), depth, "{target}/{name}");
    }
}

#[test]
fn committed_seeds_are_valid() {
    let expected: BTreeMap<(String, String), Depth> = make_seeds()
        .into_iter()
        .map(|(t, n, _, d)| ((t.to_owned(), n.to_owned()), d))
        .collect();
    let mut found = BTreeMap::new();
    for target in ["record", "cookie", "keyfile"] {
        for entry in fs::read_dir(seeds_dir().join(target)).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            let bytes = fs::read(entry.path()).unwrap();
            found.insert((target.to_owned(), name), run(target, &bytes));
        }
    }
    assert_eq!(
        found, expected,
        "regenerate with: cargo test -p canopy-keys --lib -- --ignored write_fuzz_seeds"
    );
}

#[test]
#[ignore = "writes keys/fuzz/seeds; run by hand after a format change"]
fn write_fuzz_seeds() {
    for (target, name, bytes, _) in make_seeds() {
        let dir = seeds_dir().join(target);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), bytes).unwrap();
    }
}

mod random {
    use super::run;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn targets_never_panic(
            target in prop::sample::select(vec!["record", "cookie", "keyfile"]),
            data in proptest::collection::vec(any::<u8>(), 0..400),
        ) {
            run(target, &data);
        }
    }
}
