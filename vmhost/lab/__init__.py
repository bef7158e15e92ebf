"""`vmhost lab`: several vmhost hosts on one machine, for development, tests and demos.

A development tool, never imported by the agent. Each lab host is a set of
namespaces made by `unshare`:

- a PID namespace whose init is `vmhost.lab.hostinit`: it starts the host's
  virtlogd, sanlock daemon, libvirtd and `vmhost serve`, and reaps orphans
  (QEMU). SIGKILL to that init is a power cut: the kernel kills every process
  of the namespace at once (QEMU, daemons, agent).
- a mount namespace with the host's own /run (pid files, sockets, so its own
  libvirt and sanlock sockets), /etc/libvirt, /var/lib/libvirt, /var/log/libvirt
  and /var/cache/libvirt, bound from directories under the lab dir;
- a UTS namespace (hostname = the host's name);
- a network namespace joined to the machine by a veth pair on a bridge the lab
  creates, in a private /24 of 10.237.0.0/16 that no interface uses yet:
  traffic stays on this machine.

Layout (lab dir, default /var/lib/vmhost-lab; `--dir` or $VMHOST_LAB_DIR):
    lab.json               lab state: storage, subnet, hosts, pids (with start times)
    lab.lock               serialises lab commands
    storage/               default shared storage (every host sees the same path)
    hosts/hostN/           one host: run/ etc-libvirt/ var-lib-libvirt/ ... vmhost/ (agent
                           state dir), vmhost.toml (agent config), host.json (init's config),
                           log/ (console, virtlogd, sanlock, libvirtd, agent)
    /run/vmhost-lab/<lab>/hostN -> hosts/hostN/run: short paths for the hosts' sockets
                           (`status` gives each host's libvirt URI through it)
"""
