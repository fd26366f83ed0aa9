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
# Prints one line per target, "fuzz <target>: N runs in S s, C crashes", and
# exits 1 if any target crashed (2 on a usage error).
set -euo pipefail

secs="${1:-60}"
if ! [[ "$secs" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
fi

fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
crate_dir="$(dirname "$fuzz_dir")"
corpus_root="${CANOPY_FUZZ_CORPUS:-$HOME/.cache/canopy/fuzz}"
targets=(session)
target_dir=()
if [[ -n "${CARGO_TARGET_DIR:-}" ]]; then
    target_dir=(--target-dir "$CARGO_TARGET_DIR/fuzz")
fi

# libFuzzer instrumentation needs nightly rustc; it cannot be fetched here, so
# say so plainly rather than fail inside cargo.
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: the nightly toolchain is required (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

# Build once up front so build time is not counted against the first target
# and a build failure is reported as such, not as a crash.
if ! build_log="$(cd "$crate_dir" && cargo +nightly fuzz build --fuzz-dir "$fuzz_dir" "${target_dir[@]}" 2>&1)"; then
    echo "$build_log" >&2
    echo "fuzz: build failed" >&2
    exit 1
fi

status=0
for t in "${targets[@]}"; do
    corpus="$corpus_root/nbd-$t"
    artifacts="$fuzz_dir/artifacts/$t" # where cargo-fuzz has libFuzzer save crashes
    mkdir -p "$corpus" "$artifacts"
    log="$(mktemp "${TMPDIR:-/tmp}/canopy-fuzz-nbd-$t.XXXXXX.log")"
    before="$(find "$artifacts" -type f | wc -l)"

    start="$(date +%s)"
    rc=0
    # The first corpus directory receives new inputs; the seeds are read only.
    (cd "$crate_dir" && cargo +nightly fuzz run --fuzz-dir "$fuzz_dir" "${target_dir[@]}" "$t" \
        "$corpus" "$fuzz_dir/seeds/$t" -- \
        -max_total_time="$secs" -dict="$fuzz_dir/nbd.dict" \
        -malloc_limit_mb=64 -print_final_stats=1) >"$log" 2>&1 || rc=$?
    elapsed=$(($(date +%s) - start))

    # libFuzzer ends a clean run with "Done N runs in S second(s)"; after a
    # crash the last status line ("#N ...") or the final stats give the count.
    runs="$(grep -oE '^Done [0-9]+ runs' "$log" | tail -n1 | awk '{print $2}' || true)"
    if [[ -z "$runs" ]]; then
        runs="$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | tail -n1 | grep -oE '[0-9]+$' || true)"
    fi
    if [[ -z "$runs" ]]; then
        runs="$(grep -oE '^#[0-9]+' "$log" | tail -n1 | tr -d '#' || true)"
    fi
    crashes=$(($(find "$artifacts" -type f | wc -l) - before))
    if [[ $rc -ne 0 && $crashes -eq 0 ]]; then
        crashes=1 # failed without leaving an artifact (e.g. out of memory)
    fi

    echo "fuzz $t: ${runs:-?} runs in $elapsed s, $crashes crashes"
    if [[ $rc -ne 0 ]]; then
        status=1
        echo "fuzz $t: exit code $rc; full log: $log" >&2
        # The panic message, the sanitizer's verdict and the saved input.
        {
            grep -m1 -A1 "panicked at" "$log" || true
            grep -E "ERROR: libFuzzer|SUMMARY:|Test unit written" "$log" || tail -n 20 "$log"
        } >&2
    else
        rm -f "$log"
    fi
done
exit "$status"
