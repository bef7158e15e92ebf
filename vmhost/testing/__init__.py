"""Helpers shared by the demo, the benchmarks and the tests: start an agent
process (agentproc), guest I/O through QEMU's monitor (guestio), storage
outages (outage), volumes through the API (volumes), waiting on a condition
(waiting), the four views of a chain (chains), the engine's side of a fleet:
a shared domain and the failover path (fleet).

Installed with vmhost but never imported by the agent: only the demo
(vmhost/demo, vmhost/cli/demo.py), bench/ and tests/ use it
(tests/unit/test_demo_report.py checks the agent's imports).
"""
