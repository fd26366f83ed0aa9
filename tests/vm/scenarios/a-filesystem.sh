#!/usr/bin/env bash
# Scenario a: mkfs.ext4, mount, write a tree of files (tens of MiB), umount,
# remount; checksums match and fsck is clean. Then stop the daemon (which
# flushes), serve the same origin again with a cold cache, and check again:
# what a clean stop acknowledged is on the origin.
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

log "serving the same origin again, cold cache"
start_volume --origin "$origin" --cache-mem 8M
fsck.ext4 -fn "$DEV" || fail "fsck.ext4 -fn found problems after restart"
mount "$DEV" /mnt/a
(cd /mnt/a/tree && sha256sum --quiet -c /tmp/a.sums) || fail "checksums differ after restart"
umount /mnt/a
"$UBLK" list
stop_volume
echo "scenario a: ok"
