# Helpers shared by the in-VM scenarios (sourced, not run). The scenarios run
# inside the guest, chrooted into the host's root, as root, with
# $CANOPY_REPO and $CANOPY_OUT set by run-in-vm.sh.
set -euo pipefail

UBLK=${CANOPY_UBLK:-${CARGO_TARGET_DIR:-$CANOPY_REPO/target}/release/canopy-ublk}
[[ -x $UBLK ]] || { echo "FAIL: $UBLK is not built (cargo build --release)"; exit 1; }

log() { echo "== $*"; }
fail() { echo "FAIL: $*"; exit 1; }

# start_volume ARGS...: run `canopy-ublk add ARGS` (or `recover` when the
# first arg is `recover`) in the background and wait for the device.
# Sets DEV, DEV_ID and DAEMON_PID.
start_volume() {
  local sub=add
  if [[ ${1:-} == recover ]]; then sub=recover; shift; fi
  local out
  out=$(mktemp /tmp/canopy-dev.XXXXXX)
  "$UBLK" "$sub" "$@" >"$out" 2>>"$CANOPY_OUT/daemon.log" &
  DAEMON_PID=$!
  local i
  for i in $(seq 1 600); do
    if [[ -s $out ]]; then break; fi
    kill -0 "$DAEMON_PID" 2>/dev/null || { tail -20 "$CANOPY_OUT/daemon.log"; fail "canopy-ublk $sub exited before the device came up"; }
    sleep 0.1
  done
  DEV=$(head -n1 "$out")
  [[ $DEV == /dev/ublkb* ]] || fail "canopy-ublk $sub printed '$DEV', not a device path"
  DEV_ID=${DEV#/dev/ublkb}
  for i in $(seq 1 100); do [[ -b $DEV ]] && break; sleep 0.1; done
  [[ -b $DEV ]] || fail "$DEV did not appear"
  log "$DEV served by pid $DAEMON_PID ($sub $*)"
}

# stop_volume: SIGTERM the daemon and require a clean exit (it flushes).
stop_volume() {
  kill -TERM "$DAEMON_PID"
  # Bounded: a daemon that cannot stop is a failure, not a hang.
  local i
  for i in $(seq 1 600); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$DAEMON_PID" 2>/dev/null && { tail -20 "$CANOPY_OUT/daemon.log"; fail "daemon did not exit within 60 s of SIGTERM"; }
  local rc=0
  wait "$DAEMON_PID" || rc=$?
  [[ $rc == 0 ]] || { tail -20 "$CANOPY_OUT/daemon.log"; fail "daemon exited with $rc on SIGTERM"; }
  for _ in $(seq 1 100); do [[ -e $DEV ]] || break; sleep 0.1; done
  [[ ! -e $DEV ]] || fail "$DEV still exists after the daemon stopped"
  log "daemon stopped cleanly, $DEV removed"
}

# stats_json FILE: save `canopy-ublk stats --json` of the current device.
stats_json() {
  "$UBLK" stats --id "$DEV_ID" --json >"$1"
}

# json_get FILE EXPR: evaluate a Python expression over the parsed JSON `s`.
json_get() {
  python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}

# write_tree DIR MIB: a tree of files of mixed sizes, about MIB MiB in all.
write_tree() {
  local dir=$1 mib=$2 i
  mkdir -p "$dir"
  for i in $(seq 1 "$mib"); do
    mkdir -p "$dir/d$((i % 7))/e$((i % 3))"
    head -c $((1024 * 1024 - i * 977)) /dev/urandom >"$dir/d$((i % 7))/e$((i % 3))/big$i"
    head -c $((i * 131)) /dev/urandom >"$dir/d$((i % 7))/small$i"
  done
}

# checksum_tree DIR OUT: sha256 of every file, paths relative to DIR.
checksum_tree() {
  (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$2"
}

# wait_port PORT PID NAME: wait (bounded) until something listens on
# 127.0.0.1:PORT, failing early if process PID (a daemon) exits.
wait_port() {
  local port=$1 pid=$2 name=$3 i
  for i in $(seq 1 300); do
    if ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; then
      log "$name listens on $port"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || fail "$name exited before listening on $port"
    sleep 0.1
  done
  fail "$name does not listen on $port after 30 s"
}

# stop_pid PID NAME: SIGTERM a daemon and require a clean exit within 60 s.
stop_pid() {
  local pid=$1 name=$2 i rc=0
  kill -TERM "$pid"
  for i in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && fail "$name did not exit within 60 s of SIGTERM"
  wait "$pid" || rc=$?
  [[ $rc == 0 ]] || fail "$name exited with $rc on SIGTERM"
  log "$name stopped cleanly"
}
