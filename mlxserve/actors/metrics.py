"""The Metrics actor: Prometheus counters and histograms, and the JSONL request log.

Recording never waits: ``record_nowait`` drops an event (and counts the drop) rather than slow a
request when the inbox is full. Metrics are best-effort; requests are not.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .hosts import HOSTS

if TYPE_CHECKING:
    from .scheduler import SchedulerStats

log = logging.getLogger("mlxserve.metrics")
REQUEST_LOG = "requests.jsonl"


@attrs.frozen
class Event:
    kind: str  # "request" | "scheduler"
    fields: dict[str, Any]


@attrs.frozen
class MetricsStats:
    requests: int
    cancelled: int
    rejected: int
    dropped: int


class _Instruments:
    """One registry per daemon, so several daemons in one process (tests) do not collide."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("mlxserve_requests", "HTTP requests", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("mlxserve_prompt_tokens", "prompt tokens processed", ["model"], registry=r)
        self.generated_tokens = Counter("mlxserve_generated_tokens", "tokens generated", ["model"], registry=r)
        self.cached_tokens = Counter(
            "mlxserve_cached_prompt_tokens", "prompt tokens served from the prefix cache", ["model"], registry=r
        )
        self.ttft = Histogram(
            "mlxserve_time_to_first_token_seconds",
            "time to first token",
            ["model"],
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.decode_rate = Histogram(
            "mlxserve_decode_tokens_per_second",
            "per-request decode rate",
            ["model"],
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
            registry=r,
        )
        self.queue_wait = Histogram(
            "mlxserve_queue_wait_seconds",
            "time waiting for a runner",
            ["model"],
            buckets=(0.001, 0.01, 0.1, 0.5, 1, 5, 15, 60),
            registry=r,
        )
        self.load_seconds = Histogram(
            "mlxserve_load_duration_seconds",
            "model load time",
            ["model"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.cancellations = Counter("mlxserve_cancellations", "requests whose client went away", ["route"], registry=r)
        self.rejected = Counter("mlxserve_rejected", "requests refused with 503", ["route"], registry=r)
        self.scheduler_events = Counter("mlxserve_scheduler_events", "scheduler decisions", ["event"], registry=r)
        self.queue_depth = Gauge("mlxserve_queue_depth", "requests waiting", ["model"], registry=r)
        self.running = Gauge("mlxserve_running_sequences", "sequences being generated", ["model"], registry=r)
        self.loaded = Gauge("mlxserve_loaded_models", "models in memory", registry=r)
        self.dropped = Counter("mlxserve_metrics_dropped", "metric events dropped under load", registry=r)
        self.cancel_to_free = Histogram(
            "mlxserve_cancel_to_slot_free_seconds",
            "from a request's cancel to its engine slot being free",
            ["model", "phase"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 5),
            registry=r,
        )
        self.engine_sequences = Gauge(
            "mlxserve_engine_sequences", "sequences the engine holds (its batch plus its queue)", ["model"], registry=r
        )
        self.trio_tasks = Gauge("mlxserve_trio_tasks", "live trio tasks in the daemon", registry=r)
        self.engine_hosts = Gauge("mlxserve_engine_host_threads", "engine host threads", ["state"], registry=r)
        self.faults = Counter("mlxserve_faults_injected", "faults armed through the fault seam", ["fault"], registry=r)


@attrs.define(eq=False)
class MetricsHandle:
    _inbox: trio.MemorySendChannel[Event]
    _actor: Metrics

    def record_nowait(self, kind: str, **fields: Any) -> None:
        try:
            self._inbox.send_nowait(Event(kind, fields))
        except trio.WouldBlock:
            self._actor.instruments.dropped.inc()
            self._actor.dropped += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def statistics(self) -> MetricsStats:
        a = self._actor
        return MetricsStats(a.requests, a.cancelled, a.rejected, a.dropped)

    def prometheus_text(self, scheduler_stats: SchedulerStats | None = None) -> bytes:
        """Exposition text; gauges are read from a Scheduler snapshot at scrape time."""
        inst = self._actor.instruments
        if scheduler_stats is not None:
            inst.queue_depth.clear()
            inst.running.clear()
            inst.engine_sequences.clear()
            for m in scheduler_stats.models:
                inst.queue_depth.labels(m.name).set(m.queued)
                inst.running.labels(m.name).set(m.running)
                if m.loaded:
                    inst.engine_sequences.labels(m.name).set(m.engine_running)
            inst.loaded.set(scheduler_stats.loaded)
        inst.trio_tasks.set(count_trio_tasks())
        hosts = HOSTS.statistics()
        inst.engine_hosts.labels("busy").set(hosts.busy)
        inst.engine_hosts.labels("idle").set(hosts.total - hosts.busy)
        return generate_latest(inst.registry)


@attrs.define(eq=False)
class Metrics:
    log_dir: Path | None = None
    log_max_bytes: int = 16 * 1024 * 1024
    debug: bool = False
    instruments: _Instruments = attrs.Factory(_Instruments)
    requests: int = 0
    cancelled: int = 0
    rejected: int = 0
    dropped: int = 0
    # The request log stays open; lines are written once per batch of events (every event
    # already in the inbox), not opened, stat'ed and closed per line: each syscall hands the GIL
    # to a busy engine thread and waits to get it back, which the chaos harness saw in the
    # latency of every request.
    _pending: list[str] = attrs.field(factory=list, init=False)
    _fh: Any = attrs.field(default=None, init=False)
    _size: int = attrs.field(default=0, init=False)

    async def run(self, *, task_status: trio.TaskStatus[MetricsHandle] = trio.TASK_STATUS_IGNORED) -> None:
        send, inbox = trio.open_memory_channel[Event](4096)
        task_status.started(MetricsHandle(send, self))
        try:
            async with inbox:
                async for ev in inbox:
                    self._apply_safely(ev)
                    while True:  # whatever else is waiting joins this batch
                        try:
                            ev = inbox.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        self._apply_safely(ev)
                    self._flush()
        finally:
            self._flush()
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def _apply_safely(self, ev: Event) -> None:
        try:
            self._apply(ev)
        except Exception:  # a malformed event must not stop the metrics
            log.exception("bad metrics event %r", ev)

    def _apply(self, ev: Event) -> None:
        f = ev.fields
        inst = self.instruments
        if ev.kind == "scheduler":
            inst.scheduler_events.labels(f.get("event", "?")).inc()
            if f.get("event") == "loaded":
                inst.load_seconds.labels(f.get("model", "")).observe(float(f.get("seconds") or 0))
            if f.get("event") == "dequeued":  # left while waiting for a load: nothing to free
                self._log(
                    {
                        "event": "cancel",
                        "model": f.get("model"),
                        "phase": "queued",
                        "tokens": 0,
                        "seconds": 0.0,
                        "waiting_for": "load",
                    }
                )
            if self.debug:
                log.debug("scheduler %s", json.dumps(f, default=str))
            return
        if ev.kind == "cancel":
            inst.cancel_to_free.labels(f.get("model", ""), f.get("phase", "")).observe(float(f["seconds"]))
            self._log({"event": "cancel", **f})
            return
        if ev.kind == "fault":
            inst.faults.labels(f.get("fault", "?")).inc()
            self._log({"event": "fault", **f})
            return
        if ev.kind != "request":
            return
        self.requests += 1
        route, status, model = f.get("route", "?"), int(f.get("status", 0)), f.get("model") or ""
        inst.requests.labels(route, str(status)).inc()
        if status == 499 or f.get("done_reason") == "cancelled":
            self.cancelled += 1
            inst.cancellations.labels(route).inc()
        if status == 503:
            self.rejected += 1
            inst.rejected.labels(route).inc()
        if model:
            inst.prompt_tokens.labels(model).inc(int(f.get("prompt_eval_count") or 0))
            inst.generated_tokens.labels(model).inc(int(f.get("eval_count") or 0))
            inst.cached_tokens.labels(model).inc(int(f.get("cached_tokens") or 0))
            if f.get("ttft_ns"):
                inst.ttft.labels(model).observe(f["ttft_ns"] / 1e9)
            if f.get("eval_duration") and f.get("eval_count"):
                inst.decode_rate.labels(model).observe(f["eval_count"] / (f["eval_duration"] / 1e9))
            if f.get("queue_wait_ns") is not None:
                inst.queue_wait.labels(model).observe(f["queue_wait_ns"] / 1e9)
        if self.debug:
            log.debug("request %s", json.dumps(f, default=str))
        self._log(f)

    def _log(self, fields: dict[str, Any]) -> None:
        if self.log_dir is not None:
            self._pending.append(json.dumps({"time": time.time(), **fields}, default=str) + "\n")

    def _flush(self) -> None:
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        assert self.log_dir is not None  # lines are pending only with a log directory
        try:
            path = self.log_dir / REQUEST_LOG
            if self._fh is not None and self._size > self.log_max_bytes:
                self._fh.close()
                self._fh = None
                path.replace(self.log_dir / f"{REQUEST_LOG}.1")  # size-rotated, one generation kept
            if self._fh is None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                self._fh = path.open("a")
                self._size = self._fh.tell()
            text = "".join(lines)
            self._fh.write(text)
            self._fh.flush()
            self._size += len(text)
        except OSError as exc:  # a full disk must not fail requests
            log.warning("request log write failed: %s", exc)
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def count_trio_tasks() -> int:
    """Live tasks under the run's root task (0 outside a trio run)."""
    try:
        stack = [trio.lowlevel.current_root_task()]
    except RuntimeError:
        return 0
    n = 0
    while stack:
        task = stack.pop()
        if task is None:
            continue
        n += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return n
