#!/usr/bin/env bash
# Scenario f: two writers on different branches of the Fig. 7 tree overwrite
# the same chunks through their raw devices while readers on three devices
# check per-chunk linearizability (tests/vm/lincheck.py, O_DIRECT).
#   A root; B, C proxies; D (async) under B, E (semi-sync) under C, F (sync)
#   under B, each a /dev/ublkbN. D and E write; D, E and F read.
source "$CANOPY_REPO/tests/vm/scenario-lib.sh"

PEERD=${CANOPY_PEERD:-$(dirname "$UBLK")/canopy-peerd}
[[ -x $PEERD ]] || fail "$PEERD is not built (cargo build --release)"
LINCHECK=$CANOPY_REPO/tests/vm/lincheck.py
ip link set lo up

log "the checker itself rejects a stale read"
printf 'W 0 1 1 100 200\nW 0 1 2 300 400\n' >/tmp/f-w
printf 'R 0 1 1 500 600\n' >/tmp/f-r
python3 "$LINCHECK" check /tmp/f-w /tmp/f-r >/dev/null 2>&1 && fail "lincheck accepted a stale read"

CHUNK=65536
"$PEERD" root --listen 127.0.0.1:7400 --origin /tmp/f-origin.img --size 64M --chunk-size 64K \
  --volume vol0 2>>"$CANOPY_OUT/root.log" &
A=$!
wait_port 7400 "$A" A
"$PEERD" proxy --listen 127.0.0.1:7401 --parent 127.0.0.1:7400 --volume vol0 2>>"$CANOPY_OUT/b.log" &
B=$!
wait_port 7401 "$B" B
"$PEERD" proxy --listen 127.0.0.1:7402 --parent 127.0.0.1:7400 --volume vol0 2>>"$CANOPY_OUT/c.log" &
C=$!
wait_port 7402 "$C" C

start_volume --parent 127.0.0.1:7401 --volume vol0 --write-mode async
DEV_D=$DEV ID_D=$DEV_ID PID_D=$DAEMON_PID
start_volume --parent 127.0.0.1:7402 --volume vol0 --write-mode semi-sync
DEV_E=$DEV ID_E=$DEV_ID PID_E=$DAEMON_PID
start_volume --parent 127.0.0.1:7401 --volume vol0 --write-mode sync
DEV_F=$DEV ID_F=$DEV_ID PID_F=$DAEMON_PID

log "D and E write 16 shared chunks; D, E, F read them"
stop=/tmp/f-stop
python3 "$LINCHECK" read "$DEV_D" $CHUNK 16 $stop 5000 /tmp/f-rd &
RD=$!
python3 "$LINCHECK" read "$DEV_E" $CHUNK 16 $stop 5000 /tmp/f-re &
RE=$!
python3 "$LINCHECK" read "$DEV_F" $CHUNK 16 $stop 5000 /tmp/f-rf &
RF=$!
python3 "$LINCHECK" write "$DEV_D" 1 $CHUNK 16 150 /tmp/f-wd &
WD=$!
python3 "$LINCHECK" write "$DEV_E" 2 $CHUNK 16 150 /tmp/f-we &
WE=$!
wait "$WD" || fail "writer on D failed"
wait "$WE" || fail "writer on E failed"
touch $stop
for p in $RD $RE $RF; do wait "$p" || fail "a reader failed (see above)"; done
python3 "$LINCHECK" check /tmp/f-wd /tmp/f-we /tmp/f-rd /tmp/f-re /tmp/f-rf | tee "$CANOPY_OUT/f-lincheck.txt"

for id in $ID_D $ID_E $ID_F; do
  "$UBLK" stats --id "$id" --json >"$CANOPY_OUT/f-$id.json"
  [[ $(json_get "$CANOPY_OUT/f-$id.json" 's["io_errors"]') == 0 ]] || fail "device $id had I/O errors"
done

log "clean stop; the origin holds a last write of every chunk"
DEV=$DEV_D DEV_ID=$ID_D DAEMON_PID=$PID_D stop_volume
DEV=$DEV_E DEV_ID=$ID_E DAEMON_PID=$PID_E stop_volume
DEV=$DEV_F DEV_ID=$ID_F DAEMON_PID=$PID_F stop_volume
stop_pid "$B" B
stop_pid "$C" C
stop_pid "$A" A
# A write is "last" if no write of its chunk started after it completed
# (two concurrent last writes may land in either order).
python3 - /tmp/f-origin.img $CHUNK /tmp/f-wd /tmp/f-we <<'EOF' || fail "the origin lost a last write"
import struct, sys
origin, chunk_size, logs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
writes = {}
for p in logs:
    for line in open(p):
        _, c, w, seq, t0, t1 = line.split()
        writes.setdefault(int(c), []).append((int(w), int(seq), int(t0), int(t1)))
data = open(origin, "rb").read()
for c, ws in sorted(writes.items()):
    last = {(w, s) for (w, s, _, e) in ws if not any(o0 > e for (_, _, o0, _) in ws)}
    w, rc, s = struct.unpack_from("<IIQ", data, c * chunk_size)
    if rc != c or (w, s) not in last:
        sys.exit(f"chunk {c}: origin has writer {w} seq {s} (chunk {rc}), last writes were {sorted(last)}")
print(f"origin holds a last write of each of {len(writes)} chunks")
EOF
echo "scenario f: ok"
