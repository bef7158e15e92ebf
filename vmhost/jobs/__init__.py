"""Jobs as one concept: what every job kind (live merge, cold merge, disk
sync, snapshot) shares.

- record.py  one record type: a job kind is a dataclass with a kind, a
             version, a state field, an owner and the upgrades of its older
             record versions; to_record/from_record are the same for all.
- store.py   where records live: the VM definition (libvirt metadata) for
             VM-bound jobs, the storage domain (`<domain>/jobs/`) for storage
             jobs. Each write is made before its side effect (write-ahead).
- report.py  how jobs are shown: vmJobs entries with their one-time final
             entries, Host.getJobs' host jobs, the history, state counts
             for the metrics.
- runner.py  the step loop: decide under a lock, act outside it, re-check.

The state table of each kind stays in its own module's docstring.
"""
