# `make demo` and `make test` do all the set-up on a fresh Debian 12 machine (as root).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup host venv demo demo-fleet test faults bench unit integration clean

setup: host venv

host:
	bash scripts/setup-host.sh

# PyPI has no sanlock binding: use Debian's python3-sanlock module (same cp311 ABI).
SANLOCK_SO := /usr/lib/python3/dist-packages/sanlock.cpython-311-x86_64-linux-gnu.so

venv: $(STAMP)
	$(PY) -c 'import sanlock' 2>/dev/null || cp $(SANLOCK_SO) \
	    "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')/"

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/vmhost demo

# The failover story on `vmhost lab`: host1 loses power mid-merge, host2 runs the VM
# (about 2 minutes: most of it the wait for host1's VM lease to expire).
demo-fleet: setup
	$(VENV)/bin/vmhost demo --fleet

test: setup
	$(VENV)/bin/pytest -q -rf -m "not faults" tests

# Every fault scenario (crash matrix, random kills, libvirtd restart, storage
# outage, QEMU crash) and 10,000 fuzzed requests; writes reports/faults.md.
faults: setup
	mkdir -p reports
	rm -f reports/faults.jsonl reports/fuzz.json reports/stomp-fuzz.json
	VMHOST_FAULTS_REPORT=$(CURDIR)/reports/faults.jsonl VMHOST_FUZZ_REQUESTS=10000 \
	VMHOST_FAULT_ROUNDS=50 $(VENV)/bin/pytest -q -rf \
	    tests/integration/test_crash_matrix.py tests/integration/test_merge_edges.py \
	    tests/integration/test_merge_edges_chain.py tests/integration/test_hung_storage.py \
	    tests/integration/test_cold_merge.py tests/integration/test_lab_merge_failover.py \
	    tests/integration/test_lab_cold_merge_takeover.py \
	    tests/integration/faults tests/faults
	$(PY) scripts/faults_report.py reports/faults.jsonl reports/fuzz.json reports/faults.md

# Benchmarks (recovery at scale, merge throughput, completion latency, API):
# about 25 minutes (200 VMs three times: recovery, API, storm); writes reports/bench.md and reports/*.png. Not a test.
bench: setup
	$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q -e '.[bench]'
	# Bytecode as an installed package has it: with PYTHONDONTWRITEBYTECODE set,
	# every agent start would compile ~55 modules (~100-130 ms of "ready").
	$(PY) -m compileall -q vmhost
	$(PY) bench/run_all.py

unit: venv
	$(VENV)/bin/pytest -q tests/unit

integration: setup
	$(VENV)/bin/pytest -q -rf tests/integration

clean:
	rm -rf $(VENV) build *.egg-info
