#!/usr/bin/env bash
# Scenario a: mkfs.ext4, mount, write a tree of files (tens of MiB), umount,
# remount; checksums match and fsck is clean. Then stop the daemon (which
# flushes), serve the same origin again with a cold cache, and check again:
# what a clean stop acknowledged is on the origin. The restarted volume also
# exports itself over NBD (--export-nbd beside /dev/ublkbN): the export reads
# what the device reads, and the device sees what is written through it.
source "$CANOPY_REPO/tests/vm/scenario-lib.sh"

origin=/tmp/a-origin.img
log "refusals: not root, bad size"
out=$(setpriv --reuid=65534 --regid=65534 --clear-groups "$UBLK" add --origin /tmp/x.img --size 1M 2>&1) && fail "add as nobody succeeded"
grep -q "must run as root" <<<"$out" || fail "not-root error unclear: $out"
out=$("$UBLK" add --origin /tmp/x.img --size 1000 2>&1) && fail "add with a bad size succeeded"
grep -q "multiple of 512" <<<"$out" || fail "bad-size error unclear: $out"
[[ ! -e /tmp/x.img ]] || fail "a refused add created its origin"

start_volume --origin "$origin" --size 256M --cache-mem 16M --queues 2
mkfs.ext4 -q -F "$DEV"
mkdir -p /mnt/a
mount "$DEV" /mnt/a
log "writing a 40 MiB tree"
write_tree /mnt/a/tree 40
checksum_tree /mnt/a/tree /tmp/a.sums
umount /mnt/a
mount "$DEV" /mnt/a
(cd /mnt/a/tree && sha256sum --quiet -c /tmp/a.sums) || fail "checksums differ after remount"
umount /mnt/a
fsck.ext4 -fn "$DEV" || fail "fsck.ext4 -fn found problems"
stats_json "$CANOPY_OUT/a-stats.json"
"$UBLK" stats --id "$DEV_ID"
stop_volume

log "serving the same origin again, cold cache, with an NBD export beside the device"
sock=/tmp/a-nbd.sock
start_volume --origin "$origin" --cache-mem 8M --export-nbd "unix:$sock"
fsck.ext4 -fn "$DEV" || fail "fsck.ext4 -fn found problems after restart"
mount "$DEV" /mnt/a
(cd /mnt/a/tree && sha256sum --quiet -c /tmp/a.sums) || fail "checksums differ after restart"
umount /mnt/a
# The export serves the same volume through the same cache: byte for byte
# what the device reads, and a write through one is read through the other.
nbd="nbd+unix:///?socket=$sock"
nbdinfo --size "$nbd" | grep -qx "$(blockdev --getsize64 "$DEV")" || fail "NBD export size differs"
nbdcopy "$nbd" - | cmp - "$DEV" || fail "NBD export and $DEV differ"
head -c 1M /dev/urandom >/tmp/a-blob
nbdcopy /tmp/a-blob "$nbd" || fail "nbdcopy into the export failed"
# The kernel cached what cmp read above: drop it, so the device is read.
blockdev --flushbufs "$DEV"
cmp -n 1048576 /tmp/a-blob "$DEV" || fail "a write through NBD is not read through $DEV"
"$UBLK" list
stop_volume
echo "scenario a: ok"
