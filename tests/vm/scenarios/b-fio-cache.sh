#!/usr/bin/env bash
# Scenario b: fio random writes then verified reads (crc32c), iodepth 16, two
# queues, zero verify errors. The memory tier is far smaller than the working
# set and a disk tier sits below it, so promotion, demotion and victim drains
# really happen: asserted from `canopy-ublk stats --json`. While fio runs,
# the cache is reconfigured live (tier added, rehashed, resized, removed).
source "$CANOPY_REPO/tests/vm/scenario-lib.sh"

start_volume --origin /tmp/b-origin.img --size 256M --chunk-size 64K \
  --cache-mem 4M --cache-disk /tmp/b-tier1.img:16M --cache-mode writeback --queues 2 --depth 32

fio_job() {
  fio --eta=never --name=b --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=16 \
    --bs=4k --numjobs=2 --size=48M --offset_increment=64M --randrepeat=0 \
    --verify=crc32c --verify_fatal=1 --verify_state_save=0 "$@"
}

reconfigure() {
  sleep 2
  "$UBLK" cache --id "$DEV_ID" add-tier --index 1 --memory 2M --hash mix:0x1234 >/dev/null
  sleep 1
  "$UBLK" cache --id "$DEV_ID" rehash --index 0 --hash mix:42 >/dev/null
  sleep 1
  "$UBLK" cache --id "$DEV_ID" resize --index 0 --size 3M >/dev/null
  sleep 1
  "$UBLK" cache --id "$DEV_ID" remove-tier --index 1 >/dev/null
  "$UBLK" cache --id "$DEV_ID" rehash --index 0 --hash modulo >/dev/null
  echo reconfigured
}

log "fio randwrite + verify, with live reconfiguration"
reconfigure >/tmp/b-reconf.out 2>&1 &
reconf_pid=$!
fio_job --rw=randwrite --do_verify=1 --output="$CANOPY_OUT/b-fio-write.txt" || { cat "$CANOPY_OUT/b-fio-write.txt"; fail "fio write+verify failed"; }
wait "$reconf_pid" || { cat /tmp/b-reconf.out; fail "live reconfiguration failed"; }
grep -q reconfigured /tmp/b-reconf.out || fail "reconfiguration did not finish"
log "fio verify-only pass after the cache churned"
fio_job --rw=randread --verify_only=1 --output="$CANOPY_OUT/b-fio-verify.txt" || { cat "$CANOPY_OUT/b-fio-verify.txt"; fail "fio verify pass failed"; }
grep -E "err= *0" "$CANOPY_OUT/b-fio-write.txt" >/dev/null || fail "fio reported errors"

stats_json "$CANOPY_OUT/b-stats.json"
"$UBLK" stats --id "$DEV_ID"
s=$CANOPY_OUT/b-stats.json
[[ $(json_get "$s" "len(s['cache']['tiers'])") == 2 ]] || fail "expected two tiers after reconfiguration"
[[ $(json_get "$s" "s['cache']['tiers'][1]['promotions'] > 0") == True ]] || fail "no promotions from the disk tier"
[[ $(json_get "$s" "s['cache']['tiers'][1]['demotions'] > 0") == True ]] || fail "no demotions into the disk tier"
[[ $(json_get "$s" "s['cache']['victim']['drains'] > 0") == True ]] || fail "no victim drains"
[[ $(json_get "$s" "s['cache']['victim']['writebacks'] > 0") == True ]] || fail "no dirty write-backs from the victim repository"
[[ $(json_get "$s" "s['io_errors']") == 0 ]] || fail "the daemon reported I/O errors"
stop_volume
echo "scenario b: ok"
