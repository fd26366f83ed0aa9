#!/usr/bin/env bash
# Scenario c: kill the daemon with SIGKILL during fio, recover with
# `canopy-ublk recover`. (1) writethrough (default) with ext4 mounted: fio on
# a file keeps going across the crash and verifies, the tree written before
# verifies, fsck is clean. (2) writeback on the raw device: data written and
# flushed before the kill verifies after recovery.
source "$CANOPY_REPO/tests/vm/scenario-lib.sh"

log "part 1: writethrough, ext4 mounted across the crash"
start_volume --origin /tmp/c-origin.img --size 256M --cache-mem 8M --queues 2
mkfs.ext4 -q -F "$DEV"
mkdir -p /mnt/c
mount "$DEV" /mnt/c
write_tree /mnt/c/tree 16
sync
checksum_tree /mnt/c/tree /tmp/c.sums
fio --eta=never --name=c --filename=/mnt/c/fio.dat --size=24M --direct=1 --ioengine=libaio \
  --iodepth=16 --bs=4k --rw=randwrite --verify=crc32c --do_verify=1 --verify_fatal=1 \
  --randrepeat=0 --verify_state_save=0 --output="$CANOPY_OUT/c-fio.txt" &
fio_pid=$!
sleep 4
kill -0 "$fio_pid" || fail "fio finished before the kill; make it longer"
kill -KILL "$DAEMON_PID"
wait "$DAEMON_PID" 2>/dev/null || true
log "daemon killed; device state:"
"$UBLK" list
start_volume recover --id "$DEV_ID"
wait "$fio_pid" || { cat "$CANOPY_OUT/c-fio.txt"; fail "fio failed across the crash"; }
(cd /mnt/c/tree && sha256sum --quiet -c /tmp/c.sums) || fail "tree checksums differ after recovery"
umount /mnt/c
fsck.ext4 -fn "$DEV" || fail "fsck.ext4 -fn found problems after recovery"
stop_volume

log "part 2: writeback, raw device, flushed data survives SIGKILL"
start_volume --origin /tmp/c2-origin.img --size 128M --cache-mem 8M --cache-mode writeback
fio_region() {
  fio --eta=never --name=c2 --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=16 --bs=4k \
    --offset=0 --size=32M --verify=crc32c --verify_state_save=0 "$@"
}
fio_region --rw=randwrite --do_verify=0 --fsync_on_close=1 --output="$CANOPY_OUT/c2-write.txt" \
  || fail "fio write of the flushed region failed"
fio --eta=never --name=noise --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=16 --bs=4k \
  --offset=64M --size=32M --rw=randwrite --time_based --runtime=60 --output=/dev/null &
noise_pid=$!
sleep 3
kill -KILL "$DAEMON_PID"
wait "$DAEMON_PID" 2>/dev/null || true
start_volume recover --id "$DEV_ID"
kill "$noise_pid" 2>/dev/null || true
wait "$noise_pid" 2>/dev/null || true
fio_region --rw=randread --verify_only=1 --output="$CANOPY_OUT/c2-verify.txt" \
  || { cat "$CANOPY_OUT/c2-verify.txt"; fail "flushed data did not verify after recovery"; }
stop_volume
echo "scenario c: ok"
