#!/usr/bin/env bash
# Check canopy's systemd unit templates with `systemd-analyze verify`.
#
#   tests/systemd/verify.sh BIN_DIR     # BIN_DIR holds canopy-peerd and canopy-ublk
#   tests/systemd/verify.sh --self-test # prove the check fails on broken units
#
# The units call /usr/local/bin/canopy-*; systemd-analyze verify insists that
# executables exist, so the units are copied to a temporary directory with
# /usr/local/bin/ in their Exec*= lines rewritten to BIN_DIR, and verified
# there. Fails (exit 1) when:
#  - canopy-peerd or canopy-ublk is missing from BIN_DIR (never a silent skip);
#  - systemd-analyze verify exits non-zero for our units;
#  - it prints any line about our units (their names or the temporary
#    directory): it is silent on a good unit, and reports unknown keys, bad
#    values and the like as warnings, with an exit status that depends on
#    version and options. Lines about other units of the host are shown as
#    ignored;
#  - a unit named in Wants=, After=, WantedBy=... has no unit file on this
#    host (verify says nothing about a misspelt dependency at its default
#    log level);
#  - systemd/canopy.sysusers.conf fails `systemd-sysusers --dry-run`, an
#    example config is not TOML, or a key of examples/vol0-leaf.toml is not
#    a long option of `BIN_DIR/canopy-ublk add --help`.
# --self-test runs the checks on stub executables: the real units must pass,
# and each deliberately broken variant (unknown key, bad value, misspelt
# dependency, missing program, missing binary, bad example key) must fail
# with its own finding, so a clean result cannot be vacuous.
# systemd-analyze comes from the `systemd` package, installed when missing.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
UNIT_SRC_DIR="$REPO/systemd"
UNITS=(canopy-peerd@.service canopy-ublk@.service)
BINARIES=(canopy-peerd canopy-ublk)

say() { echo "verify.sh: $*"; }
die() { echo "verify.sh: error: $*" >&2; exit 1; }

# Install systemd (which ships systemd-analyze) when it is missing, the way
# scripts/install-deps does: quiet on success, apt's output on failure.
ensure_systemd_analyze() {
  command -v systemd-analyze >/dev/null 2>&1 && return 0
  local sudo=()
  if ((EUID != 0)); then
    command -v sudo >/dev/null 2>&1 ||
      die "systemd-analyze is missing and installing it needs root or sudo"
    sudo=(sudo -n)
  fi
  local log
  log=$(mktemp "${TMPDIR:-/tmp}/verify-systemd-apt.XXXXXX.log")
  # env inside sudo: sudo resets the environment it was given.
  if ! { "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
         "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
           --no-install-recommends systemd; } >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    die "apt-get failed installing systemd (for systemd-analyze)"
  fi
  rm -f "$log"
  command -v systemd-analyze >/dev/null 2>&1 ||
    die "systemd installed but systemd-analyze still not found"
  say "installed systemd (for systemd-analyze)"
}

# Unit names our units refer to in dependency settings, one per line.
referenced_units() {
  sed -n -E 's/^[[:space:]]*(Wants|Requires|Requisite|BindsTo|PartOf|Upholds|After|Before|Conflicts|OnFailure|OnSuccess|WantedBy|RequiredBy|UpheldBy|Also)[[:space:]]*=[[:space:]]*//p' "$@" |
    tr -s '[:space:]' '\n' | sed '/^$/d' | sort -u
}

# Is there a unit file for NAME (or, for foo@bar.service, foo@.service) in
# the host's unit search path?
unit_file_exists() {
  local name=$1 template="" dir
  if [[ $name == *@?*.* ]]; then
    template="${name%%@*}@.${name##*.}"
  fi
  while read -r dir; do
    [[ -e "$dir/$name" ]] && return 0
    [[ -n $template && -e "$dir/$template" ]] && return 0
  done < <(systemd-analyze unit-paths 2>/dev/null)
  return 1
}

