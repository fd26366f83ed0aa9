#!/usr/bin/env bash
# B6 of issue 5, the guest's half (runs inside the test VM; `canopy-bench b6`
# boots the VM with tests/vm/run-in-vm.sh and builds the table from what
# this leaves in $CANOPY_OUT/b6/results.tsv).
#
# fio (libaio, O_DIRECT) on /dev/ublkbN served by canopy's embedded volume
# with the whole volume in its memory tier, against /dev/nbd0 attached by
# nbd-client to nbdkit's memory plugin in the same guest, both holding the
# same random bytes, both with two hardware queues (canopy --queues 2;
# nbd-client -C 2, one connection per queue). 4k random read at QD32 and
# 1M sequential read at QD8, the devices alternating within each round.
#
# Settings (env, passed through by run-in-vm.sh as CANOPY_*):
#   CANOPY_B6_SIZE_MIB  volume size (default 256)
#   CANOPY_B6_RUNTIME   seconds of each fio run (default 10)
#   CANOPY_B6_RAMP      seconds of fio ramp before each run (default 2)
#   CANOPY_B6_ROUNDS    rounds (default 3)
#
# results.tsv, tab-separated, written whole at the end (a partial run leaves
# none):
#   run ROUND DEVICE WORKLOAD IOPS BW_BYTES   DEVICE: canopy | nbdkit
#   origin_reads N                            canopy's origin reads during the runs
# The script fails if canopy read its origin during the runs: the figures
# would then not be a warm cache's.
source "$CANOPY_REPO/tests/vm/scenario-lib.sh"
size_mib=${CANOPY_B6_SIZE_MIB:-256}
runtime=${CANOPY_B6_RUNTIME:-10}
ramp=${CANOPY_B6_RAMP:-2}
rounds=${CANOPY_B6_ROUNDS:-3}
for v in size_mib runtime ramp rounds; do
  [[ ${!v} =~ ^[0-9]+$ ]] || fail "$v must be a number, got '${!v}'"
done
((size_mib > 0 && runtime > 0 && rounds > 0)) || fail "size, runtime and rounds must be above 0"
out=$CANOPY_OUT/b6
mkdir -p "$out"
rm -f "$out/results.tsv"
for t in nbdkit nbd-client nbdcopy fio python3; do
  command -v "$t" >/dev/null || fail "$t is not installed (scripts/install-deps)"
done

log "B6: ${size_mib} MiB of random bytes for both devices"
data=/tmp/b6-data.img
head -c $((size_mib << 20)) /dev/urandom >"$data"
cp "$data" /tmp/b6-origin.img

# canopy: the embedded volume, a memory tier a quarter larger than the
# volume (8-way sets: no set overflows), read through once.
start_volume --origin /tmp/b6-origin.img --cache-mem $((size_mib * 5 / 4))M --queues 2
CANOPY_DEV=$DEV
dd if="$CANOPY_DEV" of=/dev/null bs=1M iflag=direct status=none

# The peer: nbdkit's memory plugin, filled with the same bytes, on
# /dev/nbd0 (nbd.ko is loaded at boot, see tests/vm/lib.sh).
sock=/tmp/b6-nbdkit.sock
nbdkit --foreground --unix "$sock" memory size=$((size_mib << 20)) 2>>"$CANOPY_OUT/nbdkit.log" &
NBDKIT_PID=$!
for _ in $(seq 1 300); do [[ -S $sock ]] && break; kill -0 "$NBDKIT_PID" 2>/dev/null || fail "nbdkit exited"; sleep 0.1; done
[[ -S $sock ]] || fail "nbdkit did not listen on $sock"
nbdcopy "$data" "nbd+unix:///?socket=$sock" || fail "nbdcopy into nbdkit failed"
rm -f "$data"
[[ -b /dev/nbd0 ]] || fail "/dev/nbd0 missing (is nbd.ko loaded?)"
nbd-client -unix "$sock" /dev/nbd0 -connections 2 >>"$CANOPY_OUT/nbd-client.log" 2>&1 ||
  { cat "$CANOPY_OUT/nbd-client.log"; fail "nbd-client could not attach /dev/nbd0"; }
for _ in $(seq 1 100); do
  (($(blockdev --getsize64 /dev/nbd0 2>/dev/null || echo 0) == size_mib << 20)) && break
  sleep 0.1
done
(($(blockdev --getsize64 /dev/nbd0) == size_mib << 20)) || fail "/dev/nbd0 is not ${size_mib} MiB"
log "canopy on $CANOPY_DEV, nbdkit memory on /dev/nbd0"

# Both devices must hold the same bytes, or the comparison is of nothing.
a=$(head -c 1048576 "$CANOPY_DEV" | sha256sum) b=$(head -c 1048576 /dev/nbd0 | sha256sum)
[[ $a == "$b" ]] || fail "the devices' first MiB differ"

origin_reads() { stats_json "$out/stats.json"; json_get "$out/stats.json" "s['origin']['reads']"; }
reads_before=$(origin_reads)
[[ $reads_before =~ ^[0-9]+$ ]] || fail "cannot read canopy's origin reads from its stats"

fio_run() { # DEV WORKLOAD -> "IOPS BW_BYTES"
  local dev=$1 w=$2 args
  case $w in
    4k-randread) args=(--rw=randread --bs=4k --iodepth=32) ;;
    1m-read) args=(--rw=read --bs=1M --iodepth=8) ;;
  esac
  fio --eta=never --name="b6" --filename="$dev" --direct=1 --ioengine=libaio --time_based \
    --runtime="$runtime" --ramp_time="$ramp" --numjobs=1 --output-format=json "${args[@]}" \
    >"$out/fio.json" || fail "fio $w on $dev failed"
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]["read"]; print(j["iops"], j["bw_bytes"])' \
    "$out/fio.json"
}

rows=()
for round in $(seq 1 "$rounds"); do
  # Which device goes first alternates between rounds.
  if ((round % 2)); then order=(canopy nbdkit); else order=(nbdkit canopy); fi
  for w in 4k-randread 1m-read; do
    for who in "${order[@]}"; do
      dev=$CANOPY_DEV
      [[ $who == nbdkit ]] && dev=/dev/nbd0
      # fio_run's own failure ends only its subshell: check what came back.
      read -r iops bw <<<"$(fio_run "$dev" "$w")" || true
      [[ -n ${iops:-} && -n ${bw:-} ]] || fail "no figures from fio $w on $dev"
      log "round $round/$rounds $w $who ($dev): $iops IOPS, $bw B/s"
      rows+=("$(printf 'run\t%s\t%s\t%s\t%s\t%s' "$round" "$who" "$w" "$iops" "$bw")")
    done
  done
done

reads_after=$(origin_reads)
grown=$((reads_after - reads_before))
((grown == 0)) || fail "canopy read its origin $grown times during the runs: the cache was not warm"
{
  printf '%s\n' "${rows[@]}"
  printf 'origin_reads\t%s\n' "$grown"
} >"$out/results.tsv.part"
mv "$out/results.tsv.part" "$out/results.tsv"
"$UBLK" stats --id "$DEV_ID"

nbd-client -d /dev/nbd0 >>"$CANOPY_OUT/nbd-client.log" 2>&1 || fail "nbd-client -d failed"
stop_pid "$NBDKIT_PID" nbdkit
stop_volume
log "B6 done"
