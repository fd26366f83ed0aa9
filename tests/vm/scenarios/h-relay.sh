#!/usr/bin/env bash
# Scenario h: scenario e's tree through an untrusted relay. The volume is
# made with keys (canopy-keys new); the root and both leaves (/dev/ublkbN,
# `canopy-ublk add --parent ... --keys`) hold the trusted key file, and a
# relay between the root and both leaves holds only the relay file and runs
# as the unprivileged user nobody, caching in memory over a disk tier.
#  - leaf 1 (async): mkfs.ext4, mount, write a tree and a marker file, umount;
#  - leaf 2 (sync): mount read-only, checksums match;
#  - leaf 1 restarted in semi-sync mode changes the tree; leaf 2 sees it;
#  - the relay's disk tier holds records but never the marker's plaintext,
#    and no node refused a record (nothing was tampered with);
#  - everything stops cleanly, and the root's origin holds the final tree.
source "$CANOPY_REPO/tests/vm/scenario-lib.sh"

BIN=$(dirname "$UBLK")
PEERD=${CANOPY_PEERD:-$BIN/canopy-peerd}
KEYS=${CANOPY_KEYS:-$BIN/canopy-keys}
[[ -x $PEERD ]] || fail "$PEERD is not built (cargo build --release)"
[[ -x $KEYS ]] || fail "$KEYS is not built (cargo build --release)"
ip link set lo up
# The kernel's log at the end, for a failure's context.
trap 'dmesg >"$CANOPY_OUT/dmesg-end.txt" 2>/dev/null || true' EXIT

log "the volume's keys"
"$KEYS" new --volume vol0 --out /tmp/h-keys
"$KEYS" inspect /tmp/h-keys/vol0.key | tee /tmp/h-inspect
grep -q "signing key" /tmp/h-inspect || fail "inspect does not list the trusted file's keys"
# The relay operator gets the relay file only, and runs as nobody.
install -d -o nobody -m 0700 /tmp/h-relay
install -o nobody -m 0644 /tmp/h-keys/vol0.verify /tmp/h-relay/vol0.verify
"$KEYS" inspect /tmp/h-relay/vol0.verify | tee /tmp/h-inspect-relay
grep -qi "verifying key only" /tmp/h-inspect-relay || fail "the relay file holds more than the verifying key"

origin=/tmp/h-origin.img
"$PEERD" root --listen 127.0.0.1:7500 --origin "$origin" --size 256M --chunk-size 64K \
  --volume vol0 --keys /tmp/h-keys/vol0.key 2>>"$CANOPY_OUT/root.log" &
ROOT_PID=$!
wait_port 7500 "$ROOT_PID" root
setpriv --reuid=nobody --regid=nogroup --clear-groups \
  "$PEERD" relay --listen 127.0.0.1:7501 --parent 127.0.0.1:7500 --volume vol0 \
  --verify-key /tmp/h-relay/vol0.verify --cache-mem 4M --cache-disk /tmp/h-relay/cache:64M \
  2>>"$CANOPY_OUT/relay.log" &
RELAY_PID=$!
wait_port 7501 "$RELAY_PID" relay
[[ $(stat -c %U /proc/$RELAY_PID) == nobody ]] || fail "the relay does not run as nobody"

log "leaf 1 (async) and leaf 2 (sync), both under the relay"
start_volume --parent 127.0.0.1:7501 --volume vol0 --keys /tmp/h-keys/vol0.key \
  --write-mode async --cache-mem 4M
DEV1=$DEV ID1=$DEV_ID PID1=$DAEMON_PID
start_volume --parent 127.0.0.1:7501 --volume vol0 --keys /tmp/h-keys/vol0.key --cache-mem 32M
DEV2=$DEV ID2=$DEV_ID PID2=$DAEMON_PID

mkfs.ext4 -q -F "$DEV1"
mkdir -p /mnt/l1 /mnt/l2
mount "$DEV1" /mnt/l1
log "leaf 1 writes a 16 MiB tree and a marker"
write_tree /mnt/l1/tree 16
# (Not `yes | head`: under pipefail, yes's SIGPIPE would fail the script.)
python3 -c 'import sys; sys.stdout.write("CANOPY-PLAINTEXT-MARKER-4f1c\n" * 75000)' >/mnt/l1/tree/marker
checksum_tree /mnt/l1/tree /tmp/h1.sums
umount /mnt/l1

mount -o ro,noload "$DEV2" /mnt/l2
(cd /mnt/l2/tree && sha256sum --quiet -c /tmp/h1.sums) || fail "leaf 2 does not see leaf 1's tree"
umount /mnt/l2

