#!/usr/bin/env bash
# Make the kernel hand aarch64 ELF binaries to qemu-aarch64-static (binfmt_misc is not mounted by default here).
set -euo pipefail
if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
if ! grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null; then
  echo "error: binfmt_misc entry qemu-aarch64 is not enabled (is qemu-user-static installed?)" >&2
  exit 1
fi
