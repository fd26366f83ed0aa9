# shellcheck shell=bash
# Shared helpers for the VM test harness. Source it; do not execute it.
#
# Why a VM at all: canopy is a ublk target and ublk needs the ublk_drv kernel
# module. Our host kernels have no ublk driver and cannot load modules, so any
# test that touches /dev/ublk-control or /dev/ublkb* boots a Debian 6.12 kernel
# under qemu (TCG) and runs there, with the host's root filesystem shared
# read-only over 9p so host-built binaries and tools run unchanged.
#
# Cache layout (outside the repo, never committed):
#   $CANOPY_VM_CACHE/kernels/<kver>/         `dpkg -x` of the kernel package (+ depmod)
#   $CANOPY_VM_CACHE/kernels/<kver>/.stamp   written last: marks a complete unpack
#   $CANOPY_VM_CACHE/current-kernel          the <kver> to use by default
#   $CANOPY_VM_CACHE/initramfs/<hash>.cpio   initramfs, keyed by everything in it

# Paths are derived from this file's location so the repo can live anywhere.
CANOPY_VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
CANOPY_REPO_DIR=$(cd "$CANOPY_VM_DIR/../.." && pwd -P)
CANOPY_VM_CACHE=${CANOPY_VM_CACHE:-${HOME:-/root}/.cache/canopy/vm}

# Kernel modules the guest loads from the initramfs before anything else.
# Dependencies found in modules.dep are added automatically, in load order;
# these names are what we need directly:
#  - crc32c_generic: ext4 asks the crypto API for "crc32c" (a softdep, so it is
#    not in modules.dep); without a provider ext4 metadata_csum mounts fail.
#  - crc16 mbcache jbd2 ext4: mkfs.ext4/mount in tests (ext4 is a module in Debian).
#  - netfs 9pnet 9pnet_virtio 9p: the 9p shares (host root and the out dir).
#  - ublk_drv: the point of the exercise (/dev/ublk-control).
#  - loop: tests compare canopy against a loop device on a tmpfs file.
#  - nbd: benchmark B6 compares canopy's device with /dev/nbd0 attached to
#    nbdkit in the guest (bench/vm-fio.sh).
# virtio, virtio_pci, virtio_ring, fuse are built into Debian's kernel.
# Extra modules: CANOPY_VM_EXTRA_MODULES="null_blk dm_mod ...".
CANOPY_VM_MODULES=(crc32c_generic crc16 mbcache jbd2 ext4 netfs 9pnet 9pnet_virtio 9p ublk_drv loop nbd)

# Debian packages the harness itself needs on the host.
CANOPY_VM_HOST_PKGS=(qemu-system-x86 busybox-static kmod xz-utils cpio util-linux)

vm_log() { echo "vm: $*" >&2; }
# One-line reason, non-zero exit: a VM test that cannot run must fail, not skip.
vm_die() { echo "vm: error: $*" >&2; exit 1; }

# Install the host packages the harness needs (no-op when present).
vm_ensure_host_deps() {
  local out
  if ! out=$("$CANOPY_REPO_DIR/scripts/install-deps" "${CANOPY_VM_HOST_PKGS[@]}" 2>&1); then
    printf '%s\n' "$out" >&2
    vm_die "cannot install the VM host packages (${CANOPY_VM_HOST_PKGS[*]})"
  fi
  # Only mention it when something was actually installed.
  [[ $out == *"nothing to do"* ]] || vm_log "$out"
  command -v qemu-system-x86_64 >/dev/null || vm_die "qemu-system-x86_64 not found after installing qemu-system-x86"
}

# Newest Debian 6.12 amd64 kernel package known to apt. The signed package
# ships the same vmlinuz + modules as -unsigned; take whichever exists.
_vm_pick_kernel_pkg() {
  local suffix pkg
  for suffix in "" "-unsigned"; do
    pkg=$(apt-cache pkgnames linux-image-6.12. 2>/dev/null |
      grep -E "^linux-image-6\.12\.[0-9]+\+deb[0-9]+-amd64${suffix}\$" | sort -V | tail -n1 || true)
    if [[ -n $pkg ]]; then echo "$pkg"; return 0; fi
  done
  return 1
}

