#!/usr/bin/env bash
# Scenario e: one volume on two hosts' worth of leaves. A root and a proxy
# (canopy-peerd) on loopback; leaf 1 (`canopy-ublk add --parent`, under the
# proxy) and leaf 2 (directly under the root) are each a /dev/ublkbN.
#  - leaf 1 (async writes): mkfs.ext4, mount, write a tree, umount;
#  - leaf 2: mount read-only, checksums match, umount;
#  - leaf 1 restarted in semi-sync mode: change the tree, umount;
#  - leaf 2: mount again; it sees the new tree, because leaf 1's writes
#    invalidated the chunks it held (its stats count the INVALIDATEs);
#  - everything stops cleanly, and the root's origin file, mounted through a
#    loop device, holds the final tree.
# The proxy and leaf 1 cache in a small memory tier over a disk tier, so the
# 20 MiB tree passes through both tiers and the victim cleaners.
source "$CANOPY_REPO/tests/vm/scenario-lib.sh"

PEERD=${CANOPY_PEERD:-$(dirname "$UBLK")/canopy-peerd}
[[ -x $PEERD ]] || fail "$PEERD is not built (cargo build --release)"
# The guest starts with loopback down; the tree talks over it.
ip link set lo up

origin=/tmp/e-origin.img
"$PEERD" root --listen 127.0.0.1:7400 --origin "$origin" --size 256M --chunk-size 64K \
  --volume vol0 2>>"$CANOPY_OUT/root.log" &
ROOT_PID=$!
wait_port 7400 "$ROOT_PID" root
"$PEERD" proxy --listen 127.0.0.1:7401 --parent 127.0.0.1:7400 --volume vol0 \
  --cache-mem 4M --cache-disk /tmp/e-proxy.cache:64M 2>>"$CANOPY_OUT/proxy.log" &
PROXY_PID=$!
wait_port 7401 "$PROXY_PID" proxy

log "leaf 1 (async) under the proxy"
start_volume --parent 127.0.0.1:7401 --volume vol0 --write-mode async --cache-mem 4M \
  --cache-disk /tmp/e-leaf1.cache:8M
DEV1=$DEV ID1=$DEV_ID PID1=$DAEMON_PID
log "leaf 2 (sync) under the root"
start_volume --parent 127.0.0.1:7400 --volume vol0 --cache-mem 32M
DEV2=$DEV ID2=$DEV_ID PID2=$DAEMON_PID
[[ $(blockdev --getsize64 "$DEV1") == $((256 << 20)) ]] || fail "leaf 1 size is not the root's"
"$UBLK" list | tee /tmp/e-list
grep -q "async .*volume vol0 from 127.0.0.1:7401" /tmp/e-list || fail "list does not show leaf 1 as a leaf"
out=$("$UBLK" recover --id "$ID2" 2>&1) && fail "recover of a leaf device succeeded"
grep -q "leaf of a canopy tree" <<<"$out" || fail "recover of a leaf: unclear error: $out"

mkfs.ext4 -q -F "$DEV1"
mkdir -p /mnt/l1 /mnt/l2
mount "$DEV1" /mnt/l1
log "leaf 1 writes a 20 MiB tree"
write_tree /mnt/l1/tree 20
checksum_tree /mnt/l1/tree /tmp/e1.sums
umount /mnt/l1
DEV_ID=$ID1 stats_json "$CANOPY_OUT/e-leaf1.json"
demoted=$(json_get "$CANOPY_OUT/e-leaf1.json" 's["peer"]["cache"]["tiers"][1]["demotions"]')
((demoted > 0)) || fail "leaf 1's disk tier received nothing"
evicted=$(json_get "$CANOPY_OUT/e-leaf1.json" 's["peer"]["evictions"]')
((evicted > 0)) || fail "leaf 1's victim cleaner gave nothing back"
[[ -f /tmp/e-proxy.cache && -f /tmp/e-leaf1.cache ]] || fail "disk tier files missing"

mount -o ro,noload "$DEV2" /mnt/l2
(cd /mnt/l2/tree && sha256sum --quiet -c /tmp/e1.sums) || fail "leaf 2 does not see leaf 1's tree"
umount /mnt/l2

log "leaf 1 restarts in semi-sync mode and changes the tree"
DEV=$DEV1 DEV_ID=$ID1 DAEMON_PID=$PID1 stop_volume
start_volume --parent 127.0.0.1:7401 --volume vol0 --write-mode semi-sync --cache-mem 32M
DEV1=$DEV ID1=$DEV_ID PID1=$DAEMON_PID
mount "$DEV1" /mnt/l1
(cd /mnt/l1/tree && sha256sum --quiet -c /tmp/e1.sums) || fail "leaf 1 lost its tree across a restart"
rm -rf /mnt/l1/tree/d1 /mnt/l1/tree/d3
write_tree /mnt/l1/tree/new 8
checksum_tree /mnt/l1/tree /tmp/e2.sums
umount /mnt/l1

log "leaf 2 mounts again"
# The kernel's own cache of the device is the kernel's business; canopy's
# job is that the device below it is coherent.
blockdev --flushbufs "$DEV2"
mount -o ro,noload "$DEV2" /mnt/l2
(cd /mnt/l2/tree && sha256sum --quiet -c /tmp/e2.sums) || fail "leaf 2 reads a stale tree"
[[ ! -e /mnt/l2/tree/d1 ]] || fail "leaf 2 still sees a deleted directory"
umount /mnt/l2
fsck.ext4 -fn "$DEV2" || fail "fsck.ext4 -fn through leaf 2 found problems"
"$UBLK" stats --id "$ID2"
"$UBLK" stats --id "$ID2" --json >"$CANOPY_OUT/e-leaf2.json"
inval=$(json_get "$CANOPY_OUT/e-leaf2.json" 's["peer"]["invalidates_received"]')
((inval > 0)) || fail "leaf 2 received no INVALIDATE although leaf 1 rewrote chunks it held"
[[ $(json_get "$CANOPY_OUT/e-leaf2.json" 's["io_errors"]') == 0 ]] || fail "leaf 2 had I/O errors"

log "everything stops cleanly"
DEV=$DEV1 DEV_ID=$ID1 DAEMON_PID=$PID1 stop_volume
DEV=$DEV2 DEV_ID=$ID2 DAEMON_PID=$PID2 stop_volume
stop_pid "$PROXY_PID" proxy
stop_pid "$ROOT_PID" root

log "the root's origin holds the final tree"
mount -o ro,loop "$origin" /mnt/l2
(cd /mnt/l2/tree && sha256sum --quiet -c /tmp/e2.sums) || fail "the origin does not hold leaf 1's final tree"
umount /mnt/l2
echo "scenario e: ok"
