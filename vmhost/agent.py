"""Composition root: builds every part, wires the events, owns start-up order.

Start-up order (VDSM's lesson): the agent identity first (vmhost.identity: a
lost one refuses to start rather than ignore its running VMs); then the API
listens at once and answers code 99 until VM recovery is done; storage starts
on its own (monitors run in their own threads and never hold anything up); VM
recovery reads libvirt only.
"""
from __future__ import annotations

import logging
import os
import ssl
import threading
import time
import types

import libvirt

from vmhost import identity
from vmhost.api.bridge import build_table
from vmhost.api.jsonrpc import Dispatcher
from vmhost.api.schema import load_schema
from vmhost.api.server import ApiServer
from vmhost.backoff import survived
from vmhost.config import Config
from vmhost.events import EventBus
from vmhost.metrics import Metrics
from vmhost.scheduler import Scheduler
from vmhost.storage.coldmerge import ColdMerger
from vmhost.storage.repairs import ImageRepairs
from vmhost.storage.service import StorageService
from vmhost.virt.connection import Connection
from vmhost.virt.eio import EioResume
from vmhost.virt.events import VmEvents
from vmhost.virt.host import HostService, detect_virt_type
from vmhost.virt.jobhistory import JobHistory
from vmhost.virt.merge import MergeConfig
from vmhost.virt.recovery import VmRecovery
from vmhost.virt.registry import VmRegistry
from vmhost.virt.service import VmService

log = logging.getLogger(__name__)

LIBVIRT_RETRY_MAX = 5.0  # seconds between attempts to reach libvirtd at start-up


def load_agent_id(config: Config, known_domains: set[str], adopt: str | None = None) -> str:
    """This agent's identity (see vmhost.identity); raises IdentityError when
    it must not start. Waits for libvirtd only when it has to be asked (the
    identity file is missing or being adopted): nothing is written before."""
    delay = 0.1
    while True:
        try:
            return identity.resolve(config.state_dir,
                                    lambda: identity.list_agent_vms(config.libvirt_uri),
                                    known_domains, adopt)
        except libvirt.libvirtError as e:
            log.warning("agent identity: libvirt not available to check for running VMs (%s); "
                        "retrying in %.1fs", e, delay)
            time.sleep(delay)
            delay = min(delay * 2, LIBVIRT_RETRY_MAX)