# Make sure a kernel is unpacked in the cache. Sets VM_KVER, VM_KROOT,
# VM_VMLINUZ, VM_KPKG. Idempotent: once `current-kernel` and the stamp exist it
# does no apt/network work at all (so a new Debian point release does not force
# a 100 MB download on every machine; CANOPY_VM_KERNEL_REFRESH=1 re-picks the
# newest, CANOPY_VM_KERNEL_PKG=linux-image-... pins one).
vm_kernel_ensure() {
  local kcache="$CANOPY_VM_CACHE/kernels" pkg="${CANOPY_VM_KERNEL_PKG:-}" kver=""
  mkdir -p "$kcache" || vm_die "cannot create cache dir $kcache"

  # Serialise concurrent runs (e.g. two scenario runners) on the same cache.
  exec {_vm_lock_fd}>"$CANOPY_VM_CACHE/.lock"
  flock "$_vm_lock_fd"

  if [[ -z $pkg && ${CANOPY_VM_KERNEL_REFRESH:-0} != 1 && -s $CANOPY_VM_CACHE/current-kernel ]]; then
    kver=$(<"$CANOPY_VM_CACHE/current-kernel")
    [[ -f $kcache/$kver/.stamp ]] || kver=""
  fi

  if [[ -z $kver ]]; then
    if [[ -z $pkg ]]; then
      if ! pkg=$(_vm_pick_kernel_pkg); then
        # Fresh machines may have stale/empty lists: update once and retry.
        apt-get update -qq >/dev/null 2>&1 || true
        pkg=$(_vm_pick_kernel_pkg) || {
          flock -u "$_vm_lock_fd"
          vm_die "no linux-image-6.12.*-amd64 package known to apt (need Debian bookworm-security/backports lists)"
        }
      fi
    fi
    # Package name linux-image-<kver>[-unsigned] -> kver.
    kver=${pkg#linux-image-}
    kver=${kver%-unsigned}
    if [[ ! -f $kcache/$kver/.stamp ]]; then
      vm_log "fetching kernel package $pkg (~100 MB, once) into $kcache/$kver"
      local tmp
      tmp=$(mktemp -d "$kcache/.unpack.XXXXXX")
      # apt-get download drops privileges to _apt when it can; in a root-owned
      # mktemp dir it cannot and warns. Give _apt the dir to keep it quiet.
      chown _apt "$tmp" 2>/dev/null || true
      if ! (cd "$tmp" && apt-get download -q "$pkg") >"$tmp/download.log" 2>&1; then
        cat "$tmp/download.log" >&2
        rm -rf "$tmp"
        flock -u "$_vm_lock_fd"
        vm_die "apt-get download $pkg failed"
      fi
      dpkg -x "$tmp"/*.deb "$tmp/root" || { rm -rf "$tmp"; vm_die "dpkg -x failed for $pkg"; }
      [[ -f $tmp/root/boot/vmlinuz-$kver && -d $tmp/root/lib/modules/$kver ]] ||
        { rm -rf "$tmp"; vm_die "$pkg does not contain boot/vmlinuz-$kver and lib/modules/$kver"; }
      # The package's postinst would run depmod; we never install it, so do it here.
      depmod -b "$tmp/root" "$kver" || { rm -rf "$tmp"; vm_die "depmod failed for $kver"; }
      local debver
      debver=$(dpkg-deb -f "$tmp"/*.deb Version)
      rm -rf "${kcache:?}/${kver:?}"
      mv "$tmp/root" "$kcache/$kver"
      printf 'package=%s\nversion=%s\nkver=%s\n' "$pkg" "$debver" "$kver" >"$kcache/$kver/.stamp"
      rm -rf "$tmp"
    fi
    echo "$kver" >"$CANOPY_VM_CACHE/current-kernel"
  fi
  flock -u "$_vm_lock_fd"

  # Results for the caller (run-in-vm.sh, kernel.sh).
  # shellcheck disable=SC2034
  {
    VM_KVER=$kver
    VM_KROOT=$kcache/$kver
    VM_VMLINUZ=$VM_KROOT/boot/vmlinuz-$kver
    VM_KPKG=$(sed -n 's/^package=//p' "$VM_KROOT/.stamp")
    VM_KPKG_VERSION=$(sed -n 's/^version=//p' "$VM_KROOT/.stamp")
  }
}

# Print the module files (relative to lib/modules/<kver>) to insmod, in
# dependency order, for the module names given. Built-in modules are skipped.
_vm_module_order() {
  local moddir="$VM_KROOT/lib/modules/$VM_KVER"
  local -A path_of=() deps_of=() seen=()
  local line p name
  while IFS= read -r line; do
    p=${line%%:*}
    name=${p##*/}; name=${name%%.ko*}; name=${name//-/_}
    path_of[$name]=$p
    deps_of[$p]=${line#*:}
  done <"$moddir/modules.dep"

  local -a order=()
  _visit() {
    local p=$1 d
    [[ -n ${seen[$p]:-} ]] && return 0
    seen[$p]=1
    for d in ${deps_of[$p]}; do _visit "$d"; done
    order+=("$p")
  }
  local m
  for m in "$@"; do
    m=${m//-/_}
    if [[ -n ${path_of[$m]:-} ]]; then
      _visit "${path_of[$m]}"
    elif grep -qE "/${m}\.ko(\..*)?\$" "$moddir/modules.builtin" ||
         grep -qE "/${m//_/[-_]}\.ko(\..*)?\$" "$moddir/modules.builtin"; then
      : # built into the kernel: nothing to load
    else
      echo "unknown module: $m" >&2
      return 1
    fi
  done
  printf '%s\n' "${order[@]}"
}

# Build (or reuse) the initramfs. Sets VM_INITRD.
# Contents: static busybox, tests/vm/guest/init as /init, the modules above
# decompressed (busybox insmod cannot read .ko.xz) plus their load order.
vm_initramfs_ensure() {
  local busybox=/bin/busybox init="$CANOPY_VM_DIR/guest/init"
  [[ -x $busybox ]] || vm_die "$busybox missing (package busybox-static)"
  # Debian's dynamic `busybox` package also installs /bin/busybox; we need the
  # static one (busybox-static) because the initramfs has no libc.
  if ldd "$busybox" 2>&1 | grep -q '=>'; then
    vm_die "$busybox is dynamically linked; install busybox-static instead of busybox"
  fi

  local -a mods
  # shellcheck disable=SC2206 # word splitting of the extra list is intended
  mods=("${CANOPY_VM_MODULES[@]}" ${CANOPY_VM_EXTRA_MODULES:-})
  local order
  order=$(_vm_module_order "${mods[@]}") || vm_die "cannot resolve kernel modules (${mods[*]}) for $VM_KVER"

  # Cache key: anything that changes the image content.
  local key
  key=$( { echo "format=1 kver=$VM_KVER"; echo "$order"; sha256sum "$init" "$busybox"; } |
    sha256sum | cut -c1-16)
  VM_INITRD=$CANOPY_VM_CACHE/initramfs/$VM_KVER-$key.cpio
  [[ -s $VM_INITRD ]] && return 0

  mkdir -p "$CANOPY_VM_CACHE/initramfs"
  local tmp
  tmp=$(mktemp -d "$CANOPY_VM_CACHE/initramfs/.build.XXXXXX")
  mkdir -p "$tmp"/{bin,dev,proc,sys,host,hostraw,modules,etc}
  cp "$busybox" "$tmp/bin/busybox"
  ln -s busybox "$tmp/bin/sh"
  install -m 0755 "$init" "$tmp/init"
  local p n=0 f src="$VM_KROOT/lib/modules/$VM_KVER"
  while IFS= read -r p; do
    [[ -n $p ]] || continue
    f=$(printf '%03d-%s' "$n" "${p##*/}"); f=${f%%.ko*}.ko
    case $p in
      *.ko.xz) xz -dc "$src/$p" >"$tmp/modules/$f" ;;
      *.ko.zst) zstd -qdc "$src/$p" >"$tmp/modules/$f" ;;
      *.ko.gz) gzip -dc "$src/$p" >"$tmp/modules/$f" ;;
      *.ko) cp "$src/$p" "$tmp/modules/$f" ;;
      *) rm -rf "$tmp"; vm_die "unexpected module file $p" ;;
    esac || { rm -rf "$tmp"; vm_die "cannot unpack module $p"; }
    n=$((n + 1))
  done <<<"$order"
  echo "$VM_KVER" >"$tmp/etc/canopy-kver"
  # Uncompressed newc cpio: a few MB, and TCG would spend longer inflating it.
  (cd "$tmp" && find . -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc -R 0:0 --quiet) >"$tmp.cpio" ||
    { rm -rf "$tmp" "$tmp.cpio"; vm_die "cpio failed building the initramfs"; }
  mv "$tmp.cpio" "$VM_INITRD"
  rm -rf "$tmp"
  # Images for older init scripts/kernels pile up as the harness changes; they
  # are cheap to rebuild, so drop the ones nobody built for a week.
  find "$CANOPY_VM_CACHE/initramfs" -maxdepth 1 -name '*.cpio' -mtime +7 -delete 2>/dev/null || true
}
