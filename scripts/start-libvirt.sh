#!/bin/bash
# Start virtlogd and libvirtd unless libvirtd already answers. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
URI=qemu:///system
if virsh -c $URI version >/dev/null 2>&1; then
    exit 0
fi
# Our daemons are the ones of this /run: `pgrep` would also see the libvirtd and
# virtlogd of `vmhost lab` hosts (other mount namespaces, their own /run).
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
alive /run/virtlogd.pid || virtlogd -d || true
# A stale pid file from a killed daemon would block the new one.
if [ -f /run/libvirtd.pid ] && ! alive /run/libvirtd.pid; then
    rm -f /run/libvirtd.pid
fi
if ! alive /run/libvirtd.pid; then
    setsid python3 scripts/subreaper.py libvirtd \
        >>/var/log/libvirt/libvirtd.stderr 2>&1 </dev/null &
fi
for _ in $(seq 300); do
    virsh -c $URI version >/dev/null 2>&1 && exit 0
    sleep 0.1
done
echo "setup: libvirtd did not answer on $URI; see /var/log/libvirt/libvirtd.stderr" >&2
exit 1
