#!/usr/bin/env bash
# Fuzz canopy-ublk's NBD server (option and request decoding behind the
# real handshake and request framing) with cargo-fuzz (libFuzzer).
#
# usage: ublk-target/fuzz/run.sh [SECONDS_PER_TARGET]     (default 60)
#
# Built in release mode with debug assertions and overflow checks
# (cargo-fuzz's default), so an arithmetic overflow counts as a crash. Any
# single allocation above 64 MiB counts as one too (-malloc_limit_mb): the
# server must never allocate what a client merely claims. The corpus grown
# by a run lives outside the repository, in
# ${CANOPY_FUZZ_CORPUS:-$HOME/.cache/canopy/fuzz}/nbd-<target>, and is
# reused by the next run; the hand-made seeds in seeds/<target> (whole
# sessions: handshakes of each kind followed by requests of every command)
# and the dictionary nbd.dict get a fresh corpus past the magics quickly.
# Builds go to $CARGO_TARGET_DIR/fuzz when that is set (else fuzz/target).
# A crashing input is saved under ublk-target/fuzz/artifacts/<target>/
# (ignored by git); replay it with
#   (cd ublk-target && cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>)
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
# -malloc_limit_mb: the server must never allocate what a client merely claims.
exec "$repo/scripts/fuzz-run" "$fuzz_dir" nbd- nbd.dict "$secs" session -- -malloc_limit_mb=64
