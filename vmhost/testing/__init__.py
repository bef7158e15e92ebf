"""Helpers shared by the demo, the benchmarks and the tests: start an agent
process, do guest I/O through QEMU's monitor, wait on a condition.

Installed with vmhost but never imported by the agent itself (nothing under
vmhost/ outside this package and vmhost/cli/demo.py imports it).
"""
