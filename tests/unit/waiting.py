"""Waiting on a condition with a deadline, for the unit tests of background
threads. (Not a conftest.py: see countingbus.py.) One implementation for the
demo, the benchmarks and the tests: vmhost.testing.waiting."""
from vmhost.testing.waiting import wait_for  # noqa: F401