# check_units BIN_DIR UNIT_FILE... : verify copies of UNIT_FILEs whose
# executables are taken from BIN_DIR. Prints what it checked and every
# finding; returns 0 when clean, 1 otherwise.
check_units() {
  local bin_dir=$1
  shift
  local -a sources=("$@")
  [[ -d $bin_dir ]] || { echo "verify.sh: FAIL: BIN_DIR $bin_dir is not a directory" >&2; return 1; }
  bin_dir=$(cd "$bin_dir" && pwd)
  # The directory is pasted into unit files: keep to characters that mean
  # nothing to systemd's command-line parsing (no spaces, % or $) nor to sed.
  [[ $bin_dir =~ ^[A-Za-z0-9._/+-]+$ ]] ||
    { echo "verify.sh: FAIL: BIN_DIR '$bin_dir' has characters unsafe in a unit file" >&2; return 1; }

  local missing=() b
  for b in "${BINARIES[@]}"; do
    [[ -f $bin_dir/$b && -x $bin_dir/$b ]] || missing+=("$b")
  done
  if ((${#missing[@]})); then
    echo "verify.sh: FAIL: not executable or missing in $bin_dir: ${missing[*]}" >&2
    return 1
  fi

  local tmp rc=0
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/canopy-units.XXXXXX")
  check_copies "$bin_dir" "$tmp" "${sources[@]}" || rc=$?
  rm -rf "$tmp"
  return "$rc"
}

# check_copies BIN_DIR TMP UNIT_FILE... : the body of check_units, with the
# unit copies in TMP (removed by the caller).
check_copies() {
  local bin_dir=$1 tmp=$2
  shift 2
  local -a sources=("$@")
  local src name copies=() patterns=("$tmp") failed=0
  for src in "${sources[@]}"; do
    [[ -f $src ]] || { echo "verify.sh: FAIL: unit file $src not found" >&2; return 1; }
    name=$(basename "$src")
    sed -E "/^[[:space:]]*Exec[A-Za-z]*=/ s#/usr/local/bin/#$bin_dir/#g" "$src" >"$tmp/$name"
    # The rewrite must have happened: an ExecStart= naming BIN_DIR, and no
    # Exec*= line left pointing at /usr/local/bin.
    if ! grep -Fq "ExecStart=$bin_dir/" "$tmp/$name"; then
      echo "verify.sh: FAIL: $name: no ExecStart= runs a program from /usr/local/bin (rewritten to $bin_dir)" >&2
      failed=1
    fi
    if grep -Eq '^[[:space:]]*Exec[A-Za-z]*=.*/usr/local/bin/' "$tmp/$name"; then
      echo "verify.sh: FAIL: $name: an Exec*= line still names /usr/local/bin/" >&2
      failed=1
    fi
    copies+=("$tmp/$name")
    # Messages name the unit as the file (canopy-ublk@.service:12: ...) or
    # as an instance (canopy-ublk@i.service: ...): match the prefix.
    patterns+=("${name%%@*}@")
  done

  say "checking ${#copies[@]} unit(s) with $(systemd-analyze --version | head -n1)"
  for src in "${sources[@]}"; do
    say "  $src"
  done
  say "  executables from $bin_dir: ${BINARIES[*]}"

  # A caller's SYSTEMD_LOG_LEVEL=err would hide the warnings we look for:
  # pin the level. No colours, no pager, plain English.
  local out rc=0
  out=$(cd "$tmp" && env LC_ALL=C SYSTEMD_LOG_LEVEL=info SYSTEMD_LOG_COLOR=0 \
          SYSTEMD_LOG_LOCATION=0 SYSTEMD_PAGER=cat \
          systemd-analyze verify --recursive-errors=no "${copies[@]}" 2>&1) || rc=$?

  local pat_args=() p line ours=() others=()
  for p in "${patterns[@]}"; do pat_args+=(-e "$p"); done
  while IFS= read -r line; do
    [[ -z $line ]] && continue
    if grep -qF "${pat_args[@]}" <<<"$line"; then
      ours+=("$line")
    else
      others+=("$line")
    fi
  done <<<"$out"

  if ((${#others[@]})); then
    say "ignored ${#others[@]} line(s) about other units of this host:"
    printf '  - %s\n' "${others[@]}"
  fi
  if ((${#ours[@]})); then
    echo "verify.sh: FAIL: systemd-analyze verify reported on our units:" >&2
    printf '  | %s\n' "${ours[@]}" >&2
    failed=1
  fi
  if ((rc != 0)); then
    echo "verify.sh: FAIL: systemd-analyze verify exited $rc" >&2
    failed=1
  fi

  local ref unknown=()
  while IFS= read -r ref; do
    [[ -z $ref ]] && continue
    unit_file_exists "$ref" || unknown+=("$ref")
  done < <(referenced_units "${copies[@]}")
  if ((${#unknown[@]})); then
    echo "verify.sh: FAIL: dependencies with no unit file on this host: ${unknown[*]}" >&2
    failed=1
  else
    say "dependencies found on this host: $(referenced_units "${copies[@]}" | tr '\n' ' ')"
  fi

  if ((failed)); then
    return 1
  fi
  say "OK: systemd-analyze verify is clean for ${UNITS[*]}"
  return 0
}

# The files that come with the units: the sysusers.d entry must be valid
# (dry run against an empty root, nothing written), the example configs
# must be TOML, and every key of the canopy-ublk example must be a long
# option of BIN_DIR/canopy-ublk add (keys are the options with '_' for '-').
check_extras() {
  local bin_dir=$1 root rc=0 out
  root=$(mktemp -d "${TMPDIR:-/tmp}/canopy-sysusers.XXXXXX")
  out=$(systemd-sysusers --dry-run --root="$root" "$UNIT_SRC_DIR/canopy.sysusers.conf" 2>&1) || rc=$?
  rm -rf "$root"
  if ((rc != 0)) || grep -qiE 'warn|fail|error|invalid|ignor' <<<"$out"; then
    echo "verify.sh: FAIL: systemd-sysusers --dry-run on canopy.sysusers.conf (exit $rc):" >&2
    printf '  | %s\n' "$out" >&2
    return 1
  fi
  say "OK: canopy.sysusers.conf (systemd-sysusers --dry-run)"
  command -v python3 >/dev/null 2>&1 || die "python3 is needed to parse the example configs"
  python3 - "$UNIT_SRC_DIR"/examples/*.toml <<'PY' || return 1
import sys, tomllib
bad = 0
for path in sys.argv[1:]:
    try:
        with open(path, "rb") as f:
            keys = sorted(tomllib.load(f))
        print(f"verify.sh: OK: {path} is TOML ({', '.join(keys)})")
    except Exception as e:
        print(f"verify.sh: FAIL: {path}: {e}", file=sys.stderr)
        bad = 1
sys.exit(bad)
PY
  local help key missing=()
  help=$("$bin_dir/canopy-ublk" add --help 2>&1) || true
  grep -q -- '--origin' <<<"$help" ||
    { echo "verify.sh: FAIL: $bin_dir/canopy-ublk add --help does not list --origin: not canopy-ublk?" >&2; return 1; }
  while IFS= read -r key; do
    grep -qE -- "--${key//_/-}([^a-z-]|$)" <<<"$help" || missing+=("$key")
  done < <(python3 -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))))' \
             "$UNIT_SRC_DIR/examples/vol0-leaf.toml")
  if ((${#missing[@]})); then
    echo "verify.sh: FAIL: vol0-leaf.toml keys that are no option of canopy-ublk add: ${missing[*]}" >&2
    return 1
  fi
  say "OK: every key of vol0-leaf.toml is an option of $bin_dir/canopy-ublk add"
}

# --self-test: the check must pass on the real units with stub executables,
# and fail on each deliberately broken variant; otherwise a clean result
# would mean nothing.
self_test() {
  local work
  work=$(mktemp -d "${TMPDIR:-/tmp}/canopy-units-selftest.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" EXIT
  mkdir -p "$work/bin" "$work/nobin"
  local b
  for b in "${BINARIES[@]}"; do
    printf '#!/bin/sh\nexit 0\n' >"$work/bin/$b"
    chmod +x "$work/bin/$b"
  done
  # Only canopy-ublk: canopy-peerd missing.
  cp "$work/bin/canopy-ublk" "$work/nobin/"

  local real=()
  for b in "${UNITS[@]}"; do real+=("$UNIT_SRC_DIR/$b"); done

  # Broken copies, each in its own directory under the real names.
  mkdir -p "$work/unknown-key" "$work/bad-value" "$work/bad-dep" "$work/no-exec"
  sed '/^\[Service\]/a BogusSelfTestKey=1' "$UNIT_SRC_DIR/canopy-peerd@.service" \
    >"$work/unknown-key/canopy-peerd@.service"
  sed -E 's/^Type=notify$/Type=not-a-type/' "$UNIT_SRC_DIR/canopy-ublk@.service" \
    >"$work/bad-value/canopy-ublk@.service"
  sed -E 's/^(Wants=network-online)\.target$/\1-typo.target/' "$UNIT_SRC_DIR/canopy-peerd@.service" \
    >"$work/bad-dep/canopy-peerd@.service"
  sed -E 's#^ExecStart=/usr/local/bin/canopy-ublk #ExecStart=/usr/local/bin/canopy-ublk-gone #' \
    "$UNIT_SRC_DIR/canopy-ublk@.service" >"$work/no-exec/canopy-ublk@.service"
  # Each mutation must really have changed its file, or its case tests nothing.
  cmp -s "$work/unknown-key/canopy-peerd@.service" "$UNIT_SRC_DIR/canopy-peerd@.service" &&
    die "self-test: could not inject the unknown key"
  cmp -s "$work/bad-value/canopy-ublk@.service" "$UNIT_SRC_DIR/canopy-ublk@.service" &&
    die "self-test: could not inject the bad Type="
  cmp -s "$work/bad-dep/canopy-peerd@.service" "$UNIT_SRC_DIR/canopy-peerd@.service" &&
    die "self-test: could not inject the misspelt dependency"
  cmp -s "$work/no-exec/canopy-ublk@.service" "$UNIT_SRC_DIR/canopy-ublk@.service" &&
    die "self-test: could not point ExecStart= at a missing program"

  local failures=0 n=0
  # expect pass|fail LABEL NEEDLE COMMAND ARGS...
  # A failure counts only when the output contains NEEDLE: the case must fail
  # for its own reason (e.g. the reported warning itself, not merely the exit
  # status of systemd-analyze, which varies between versions and options).
  expect() {
    local want=$1 label=$2 needle=$3 got out
    shift 3
    n=$((n + 1))
    if out=$("$@" 2>&1); then got=pass; else got=fail; fi
    # Findings are the FAIL lines and the "  | " lines under them (lines
    # about other units are printed as "  - " and do not count).
    if [[ $got == fail && $want == fail ]] &&
       ! grep -E 'FAIL|^  \| ' <<<"$out" | grep -qF -- "$needle"; then
      echo "self-test: FAIL - $label: failed, but without the expected finding: $needle"
      sed 's/^/               /' <<<"$out"
      failures=$((failures + 1))
    elif [[ $got == "$want" ]]; then
      echo "self-test: ok   - $label: ${got}ed as expected"
      # Show why a broken case failed: the findings, not the preamble.
      if [[ $want == fail ]]; then
        grep -E 'FAIL|^  \| ' <<<"$out" | sed 's/^/               /'
      fi
    else
      echo "self-test: FAIL - $label: ${got}ed, expected to ${want}"
      sed 's/^/               /' <<<"$out"
      failures=$((failures + 1))
    fi
  }
  local key_line="Unknown key 'BogusSelfTestKey' in section [Service]"
  expect pass "real units, stub executables" "" check_units "$work/bin" "${real[@]}"
  expect fail "unknown key in [Service]" "$key_line" \
    check_units "$work/bin" "$work/unknown-key/canopy-peerd@.service"
  # The caller's log level must not hide the warning.
  SYSTEMD_LOG_LEVEL=err expect fail "unknown key, caller sets SYSTEMD_LOG_LEVEL=err" "$key_line" \
    check_units "$work/bin" "$work/unknown-key/canopy-peerd@.service"
  expect fail "invalid Type= value" "not-a-type" \
    check_units "$work/bin" "$work/bad-value/canopy-ublk@.service"
  expect fail "misspelt dependency" "no unit file on this host: network-online-typo.target" \
    check_units "$work/bin" "$work/bad-dep/canopy-peerd@.service"
  expect fail "ExecStart= program missing" "canopy-ublk-gone is not executable" \
    check_units "$work/bin" "$work/no-exec/canopy-ublk@.service"
  expect fail "canopy-peerd missing from BIN_DIR" "missing in $work/nobin: canopy-peerd" \
    check_units "$work/nobin" "${real[@]}"
  expect fail "BIN_DIR does not exist" "is not a directory" \
    check_units "$work/does-not-exist" "${real[@]}"

  # The example-config check, against a fake canopy-ublk whose help lists
  # every option but --cache-mode: the example's cache_mode must be caught.
  mkdir -p "$work/help-all" "$work/help-partial"
  local opts="--origin --size --chunk-size --cache-mem --cache-disk --cache-mode --queues --depth --id"
  printf '#!/bin/sh\necho "Options: %s"\n' "$opts" >"$work/help-all/canopy-ublk"
  printf '#!/bin/sh\necho "Options: %s"\n' "${opts/--cache-mode /}" >"$work/help-partial/canopy-ublk"
  chmod +x "$work/help-all/canopy-ublk" "$work/help-partial/canopy-ublk"
  expect pass "example configs, every key an option" "" check_extras "$work/help-all"
  expect fail "example config key that is no option" "no option of canopy-ublk add: cache_mode" \
    check_extras "$work/help-partial"

  if ((failures)); then
    echo "self-test: FAILED: $failures of $n case(s) did not behave as expected"
    return 1
  fi
  echo "self-test: PASSED: all $n cases behaved as expected"
}

main() {
  case "${1:-}" in
    --self-test)
      (($# == 1)) || die "usage: $0 --self-test"
      ensure_systemd_analyze
      self_test
      ;;
    "" | -h | --help)
      sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
      [[ -n ${1:-} ]] || exit 2
      ;;
    -*)
      die "unknown option $1 (usage: $0 BIN_DIR | --self-test)"
      ;;
    *)
      (($# == 1)) || die "usage: $0 BIN_DIR"
      ensure_systemd_analyze
      local units=() u
      for u in "${UNITS[@]}"; do units+=("$UNIT_SRC_DIR/$u"); done
      check_units "$1" "${units[@]}"
      check_extras "$1"
      ;;
  esac
}

main "$@"
