#!/usr/bin/env bash
# In-VM fio comparison, side by side in one boot, all with a warm cache:
# /dev/ublkbN served by canopy's embedded default (memory tier), /dev/ublkbN
# on a leaf of a tree (`add --parent`, a root on loopback), and a kernel
# loop device on a tmpfs file.
# Runs inside the guest; start it with `bench/vm-fio`. Prints a markdown
# table (also saved to $CANOPY_OUT/vm-fio.md). Ratios only mean something
# within one run: the VM is software-emulated (TCG) and noisy.
source "$CANOPY_REPO/tests/vm/scenario-lib.sh"
runtime=${CANOPY_BENCH_RUNTIME:-10}

PEERD=$(dirname "$UBLK")/canopy-peerd
ip link set lo up
"$PEERD" root --listen 127.0.0.1:7400 --origin /tmp/bench-root.img --size 256M --volume bench \
  2>>"$CANOPY_OUT/root.log" &
ROOT_PID=$!
wait_port 7400 "$ROOT_PID" root
start_volume --parent 127.0.0.1:7400 --volume bench --cache-mem 320M --queues 2
LEAF=$DEV LEAF_ID=$DEV_ID LEAF_PID=$DAEMON_PID
dd if="$LEAF" of=/dev/null bs=1M iflag=direct status=none   # warm the leaf
start_volume --origin /tmp/bench-origin.img --size 256M --cache-mem 320M --queues 2
dd if="$DEV" of=/dev/null bs=1M iflag=direct status=none   # warm the cache
truncate -s 256M /tmp/loop.img
dd if=/dev/urandom of=/tmp/loop.img bs=1M count=256 conv=notrunc status=none
loopdev=$(losetup --find --show /tmp/loop.img)

fio_json() { # DEV NAME ARGS...
  local dev=$1 name=$2; shift 2
  fio --eta=never --name="$name" --filename="$dev" --direct=1 --ioengine=libaio --time_based \
    --runtime="$runtime" --ramp_time=2 --numjobs=1 --output-format=json "$@" \
    >"$CANOPY_OUT/$name.json"
}
metric() { # FILE -> "iops MB/s"
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]["read"]; print("%.0f %.1f" % (j["iops"], j["bw_bytes"] / 1e6))' "$1"
}

for dev in "$DEV" "$LEAF" "$loopdev"; do
  tag=$(basename "$dev")
  fio_json "$dev" "$tag-4k-randread" --rw=randread --bs=4k --iodepth=32
  fio_json "$dev" "$tag-1m-read" --rw=read --bs=1M --iodepth=8
done

u=$(basename "$DEV") t=$(basename "$LEAF") l=$(basename "$loopdev")
{
  echo "| workload | embedded $u | tree leaf $t | loop on tmpfs | embedded/loop | leaf/loop |"
  echo "|---|---|---|---|---|---|"
  for w in 4k-randread 1m-read; do
    read -r ui ub <<<"$(metric "$CANOPY_OUT/$u-$w.json")"
    read -r ti tb <<<"$(metric "$CANOPY_OUT/$t-$w.json")"
    read -r li lb <<<"$(metric "$CANOPY_OUT/$l-$w.json")"
    r1=$(python3 -c "print('%.2f' % ($ui / $li))")
    r2=$(python3 -c "print('%.2f' % ($ti / $li))")
    echo "| $w | $ui IOPS, $ub MB/s | $ti IOPS, $tb MB/s | $li IOPS, $lb MB/s | $r1 | $r2 |"
  done
} | tee "$CANOPY_OUT/vm-fio.md"
"$UBLK" stats --id "$DEV_ID"
"$UBLK" stats --id "$LEAF_ID"
losetup -d "$loopdev"
stop_volume
DEV=$LEAF DEV_ID=$LEAF_ID DAEMON_PID=$LEAF_PID stop_volume
stop_pid "$ROOT_PID" root
