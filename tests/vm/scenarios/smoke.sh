#!/usr/bin/env bash
# Smoke test of the VM harness itself (runs inside the guest via run-in-vm.sh):
# the right kernel booted, ublk is available, and the block/filesystem tooling
# the real scenarios rely on (loop, mkfs.ext4, mount, fio with io_uring) works.
# Leaves smoke.json (and fio output) in $CANOPY_OUT.
set -euo pipefail

: "${CANOPY_OUT:?must run inside the VM (tests/vm/run-in-vm.sh)}"
step() { echo "smoke: $*"; }
die() { echo "smoke: FAIL: $*" >&2; exit 1; }

kver=$(uname -r)
step "kernel $kver"
[[ $kver == 6.12.* ]] || die "expected a 6.12 kernel, got $kver"

[[ -c /dev/ublk-control ]] || die "/dev/ublk-control missing"
grep -q '^ublk_drv ' /proc/modules || die "ublk_drv not loaded"
step "/dev/ublk-control present"

# ublk is driven through io_uring; a disabled io_uring would break canopy.
if [[ -r /proc/sys/kernel/io_uring_disabled ]]; then
  [[ $(</proc/sys/kernel/io_uring_disabled) == 0 ]] || die "io_uring is disabled (kernel.io_uring_disabled)"
fi

[[ -f $CANOPY_REPO/Cargo.toml ]] || die "repo not visible at $CANOPY_REPO"
touch "$CANOPY_OUT/.smoke-write-test" || die "CANOPY_OUT not writable"
rm "$CANOPY_OUT/.smoke-write-test"
step "repo visible, out dir writable"

loop=skipped
if [[ -e /dev/loop-control ]]; then
  img=/tmp/smoke.img mnt=/mnt/smoke
  truncate -s 128M "$img"
  dev=$(losetup -f --show "$img")
  mkfs.ext4 -q -F "$dev"
  mkdir -p "$mnt"
  mount "$dev" "$mnt"
  dd if=/dev/urandom of="$mnt/data" bs=1M count=16 status=none
  sum1=$(sha256sum <"$mnt/data")
  umount "$mnt"
  # Remount and re-read: the data must survive a full unmount.
  mount -o ro "$dev" "$mnt"
  sum2=$(sha256sum <"$mnt/data")
  umount "$mnt"
  [[ $sum1 == "$sum2" ]] || die "data changed across umount/mount"
  fsck_out=$(e2fsck -fn "$dev" 2>&1) || { echo "$fsck_out"; die "e2fsck found errors"; }
  step "loop + mkfs.ext4 + mount + write + umount + e2fsck OK ($dev)"

  # fio with io_uring on the loop device: the engine canopy's tests compare with.
  fio --eta=never --name=smoke --filename="$dev" --ioengine=io_uring --direct=1 --rw=randrw \
    --bs=4k --size=32M --iodepth=8 --runtime=3 --time_based \
    --output-format=json --output="$CANOPY_OUT/smoke-fio.json" >/dev/null ||
    die "fio (io_uring) on $dev failed"
  step "fio io_uring on loop OK"
  losetup -d "$dev"
  rm -f "$img"
  loop=ok
else
  step "no /dev/loop-control: loop part skipped"
fi

printf '{"kernel":"%s","ublk_control":true,"loop":"%s"}\n' "$kver" "$loop" >"$CANOPY_OUT/smoke.json"
step "PASS"
