"""Prometheus metrics (GET /metrics).

Counters and histograms are fed by the job events of the EventBus and by the
API dispatcher; gauges (VMs, jobs, pending work, domains) are read from the
services at scrape time, so they can never drift from what the API reports.
"""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from vmhost.backoff import thread_errors
from vmhost.jobs.report import state_counts

CONTENT_TYPE = CONTENT_TYPE_LATEST
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


class _StateCollector:
    """Gauges computed from the services at each scrape."""

    def __init__(self, vms, scheduler, storage):
        self._vms, self._scheduler, self._storage = vms, scheduler, storage

    def collect(self):
        by_status = GaugeMetricFamily("vmhost_vms", "VMs by status", labels=["status"])
        counts: dict[str, int] = {}
        vms = self._vms.vms()
        for vm in vms:
            counts[vm.status] = counts.get(vm.status, 0) + 1
        jobs = state_counts(rec for vm in vms for rec in list(vm.definition.jobs.values()))
        for status in ("Up", "Paused", "Down", "WaitForLaunch"):
            by_status.add_metric([status], counts.get(status, 0))
        yield by_status
        by_state = GaugeMetricFamily("vmhost_jobs", "Block jobs in vmJobs by state",
                                     labels=["state"])
        for state in ("STARTING", "COMMIT", "READY", "PIVOT", "ABORTING", "CLEANUP", "FAILED"):
            by_state.add_metric([state], jobs.get(state, 0))
        yield by_state
        pending = GaugeMetricFamily("vmhost_pending_work", "Scheduled work items by reason",
                                    labels=["reason"])
        reasons = {"waiting_for_resource": 0, "retrying": 0, "scheduled": 0}
        for item in self._scheduler.pending():
            key = ("waiting_for_resource" if item["requires"] else
                   "retrying" if item["attempts"] else "scheduled")
            reasons[key] += 1
        for reason, n in reasons.items():
            pending.add_metric([reason], n)
        yield pending
        domains = GaugeMetricFamily("vmhost_domain_valid",
                                    "1 if the storage domain monitor reports it VALID",
                                    labels=["domain"])
        for sd, stats in self._storage.repo_stats().items():
            domains.add_metric([sd], 1 if stats["valid"] else 0)
        yield domains
        survived = CounterMetricFamily("vmhost_thread_errors",
                                       "Unexpected errors a background thread logged, backed "
                                       "off and survived", labels=["thread"])
        for thread, n in sorted(thread_errors.snapshot().items()):
            survived.add_metric([thread], n)
        yield survived


class Metrics:
    def __init__(self, vms, scheduler, storage):
        self.registry = CollectorRegistry()
        r = self.registry
        self.merge_jobs = Counter("vmhost_merge_jobs", "Finished merge jobs by outcome",
                                  ["outcome", "kind"], registry=r)
        self.merge_bytes = Counter("vmhost_merge_bytes", "Bytes processed by finished merges",
                                   ["kind"], registry=r)
        self.merge_duration = Histogram("vmhost_merge_duration_seconds",
                                        "Merge duration, request to end of cleanup", ["kind"],
                                        buckets=DURATION_BUCKETS, registry=r)
        self.job_transitions = Counter("vmhost_job_transitions", "Job state transitions",
                                       ["to"], registry=r)
        self.pivot_retries = Counter("vmhost_pivot_retries", "Failed pivots retried",
                                     registry=r)
        self.api_requests = Counter("vmhost_api_requests", "API requests by verb", ["verb"],
                                    registry=r)
        self.api_errors = Counter("vmhost_api_errors", "API errors by verb and code",
                                  ["verb", "code"], registry=r)
        self.api_seconds = Histogram("vmhost_api_request_seconds", "API request latency",
                                     ["verb"], registry=r,
                                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                              0.25, 0.5, 1, 5, 30))
        self.recovery_seconds = Gauge("vmhost_recovery_duration_seconds",
                                      "Time the last VM recovery took", registry=r)
        r.register(_StateCollector(vms, scheduler, storage))

    def on_event(self, event: dict) -> None:
        if event.get("event") != "job":
            return
        to = event["to"]
        self.job_transitions.labels(to).inc()
        if event.get("from") == "PIVOT" and to in ("READY", "ABORTING"):
            self.pivot_retries.inc()
        if to in ("DONE", "ABORTED", "FAILED"):
            kind = event.get("kind", "unknown")
            self.merge_jobs.labels(to.lower(), kind).inc()
            if to == "DONE":
                self.merge_bytes.labels(kind).inc(event.get("bytes") or 0)
                if event.get("started"):
                    self.merge_duration.labels(kind).observe(
                        max(0.0, time.time() - event["started"]))

    def observe_request(self, verb: str, code: int | None, seconds: float) -> None:
        self.api_requests.labels(verb).inc()
        self.api_seconds.labels(verb).observe(seconds)
        if code is not None:
            self.api_errors.labels(verb, str(code)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


MetricsRenderer = Callable[[], bytes]
