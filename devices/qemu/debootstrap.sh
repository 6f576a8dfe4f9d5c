#!/usr/bin/env bash
# Build (once) a minimal arm64 Debian bookworm root file system with debootstrap + qemu-user-static.
# Usage: devices/qemu/debootstrap.sh ROOTFS
# Idempotent: a finished root file system carries ROOTFS/.edgelearn-base-ok and is left as it is.
set -euo pipefail
rootfs="${1:?usage: debootstrap.sh ROOTFS}"
suite="${EDGELEARN_QEMU_SUITE:-bookworm}"
stamp="$rootfs/.edgelearn-base-ok"

if [[ -f "$stamp" ]]; then
  echo "debootstrap: cached root file system at $rootfs"
  exit 0
fi
for tool in debootstrap qemu-aarch64-static update-binfmts; do
  command -v "$tool" >/dev/null || { echo "error: $tool is missing (apt-get install debootstrap qemu-user-static binfmt-support)" >&2; exit 1; }
done
"$(dirname "$0")/binfmt.sh"
rm -rf "$rootfs"
mkdir -p "$rootfs"
debootstrap --arch=arm64 --foreign --variant=minbase \
  --include=python3,python3-venv,python3-pip "$suite" "$rootfs"
# The second stage runs arm64 code: binfmt_misc hands it to qemu-aarch64-static (F flag: no copy needed).
chroot "$rootfs" /debootstrap/debootstrap --second-stage
touch "$stamp"
echo "debootstrap: done ($rootfs)"
