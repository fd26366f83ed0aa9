#!/usr/bin/env bash
# Scenario g: a tree leaf under cache pressure, and a leaf that crashes.
#  - An async leaf with room for 16 chunks runs fio random writes with crc32c
#    verify over 32 MiB (512 chunks) through a proxy: chunks are given back
#    all the time (dirty ones in a FLUSH), then read back and verified, from
#    the leaf and from a second leaf elsewhere in the tree.
#  - A sync leaf writes a pattern and is killed with SIGKILL: its device
#    goes away (a leaf has no recover), `del` frees the id, and a new leaf
#    reads back every acknowledged byte.
source "$CANOPY_REPO/tests/vm/scenario-lib.sh"

PEERD=${CANOPY_PEERD:-$(dirname "$UBLK")/canopy-peerd}
[[ -x $PEERD ]] || fail "$PEERD is not built (cargo build --release)"
ip link set lo up

"$PEERD" root --listen 127.0.0.1:7400 --origin /tmp/g-origin.img --size 64M --chunk-size 64K \
  --volume vol0 2>>"$CANOPY_OUT/root.log" &
ROOT=$!
wait_port 7400 "$ROOT" root
"$PEERD" proxy --listen 127.0.0.1:7401 --parent 127.0.0.1:7400 --volume vol0 \
  --cache-chunks 64 2>>"$CANOPY_OUT/proxy.log" &
PROXY=$!
wait_port 7401 "$PROXY" proxy

log "async leaf, 16 chunks of cache, fio randwrite + verify over 512 chunks"
start_volume --parent 127.0.0.1:7401 --volume vol0 --write-mode async --cache-mem 1M --depth 32
fio --eta=never --name=g --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=16 \
  --bs=4k --size=32M --rw=randwrite --randrepeat=0 --verify=crc32c --verify_fatal=1 \
  --verify_state_save=0 --do_verify=1 --output="$CANOPY_OUT/g-fio.txt" ||
  { cat "$CANOPY_OUT/g-fio.txt"; fail "fio write+verify through the leaf failed"; }
grep -E "err= *0" "$CANOPY_OUT/g-fio.txt" >/dev/null || fail "fio reported errors"
"$UBLK" stats --id "$DEV_ID" --json >"$CANOPY_OUT/g-leaf.json"
"$UBLK" stats --id "$DEV_ID"
ev=$(json_get "$CANOPY_OUT/g-leaf.json" 's["peer"]["evictions"]')
((ev > 100)) || fail "the leaf gave back only $ev chunks: no cache pressure"
[[ $(json_get "$CANOPY_OUT/g-leaf.json" 's["peer"]["lost_dirty"]') == 0 ]] || fail "dirty chunks lost"
dd if="$DEV" of=/tmp/g-leaf1.img bs=1M count=32 iflag=direct status=none
stop_volume

log "a second leaf, under the root, reads the same bytes"
start_volume --parent 127.0.0.1:7400 --volume vol0
dd if="$DEV" of=/tmp/g-leaf2.img bs=1M count=32 iflag=direct status=none
cmp /tmp/g-leaf1.img /tmp/g-leaf2.img || fail "the second leaf reads other bytes"

log "a sync leaf writes, then its daemon is killed"
head -c 4M /dev/urandom >/tmp/g-pattern
dd if=/tmp/g-pattern of="$DEV" bs=64K seek=512 oflag=direct status=none
kill -KILL "$DAEMON_PID"
wait "$DAEMON_PID" 2>/dev/null || true
for _ in $(seq 1 100); do [[ -b $DEV ]] || break; sleep 0.1; done
[[ ! -b $DEV ]] || fail "$DEV stayed after its leaf daemon died"
"$UBLK" list
out=$("$UBLK" recover --id "$DEV_ID" 2>&1) && fail "recover of a dead leaf succeeded"
grep -q "leaf of a canopy tree" <<<"$out" || fail "recover of a dead leaf: unclear error: $out"
"$UBLK" del --id "$DEV_ID" || fail "del of a dead leaf failed"

log "a new leaf reads every acknowledged byte"
start_volume --parent 127.0.0.1:7401 --volume vol0
dd if="$DEV" of=/tmp/g-back bs=64K skip=512 count=64 iflag=direct status=none
cmp /tmp/g-pattern /tmp/g-back || fail "sync writes of a killed leaf were lost"
stop_volume
stop_pid "$PROXY" proxy
stop_pid "$ROOT" root
echo "scenario g: ok"
