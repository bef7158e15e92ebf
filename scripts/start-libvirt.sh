#!/bin/bash
# Start virtlogd and libvirtd unless libvirtd already answers. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
URI=qemu:///system
if virsh -c $URI version >/dev/null 2>&1; then
    exit 0
fi
pgrep -x virtlogd >/dev/null || virtlogd -d || true
# A stale pid file from a killed daemon would block the new one.
if [ -f /run/libvirtd.pid ] && ! kill -0 "$(cat /run/libvirtd.pid)" 2>/dev/null; then
    rm -f /run/libvirtd.pid
fi
if ! pgrep -x libvirtd >/dev/null; then
    setsid python3 scripts/subreaper.py libvirtd \
        >>/var/log/libvirt/libvirtd.stderr 2>&1 </dev/null &
fi
for _ in $(seq 300); do
    virsh -c $URI version >/dev/null 2>&1 && exit 0
    sleep 0.1
done
echo "setup: libvirtd did not answer on $URI; see /var/log/libvirt/libvirtd.stderr" >&2
exit 1