class Agent:
    def __init__(self, config: Config, ssl_context: ssl.SSLContext | None = None,
                 adopt_identity: str | None = None):
        self.config = config
        os.makedirs(config.state_dir, mode=0o755, exist_ok=True)
        self.events = EventBus()
        self.scheduler = Scheduler(workers=config.workers, backoff_max=config.retry_backoff_max)
        self.connection = Connection(config.libvirt_uri)
        self.storage = StorageService(
            config.state_dir, monitor_interval=config.monitor_interval,
            monitor_timeout=config.monitor_timeout, op_timeout=config.storage_op_timeout,
            workers=config.storage_workers, queue_size=config.storage_queue,
            sanlock_host_id=config.sanlock_host_id, sanlock_io_timeout=config.sanlock_io_timeout)
        # Before anything uses it; needs the registry: which domains are ours.
        self.agent_id = load_agent_id(config, set(self.storage.repo_stats()), adopt_identity)
        self.repairs = ImageRepairs(config.state_dir, self.storage, self.scheduler,
                                    publish=self.events.publish)
        self._ready = threading.Event()
        self._stopping = threading.Event()
        # The VMs: one registry that the service, recovery, the libvirt event
        # handlers and the EIO resume policy share.
        self.vm_registry = VmRegistry()
        self.vms = VmService(
            self.connection.get, self.storage, virt_type="qemu", scheduler=self.scheduler,
            merge_config=MergeConfig(poll_interval=config.job_poll_interval,
                                     pivot_budget=config.pivot_budget,
                                     pivot_timeout=config.pivot_timeout,
                                     pivot_slots=config.pivot_slots,
                                     final_entry_ttl=config.final_job_ttl),
            publish=self.events.publish, host_id=self.agent_id,
            history=JobHistory(os.path.join(config.state_dir, "job-history.json"),
                               config.job_history_size, config.job_history_ttl),
            repairs=self.repairs, registry=self.vm_registry)
        self.recovery = VmRecovery(self.vm_registry, self.connection.get, self.vms.merger,
                                   self.vms.disksync, publish=self.events.publish,
                                   host_id=self.agent_id)
        self.vm_events = VmEvents(self.vm_registry, publish=self.events.publish)
        self.eio = EioResume(self.vm_registry, self.vms, self.storage, self.scheduler,
                             ready=self._ready.is_set)
        self.cold_merges = ColdMerger(self.storage, self.scheduler, self.agent_id,
                                      commit_timeout=config.cold_merge_timeout,
                                      keep_seconds=config.storage_job_ttl)
        self.host = HostService(self.connection.get, virt_type="qemu",
                                pending_work=self.scheduler.pending)
        self.metrics = Metrics(self.vms, self.scheduler, self.storage)
        self._wire()
        services = types.SimpleNamespace(host=self.host, storage=self.storage, vms=self.vms,
                                         jobs=self.cold_merges)
        self.dispatcher = Dispatcher(load_schema(), build_table(services),
                                     is_ready=self._ready.is_set,
                                     observe=self.metrics.observe_request)
        self.server = ApiServer(config.address, self.dispatcher,
                                max_body=config.max_request_bytes, events=self.events,
                                ssl_context=ssl_context, metrics=self.metrics.render,
                                max_connections=config.max_connections)

    def _wire(self) -> None:
        self.events.listen(self.metrics.on_event)
        self.storage.volume_in_use = self.vms.volume_in_use
        self.cold_merges.vm_in_use = self.vms.volume_in_use
        self.storage.image_job = self.cold_merges.image_job
        self.storage.subscribe(self._on_domain_status)
        self.connection.lifecycle_listeners.append(self.vm_events.on_lifecycle)
        self.connection.io_error_listeners.append(self.vm_events.on_io_error)
        self.connection.lifecycle_listeners.append(
            lambda vm_uuid, event, detail: self.scheduler.notify(("vm", vm_uuid)))
        if self.config.block_job_events:
            self.connection.block_job_listeners.append(self.vms.merger.on_block_job_event)
        self.connection.reconnect_listeners.append(self.recovery.refresh_status)

    def _on_domain_status(self, sd_uuid: str, valid: bool, reason: str) -> None:
        self.events.publish({"event": "domain", "domainID": sd_uuid,
                             "status": "VALID" if valid else "INVALID", "reason": reason})
        if valid:
            self.scheduler.notify(("domain", sd_uuid))
            self.eio.on_domain_valid(sd_uuid)
            self.cold_merges.watch(sd_uuid)    # a domain connected since the start, too

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        self.scheduler.start()
        self.server.start()
        log.info("API listening on %s:%d", self.config.address[0], self.server.port)
        self.storage.start()
        self.cold_merges.resume()     # each job waits for its domain to be VALID
        threading.Thread(target=self._recover, name="recovery", daemon=True).start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def stop(self) -> None:
        self._stopping.set()
        self.server.stop()
        self.scheduler.stop()
        self.storage.stop()
        self.connection.close()

    def _recover(self) -> None:
        started = time.monotonic()
        delay = 0.1
        while not self._stopping.is_set():
            try:
                conn = self.connection.get()
                virt_type = detect_virt_type(conn)
                self.vms.virt_type = self.host.virt_type = virt_type
                count = self.recovery.recover()
                # Repairs whose VM is gone run now (when their domain is VALID).
                self.repairs.resume(self.recovery.owned_jobs(),
                                    {vm.id for vm in self.vm_registry.all()})
                break
            except Exception as e:
                # libvirtd not up yet, or an unexpected error (the thread must not
                # die and leave the API at 99 for good): keep answering 99, try again.
                if isinstance(e, libvirt.libvirtError):
                    log.warning("recovery: libvirt not available (%s); retrying in %.1fs", e,
                                delay)
                else:
                    survived("recovery", "VM recovery failed", delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, LIBVIRT_RETRY_MAX)
        else:
            return
        self._ready.set()
        self.metrics.recovery_seconds.set(time.monotonic() - started)
        self.eio.recovery_done()
        log.info("recovery done: %d VM(s), virt type %s, %.3fs", count, virt_type,
                 time.monotonic() - started)
