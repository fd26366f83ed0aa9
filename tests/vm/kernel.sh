#!/usr/bin/env bash
# Fetch, unpack and depmod the guest kernel into the cache (once), then print
# where it is. Safe to run any number of times: after the first run it only
# reads the cache (no apt, no network).
#
#   tests/vm/kernel.sh            # ensure kernel + initramfs, print details
#
# Env: CANOPY_VM_CACHE (default ~/.cache/canopy/vm), CANOPY_VM_KERNEL_PKG to pin
# a package, CANOPY_VM_KERNEL_REFRESH=1 to pick the newest 6.12 again.
set -euo pipefail
# shellcheck source=tests/vm/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

vm_ensure_host_deps
vm_kernel_ensure
vm_initramfs_ensure

echo "kernel:    $VM_KVER"
echo "package:   $VM_KPKG $VM_KPKG_VERSION"
echo "vmlinuz:   $VM_VMLINUZ"
echo "modules:   $VM_KROOT/lib/modules/$VM_KVER"
echo "initramfs: $VM_INITRD"
