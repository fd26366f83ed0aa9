#!/usr/bin/env bash
# Run VM scenarios, each in its own fresh VM boot (no state leaks between them:
# ublk devices, mounts, tmpfs contents all die with the guest).
#
#   tests/vm/run-scenarios.sh            # every tests/vm/scenarios/*.sh, sorted
#   tests/vm/run-scenarios.sh smoke foo  # just these (with or without .sh)
#
# Prints `PASS name (Ns)` / `FAIL name (Ns)` per scenario and ends with exactly
# one line `vm: N passed, N failed`. Exits non-zero if any failed or none ran.
# A scenario that cannot run (no qemu, no kernel) FAILS; nothing is skipped.
#
# Scenarios run host binaries as they are: build first (cargo build --release).
#
# Env:
#   CANOPY_VM_OUT_ROOT  where per-scenario output dirs go (default: mktemp dir)
#   CANOPY_VM_QUIET=1   do not stream the console; show it only for failures
#   plus everything run-in-vm.sh understands (CANOPY_VM_TIMEOUT, _MEM, _CPUS...).
set -euo pipefail
# shellcheck source=tests/vm/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

scen_dir=$CANOPY_VM_DIR/scenarios
names=()
if (($#)); then
  for n in "$@"; do names+=("${n%.sh}"); done
else
  for f in "$scen_dir"/*.sh; do
    [[ -e $f ]] && names+=("$(basename "$f" .sh)")
  done
fi

out_root=${CANOPY_VM_OUT_ROOT:-$(mktemp -d "${TMPDIR:-/tmp}/canopy-vm-scenarios.XXXXXX")}
mkdir -p "$out_root"
echo "vm: scenario output under $out_root" >&2

# Prepare the host deps, kernel and initramfs once, up front, so a failure
# there is reported once (and every scenario then counts as failed).
prep_err=""
if ! prep_out=$( (vm_ensure_host_deps && vm_kernel_ensure && vm_initramfs_ensure) 2>&1); then
  prep_err=$(printf '%s\n' "$prep_out" | grep -m1 'vm: error:' || printf '%s\n' "$prep_out" | tail -n1)
  prep_err=${prep_err:-preparing the VM failed}
fi
[[ -z $prep_out ]] || printf '%s\n' "$prep_out" >&2

pass=0 fail=0
results=()
for name in "${names[@]}"; do
  start=$SECONDS
  out=$out_root/$name
  rc=0
  if [[ -n $prep_err ]]; then
    echo "vm: $name: cannot run: $prep_err" >&2
    rc=1
  elif [[ ! $name =~ ^[A-Za-z0-9_.-]+$ || ! -f $scen_dir/$name.sh ]]; then
    echo "vm: $name: no such scenario ($scen_dir/$name.sh)" >&2
    rc=1
  else
    echo "=== $name" >&2
    mkdir -p "$out"
    if [[ ${CANOPY_VM_QUIET:-0} == 1 ]]; then
      CANOPY_VM_OUT=$out "$CANOPY_VM_DIR/run-in-vm.sh" "$scen_dir/$name.sh" >"$out/run.log" 2>&1 || rc=$?
      ((rc == 0)) || cat "$out/run.log"
    else
      CANOPY_VM_OUT=$out "$CANOPY_VM_DIR/run-in-vm.sh" "$scen_dir/$name.sh" || rc=$?
    fi
  fi
  secs=$((SECONDS - start))
  if ((rc == 0)); then
    line="PASS $name (${secs}s)"
    pass=$((pass + 1))
  else
    line="FAIL $name (${secs}s)"
    fail=$((fail + 1))
  fi
  echo "$line"
  results+=("$line")
done

if ((${#names[@]} == 0)); then
  echo "vm: no scenarios found in $scen_dir" >&2
fi
if ((${#results[@]} > 1)); then
  echo "--- summary"
  printf '%s\n' "${results[@]}"
fi
echo "vm: $pass passed, $fail failed"
((fail == 0 && pass > 0))
