#!/bin/bash
# Idempotent host set-up for vmhost on Debian 12 without systemd: packages,
# the libvirt-qemu user, /dev/kvm access, virtlogd + libvirtd (under a child
# subreaper so destroyed QEMU processes are reaped at once). Run as root.
# sanlock and libvirt's sanlock lock driver serve shared domains and `vmhost lab`;
# their daemons are started per lab host (vmhost/lab), not here.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
PKGS="qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev
      pkg-config gcc libc6-dev python3-venv sanlock python3-sanlock libvirt-sanlock"
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
exec scripts/start-libvirt.sh
