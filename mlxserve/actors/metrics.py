"""The Metrics actor: counters and histograms, the JSONL request log, a queue snapshot.

Recording never waits: ``record_nowait`` drops an event rather than slow a request when the
inbox is full (metrics are best-effort; requests are not).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import attrs
import trio

log = logging.getLogger("mlxserve.metrics")


@attrs.frozen
class Event:
    kind: str  # "request" | "scheduler" | ...
    fields: dict


@attrs.frozen
class MetricsStats:
    requests: int
    by_status: dict
    prompt_tokens: int
    generated_tokens: int
    cancelled: int
    rejected: int
    dropped: int


@attrs.define(eq=False)
class MetricsHandle:
    _inbox: trio.MemorySendChannel
    _actor: "Metrics"

    def record_nowait(self, kind: str, **fields: Any) -> None:
        try:
            self._inbox.send_nowait(Event(kind, fields))
        except trio.WouldBlock:
            self._actor.dropped += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def statistics(self) -> MetricsStats:
        a = self._actor
        return MetricsStats(a.requests, dict(a.by_status), a.prompt_tokens, a.generated_tokens,
                            a.cancelled, a.rejected, a.dropped)

    def prometheus_text(self) -> bytes:
        return self._actor.prometheus_text()


@attrs.define(eq=False)
class Metrics:
    log_dir: Path | None = None
    log_max_bytes: int = 16 * 1024 * 1024
    requests: int = 0
    by_status: dict = attrs.Factory(dict)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cancelled: int = 0
    rejected: int = 0
    dropped: int = 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        send, inbox = trio.open_memory_channel(4096)
        task_status.started(MetricsHandle(send, self))
        async with inbox:
            async for ev in inbox:
                self._apply(ev)

    def _apply(self, ev: Event) -> None:
        f = ev.fields
        if ev.kind == "request":
            self.requests += 1
            key = f"{f.get('route')} {f.get('status')}"
            self.by_status[key] = self.by_status.get(key, 0) + 1
            self.prompt_tokens += int(f.get("prompt_eval_count") or 0)
            self.generated_tokens += int(f.get("eval_count") or 0)
            if f.get("done_reason") == "cancelled":
                self.cancelled += 1
            if f.get("status") == 503:
                self.rejected += 1
            self._log(f)

    def _log(self, fields: dict) -> None:
        if self.log_dir is None:
            return
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            path = self.log_dir / "requests.jsonl"
            if path.exists() and path.stat().st_size > self.log_max_bytes:
                path.replace(self.log_dir / "requests.jsonl.1")
            with path.open("a") as fh:
                fh.write(json.dumps({"time": time.time(), **fields}, default=str) + "\n")
        except OSError as exc:  # a full disk must not fail requests
            log.warning("request log write failed: %s", exc)

    def prometheus_text(self) -> bytes:
        lines = [
            "# TYPE mlxserve_requests_total counter",
            *(f'mlxserve_requests_total{{route="{k.split(" ")[0]}",status="{k.split(" ")[1]}"}} {v}'
              for k, v in sorted(self.by_status.items())),
            "# TYPE mlxserve_prompt_tokens_total counter",
            f"mlxserve_prompt_tokens_total {self.prompt_tokens}",
            "# TYPE mlxserve_generated_tokens_total counter",
            f"mlxserve_generated_tokens_total {self.generated_tokens}",
            "# TYPE mlxserve_cancellations_total counter",
            f"mlxserve_cancellations_total {self.cancelled}",
            "# TYPE mlxserve_rejected_total counter",
            f"mlxserve_rejected_total {self.rejected}",
        ]
        return ("\n".join(lines) + "\n").encode()
