#!/usr/bin/env bash
# Scenario d: blkdiscard and write-zeroes ranges read back as zeros, and the
# bytes around them are untouched, in both cache modes, from the cache and
# (after a restart with a cold cache) from the origin.
source "$CANOPY_REPO/tests/vm/scenario-lib.sh"

MiB=$((1024 * 1024))
head -c $((32 * MiB)) /dev/urandom >/tmp/d-data.bin

# zero_model OFFSET LEN: apply the same zeroing to the reference copy.
zero_model() {
  dd if=/dev/zero of=/tmp/d-model.bin bs=4096 seek=$(($1 / 4096)) count=$(($2 / 4096)) conv=notrunc status=none
}

check_device() {
  dd if="$DEV" bs=1M iflag=direct status=none | cmp - /tmp/d-model.bin || fail "$1: device differs from the model"
}

for mode in writeback writethrough; do
  log "mode $mode"
  rm -f /tmp/d-origin.img
  cp /tmp/d-data.bin /tmp/d-model.bin
  start_volume --origin /tmp/d-origin.img --size 32M --chunk-size 64K --cache-mem 4M --cache-mode "$mode"
  dd if=/tmp/d-data.bin of="$DEV" bs=1M oflag=direct status=none
  # Whole chunks, a range with partial chunks at both ends, write-zeroes,
  # and a discard of the last bytes of the device.
  blkdiscard -o $((1 * MiB)) -l $((2 * MiB)) "$DEV";              zero_model $((1 * MiB)) $((2 * MiB))
  blkdiscard -o $((5 * MiB + 4096)) -l $((200 * 1024)) "$DEV";    zero_model $((5 * MiB + 4096)) $((200 * 1024))
  blkdiscard -z -o $((9 * MiB + 8192)) -l $((3 * MiB)) "$DEV";    zero_model $((9 * MiB + 8192)) $((3 * MiB))
  fallocate -z -o $((20 * MiB)) -l $((64 * 1024)) "$DEV";         zero_model $((20 * MiB)) $((64 * 1024))
  blkdiscard -o $((31 * MiB)) -l $((1 * MiB)) "$DEV";             zero_model $((31 * MiB)) $((1 * MiB))
  check_device "$mode, from the cache"
  stop_volume
  cmp /tmp/d-origin.img /tmp/d-model.bin || fail "$mode: origin differs from the model after a clean stop"
  start_volume --origin /tmp/d-origin.img --cache-mem 4M --cache-mode "$mode"
  check_device "$mode, cold cache"
  stop_volume
done
echo "scenario d: ok"
