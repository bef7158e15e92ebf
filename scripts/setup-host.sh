#!/bin/bash
# Idempotent host set-up for vmhost on Debian 12 without systemd: packages,
# the libvirt-qemu user, /dev/kvm access, virtlogd + libvirtd (under a child
# subreaper so destroyed QEMU processes are reaped at once). Run as root.
# sanlock and libvirt's sanlock lock driver serve shared domains and `vmhost lab`;
# their daemons are started per lab host (vmhost/lab), not here.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
# fuse: libfuse2 + fusermount for the freezable test file system (tests/integration/freezefs.py)
PKGS="qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev
      pkg-config gcc libc6-dev python3-venv fuse sanlock python3-sanlock libvirt-sanlock"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup: installing$missing"
    apt-get update -q
    apt-get install -y -q --no-install-recommends $missing
fi
getent group kvm >/dev/null || groupadd -r kvm
getent group libvirt-qemu >/dev/null || groupadd -r -g 64055 libvirt-qemu
getent passwd libvirt-qemu >/dev/null || useradd -r -u 64055 -g kvm -G libvirt-qemu \
    -d /var/lib/libvirt -M -s /usr/sbin/nologin -c "Libvirt Qemu" libvirt-qemu
mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/qemu /var/cache/libvirt/qemu
if [ -c /dev/kvm ]; then chgrp kvm /dev/kvm; chmod 0660 /dev/kvm; fi
# Drives use aio=native: every QEMU takes kernel AIO contexts, and the default
# limit (65536 events) runs out at a few dozen VMs ("failed to create linux AIO
# context"). Hypervisor hosts raise it.
if [ "$(cat /proc/sys/fs/aio-max-nr)" -lt 1048576 ]; then
    sysctl -q -w fs.aio-max-nr=1048576 || echo "setup: cannot raise fs.aio-max-nr" >&2
fi
exec scripts/start-libvirt.sh