log "leaf 1 restarts in semi-sync mode and changes the tree"
DEV=$DEV1 DEV_ID=$ID1 DAEMON_PID=$PID1 stop_volume
start_volume --parent 127.0.0.1:7501 --volume vol0 --keys /tmp/h-keys/vol0.key \
  --write-mode semi-sync --cache-mem 32M
DEV1=$DEV ID1=$DEV_ID PID1=$DAEMON_PID
mount "$DEV1" /mnt/l1
(cd /mnt/l1/tree && sha256sum --quiet -c /tmp/h1.sums) || fail "leaf 1 lost its tree across a restart"
rm -rf /mnt/l1/tree/d1 /mnt/l1/tree/d3
write_tree /mnt/l1/tree/new 6
checksum_tree /mnt/l1/tree /tmp/h2.sums
umount /mnt/l1

log "leaf 2 mounts again"
blockdev --flushbufs "$DEV2"
mount -o ro,noload "$DEV2" /mnt/l2
(cd /mnt/l2/tree && sha256sum --quiet -c /tmp/h2.sums) || fail "leaf 2 reads a stale tree"
[[ ! -e /mnt/l2/tree/d1 ]] || fail "leaf 2 still sees a deleted directory"
umount /mnt/l2

log "what the relay holds, and what everyone refused"
[[ -s /tmp/h-relay/cache ]] || fail "the relay's disk tier is empty"
if grep -c CANOPY-PLAINTEXT-MARKER /tmp/h-relay/cache; then
  fail "the relay's disk tier holds plaintext"
fi
grep -q CANOPY-PLAINTEXT-MARKER "$origin" || fail "the marker never reached the origin (test is void)"
for id in "$ID1" "$ID2"; do
  "$UBLK" stats --id "$id" --json >"$CANOPY_OUT/h-leaf$id.json"
  bad=$(json_get "$CANOPY_OUT/h-leaf$id.json" 's["peer"]["bad_records"]')
  [[ $bad == 0 ]] || fail "leaf $id refused $bad records on an honest relay"
  [[ $(json_get "$CANOPY_OUT/h-leaf$id.json" 's["io_errors"]') == 0 ]] || fail "leaf $id had I/O errors"
  # Every write went up with a cookie and came back with a valid receipt.
  [[ $(json_get "$CANOPY_OUT/h-leaf$id.json" 's["peer"]["cookies"]["receipts_bad"]') == 0 ]] ||
    fail "leaf $id refused a receipt on an honest relay"
done
receipts=$(json_get "$CANOPY_OUT/h-leaf$ID1.json" 's["peer"]["cookies"]["receipts_ok"]')
(( receipts > 0 )) || fail "the writing leaf holds no receipts"
if grep -Eq "record refused|write refused" "$CANOPY_OUT/relay.log" "$CANOPY_OUT/root.log"; then
  fail "a record or a write was refused on an honest tree"
fi
# An idle leaf under a relay busy with another's writes keeps its parent:
# HEARTBEATs jump the relay's queue.
if grep -q "missed its heartbeats" "$CANOPY_OUT/daemon.log" "$CANOPY_OUT/relay.log"; then
  fail "a node missed its parent's heartbeats"
fi
# A node busy with mkfs's burst still sends its own HEARTBEATs: no parent
# dropped a child for silence.
if grep -q "child silent past its heartbeat" "$CANOPY_OUT/relay.log" "$CANOPY_OUT/root.log"; then
  fail "a parent dropped a busy child as silent"
fi
kill -USR1 "$RELAY_PID"
for _ in $(seq 1 50); do grep -q bad_records "$CANOPY_OUT/relay.log" && break; sleep 0.1; done
grep -q '"bad_records":0,' "$CANOPY_OUT/relay.log" || fail "the relay's stats (SIGUSR1) do not show 0 bad records"
grep -q '"receipts_bad":0,' "$CANOPY_OUT/relay.log" || fail "the relay's stats do not show 0 bad receipts"

log "everything stops cleanly"
DEV=$DEV1 DEV_ID=$ID1 DAEMON_PID=$PID1 stop_volume
DEV=$DEV2 DEV_ID=$ID2 DAEMON_PID=$PID2 stop_volume
stop_pid "$RELAY_PID" relay
stop_pid "$ROOT_PID" root

log "the root's origin holds the final tree"
mount -o ro,loop "$origin" /mnt/l2
(cd /mnt/l2/tree && sha256sum --quiet -c /tmp/h2.sums) || fail "the origin does not hold leaf 1's final tree"
umount /mnt/l2
echo "scenario h: ok"
