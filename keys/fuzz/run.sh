#!/usr/bin/env bash
# Fuzz canopy-keys's decoders and checks (sealed records, cookies, receipts,
# grants, key files) with cargo-fuzz (libFuzzer).
#
# usage: keys/fuzz/run.sh [SECONDS_PER_TARGET]     (default 60)
#
# Targets: record, cookie, keyfile. Each runs for SECONDS_PER_TARGET, built
# in release mode with debug assertions and overflow checks (cargo-fuzz's
# default), so an arithmetic overflow counts as a crash. The targets check
# against fixed keys (canopy_keys::fuzzing::keys, compiled only under
# cfg(fuzzing)); the seeds in seeds/<target> are valid records, cookies and
# key files made with those keys (regenerate them with
#   cargo test -p canopy-keys --lib -- --ignored write_fuzz_seeds
# after a format change), so the fuzzer starts past the signature checks.
# The corpus grown by a run lives outside the repository, in
# ${CANOPY_FUZZ_CORPUS:-$HOME/.cache/canopy/fuzz}/keys-<target>, and is
# reused by the next run. Builds go to $CARGO_TARGET_DIR/fuzz when that is
# set (else fuzz/target). A crashing input is saved under
# keys/fuzz/artifacts/<target>/ (ignored by git); replay it with
#   (cd keys && cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>)
#
# The work is scripts/fuzz-run's, shared with the other fuzz crates. Prints
# one line per target, "fuzz <target>: N runs in S s, C crashes", and
# exits 1 if any target crashed (2 on a usage error).
set -euo pipefail
secs="${1:-60}"
if ! [[ "$secs" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
fi
fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$(dirname "$fuzz_dir")")"
exec "$repo/scripts/fuzz-run" "$fuzz_dir" keys- keys.dict "$secs" record cookie keyfile
