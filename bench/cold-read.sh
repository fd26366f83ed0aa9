#!/usr/bin/env bash
# Cold-read throughput, side by side in one run: canopy (a leaf reading
# through a proxy from a root, one process, loopback TCP; the
# peerd/examples/cold_read.rs example) against fio's nbd engine reading the
# same file from nbdkit's file plugin over loopback TCP. Same block size
# (64K), same depth (8), every block read once, page cache dropped before
# every run. Two rounds, alternating the two, for sequential and random
# order; prints a markdown table with the ratio canopy/nbdkit per round and
# the median.
#
#   bench/cold-read.sh            # 1G file
#   bench/cold-read.sh 512M       # another size (M or G suffix)
#
# Ratios only mean something within one run. Note the root reads its origin
# with O_DIRECT while nbdkit's file plugin reads through the page cache (with
# kernel readahead); dropping caches makes both start cold, not equal.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
size=${1:-1G}
case $size in
  *G) mib=$((${size%G} * 1024)) ;;
  *M) mib=${size%M} ;;
  *) echo "cold-read: size must end in M or G: $size" >&2; exit 1 ;;
esac
rounds=${CANOPY_BENCH_ROUNDS:-2}
bs=64k depth=8
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/target-bench}
file=${TMPDIR:-/tmp}/canopy-cold-read.img
work=$(mktemp -d "${TMPDIR:-/tmp}/cold-read.XXXXXX")
trap 'rm -rf "$work" "$file"' EXIT

"$repo/scripts/install-deps" nbdkit fio python3
(cd "$repo" && cargo build -q --release -p canopy-peerd --example cold_read)
example=$CARGO_TARGET_DIR/release/examples/cold_read

echo "cold-read: writing ${mib} MiB of random data to $file"
dd if=/dev/urandom of="$file" bs=1M count="$mib" status=none
sync

drop_caches() {
  sync
  if ! { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null; then
    echo "cold-read: warning: cannot drop the page cache (not root?); runs are not cold" >&2
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

run_canopy() { # sequential|random -> MB/s
  local extra=()
  [[ $1 == random ]] && extra=(--random)
  drop_caches
  local line
  line=$("$example" --origin "$file" --chunk-size "$bs" --depth "$depth" --mib "$mib" "${extra[@]}")
  echo "  $line" >&2
  sed -E 's/.* = ([0-9.]+) MB\/s.*/\1/' <<<"$line"
}

run_nbdkit() { # sequential|random -> MB/s
  local rw=read port pidfile=$work/nbdkit.pid out=$work/fio.json
  [[ $1 == random ]] && rw=randread
  drop_caches
  port=$(free_port)
  rm -f "$pidfile"
  # -P writes the pid file once nbdkit accepts connections.
  nbdkit --exit-with-parent -f -P "$pidfile" -p "$port" -i 127.0.0.1 file "$file" &
  local nbd=$!
  for _ in $(seq 100); do [[ -s $pidfile ]] && break; sleep 0.05; done
  fio --name=cold --ioengine=nbd --uri="nbd://127.0.0.1:$port" --rw="$rw" --bs="$bs" \
    --iodepth="$depth" --size="${mib}M" --randrepeat=1 --eta=never --output-format=json \
    >"$out" 2>"$work/fio.err" || { cat "$work/fio.err" >&2; kill "$nbd"; return 1; }
  kill "$nbd"; wait "$nbd" 2>/dev/null || true
  # The nbd engine prints "fio: connected to NBD server" before the JSON.
  python3 -c 'import json,sys; t=open(sys.argv[1]).read(); j=json.loads(t[t.index("{"):])["jobs"][0]["read"]; print("%.1f" % (j["bw_bytes"] / 1e6))' "$out"
}

results=$work/results
for ((r = 1; r <= rounds; r++)); do
  for w in sequential random; do
    echo "cold-read: round $r, $w" >&2
    c=$(run_canopy "$w")
    n=$(run_nbdkit "$w")
    echo "  nbdkit+fio: $n MB/s" >&2
    echo "$w $r $c $n" >>"$results"
  done
done

python3 - "$results" "$mib" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
print(f"\ncold read of {sys.argv[2]} MiB, 64K blocks, depth 8, loopback TCP\n")
print("| workload | round | canopy leaf->proxy->root MB/s | nbdkit file + fio nbd MB/s | canopy/nbdkit |")
print("|---|---|---|---|---|")
for w in ("sequential", "random"):
    mine = [r for r in rows if r[0] == w]
    ratios = []
    for _, r, c, n in mine:
        ratio = float(c) / float(n)
        ratios.append(ratio)
        print(f"| {w} | {r} | {float(c):.1f} | {float(n):.1f} | {ratio:.3f} |")
    mc = statistics.median(float(r[2]) for r in mine)
    mn = statistics.median(float(r[3]) for r in mine)
    print(f"| {w} | median | {mc:.1f} | {mn:.1f} | {statistics.median(ratios):.3f} |")
EOF
