#!/usr/bin/env bash
# Fuzz canopy-proto's decoder and stream framing with cargo-fuzz (libFuzzer).
#
# usage: proto/fuzz/run.sh [SECONDS_PER_TARGET]     (default 60)
#
# Each target runs for SECONDS_PER_TARGET, built in release mode with debug
# assertions and overflow checks (cargo-fuzz's default), so an arithmetic
# overflow counts as a crash. The corpus grown by a run lives outside the
# repository, in ${CANOPY_FUZZ_CORPUS:-$HOME/.cache/canopy/fuzz}/<target>,
# and is reused by the next run; the small hand-made seeds in seeds/<target>
# (valid messages of every opcode) and the dictionary proto.dict get a fresh
# corpus past the header quickly. A crashing input is saved under
# proto/fuzz/artifacts/<target>/ (ignored by git); replay it with
#   (cd proto && cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>)
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
exec "$repo/scripts/fuzz-run" "$fuzz_dir" "" proto.dict "$secs" decode frame
