#!/bin/sh
# Run CMD as emulated arm64 code inside ROOTFS with the fake CPU description FAKE (from fakecpu.py).
# Usage: devices/qemu/chroot-run.sh ROOTFS FAKE CMD [ARG...]   (QEMU_CPU picks the emulated core, e.g. cortex-a72)
# All mounts live in a private mount namespace (unshare): they vanish with the command, even when it is killed,
# and never show up in the host's mount table.
set -eu
[ "$#" -ge 3 ] || { echo "usage: chroot-run.sh ROOTFS FAKE CMD [ARG...]" >&2; exit 2; }
[ -x "$1/usr/bin/python3" ] || { echo "error: $1 is not a finished root file system (no usr/bin/python3)" >&2; exit 2; }
[ -f "$2/cpuinfo" ] || { echo "error: $2 has no cpuinfo (write it with devices/qemu/fakecpu.py)" >&2; exit 2; }
exec unshare --mount --propagation private -- sh -eu -c '
root="$1"; fake="$2"; shift 2
mount -t proc proc "$root/proc"
mount --bind "$fake/cpuinfo" "$root/proc/cpuinfo"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o size=1m,mode=0755 tmpfs "$root/sys"
mkdir -p "$root/sys/devices/system/cpu"
mount --bind "$fake/sys/devices/system/cpu" "$root/sys/devices/system/cpu"
mount -o remount,bind,ro "$root/sys/devices/system/cpu"
export QEMU_CPU="${QEMU_CPU:-cortex-a72}" HOME=/root PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
exec chroot "$root" "$@"
' sh "$@"
