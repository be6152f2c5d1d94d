"""Prometheus metrics of the orchestrator, served on ``/metrics`` when enabled.

Exported series (all prefixed ``azolla_``):

==========================================  ======  =========================================
name                                        type    meaning
==========================================  ======  =========================================
``tasks{domain,state}``                     gauge   unfinished tasks: queued, running, retry_wait
``queue_depth{domain}``                     gauge   tasks ready to run now, waiting for a slot
``task_outcomes_total{domain,state}``       counter tasks ended (succeeded, failed, cancelled)
``dispatched_tasks_total``                  counter attempts pushed to shepherds
``commit_seconds``                          histo   duration of one batched append (commit)
``committed_events_total``                  counter events committed
``commit_failures_total``                   counter batches whose commit failed
``results_total``                           counter attempt results reported by shepherds
``stale_results_total``                     counter results rejected (superseded attempts)
``shepherds_connected{domain,group}``       gauge   connected shepherds
``shepherd_slots{domain,group,kind}``       gauge   capacity and busy slots of those shepherds
``log_position``                            gauge   position of the last event applied
==========================================  ======  =========================================

Gauges are computed at scrape time on the orchestrator's event loop (the HTTP server runs in
its own thread and hands the work over), so they never read state mid-update.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter as Tally
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from azolla.domain.values import TaskState

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from azolla.app.model import TaskOutcome
    from azolla.app.orchestrator import Orchestrator

__all__ = ["OrchestratorMetrics"]

_WAITING = (TaskState.QUEUED, TaskState.RETRY_WAIT)
_COMMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)


@dataclass
class _Snapshot:
    tasks: Tally[tuple[str, str]] = field(default_factory=Tally)
    ready: Tally[str] = field(default_factory=Tally)
    shepherds: Tally[tuple[str, str]] = field(default_factory=Tally)
    capacity: Tally[tuple[str, str]] = field(default_factory=Tally)
    busy: Tally[tuple[str, str]] = field(default_factory=Tally)
    counters: dict[str, float] = field(default_factory=dict)
    position: int = 0


class OrchestratorMetrics:
    """Prometheus metrics of one orchestrator. Create it on the orchestrator's event loop.

    It chains itself into ``orchestrator.commit_observer`` and ``dispatch_observer`` (keeping
    any observer already set) and adds an outcome hook.

    Args:
        orchestrator: The orchestrator to observe.
        registry: Where to register; default a new, private registry.
    """

    def __init__(self, orchestrator: Orchestrator,
                 registry: CollectorRegistry | None = None) -> None:
        self.orchestrator = orchestrator
        self.registry = registry if registry is not None else CollectorRegistry()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.commit_seconds = Histogram(
            "azolla_commit_seconds", "Duration of one batched append to the event store.",
            buckets=_COMMIT_BUCKETS, registry=self.registry)
        self.committed_events = Counter(
            "azolla_committed_events", "Events committed to the event store.",
            registry=self.registry)
        self.dispatched = Counter(
            "azolla_dispatched_tasks", "Attempts pushed to shepherds.", registry=self.registry)
        self.outcomes = Counter(
            "azolla_task_outcomes", "Tasks that ended, by domain and terminal state.",
            ["domain", "state"], registry=self.registry)
        self.registry.register(_Collector(self))
        previous_commit = orchestrator.commit_observer
        previous_dispatch = orchestrator.dispatch_observer

        def on_commit(seconds: float, events: int) -> None:
            self.commit_seconds.observe(seconds)
            self.committed_events.inc(events)
            if previous_commit is not None:
                previous_commit(seconds, events)

        def on_dispatch(count: float) -> None:
            self.dispatched.inc(count)
            if previous_dispatch is not None:
                previous_dispatch(count)

        orchestrator.commit_observer = on_commit
        orchestrator.dispatch_observer = on_dispatch
        orchestrator.hooks.append(self._on_outcome)

    def _on_outcome(self, outcome: TaskOutcome) -> None:
        self.outcomes.labels(outcome.domain, outcome.state.value).inc()

    def snapshot(self) -> _Snapshot:
        """Compute the scrape-time values (on the event loop's thread)."""
        if threading.get_ident() == self._loop_thread:
            return self._compute()

        async def compute() -> _Snapshot:
            return self._compute()

        future = asyncio.run_coroutine_threadsafe(compute(), self._loop)
        return future.result(timeout=10)

    def _compute(self) -> _Snapshot:
        orchestrator = self.orchestrator
        taskset = orchestrator.taskset
        snap = _Snapshot(counters=dict(orchestrator.metrics), position=taskset.position)
        now = orchestrator.clock.now()
        for record in taskset.tasks.values():
            if record.terminal:
                continue
            snap.tasks[(record.domain, record.state.value)] += 1
            if record.state in _WAITING and record.ready_at <= now:
                snap.ready[record.domain] += 1
        for view in orchestrator.shepherds():
            key = (view.domain, view.group)
            snap.shepherds[key] += 1
            snap.capacity[key] += view.capacity
            snap.busy[key] += view.running
        return snap

    def start_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` over HTTP in a background thread; returns the bound port."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def stop_http(self) -> None:
        """Stop the HTTP server (no-op if not started)."""
        server, self._http = self._http, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def close(self) -> None:
        """Stop serving and detach from the orchestrator's hooks."""
        self.stop_http()
        if self._on_outcome in self.orchestrator.hooks:
            self.orchestrator.hooks.remove(self._on_outcome)


class _Collector(Collector):
    def __init__(self, owner: OrchestratorMetrics) -> None:
        self.owner = owner

    def collect(self) -> Iterator[Metric]:
        try:
            snap = self.owner.snapshot()
        except Exception:  # the loop is gone or stuck: export what the counters hold
            return
        tasks = GaugeMetricFamily("azolla_tasks", "Unfinished tasks by domain and state.",
                                  labels=["domain", "state"])
        for (domain, state), count in sorted(snap.tasks.items()):
            tasks.add_metric([domain, state], count)
        yield tasks
        ready = GaugeMetricFamily("azolla_queue_depth",
                                  "Tasks ready to run now, waiting for a shepherd slot.",
                                  labels=["domain"])
        for domain, count in sorted(snap.ready.items()):
            ready.add_metric([domain], count)
        yield ready
        shepherds = GaugeMetricFamily("azolla_shepherds_connected", "Connected shepherds.",
                                      labels=["domain", "group"])
        slots = GaugeMetricFamily("azolla_shepherd_slots",
                                  "Attempt slots of connected shepherds.",
                                  labels=["domain", "group", "kind"])
        for key, count in sorted(snap.shepherds.items()):
            shepherds.add_metric(list(key), count)
            slots.add_metric([*key, "capacity"], snap.capacity[key])
            slots.add_metric([*key, "busy"], snap.busy[key])
        yield shepherds
        yield slots
        yield GaugeMetricFamily("azolla_log_position", "Position of the last event applied.",
                                value=snap.position)
        described: list[tuple[str, str, str]] = [
            ("commit_failures", "azolla_commit_failures", "Batches whose commit failed."),
            ("results", "azolla_results", "Attempt results reported by shepherds."),
            ("stale_results", "azolla_stale_results",
             "Results rejected because their attempt was superseded."),
        ]
        for counter, name, text in described:
            yield CounterMetricFamily(name, text, value=snap.counters.get(counter, 0.0))
