"""SIGTERM's drain: readiness goes 503, new work is refused, and the requests in flight finish.

A load balancer probes ``/api/ready`` and stops sending here once it answers 503; a request that
still comes gets a 503 with ``Connection: close`` (HAProxy's ``retry-on 503`` sends it to another
daemon). The daemon waits for the requests in flight, streams included, up to
``Settings.drain_seconds``, then stops as before (what is left gets a final error line).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import trio

# What a draining daemon still answers: reads (probes, /api/ps, /metrics), never new work.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Drain:
    """The HTTP requests in flight, and whether the daemon is draining."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.inflight = 0
        self._changed = trio.Event()

    def start(self) -> None:
        self.started.set()

    @property
    def draining(self) -> bool:
        return self.started.is_set()

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Count one request for as long as its response is being sent."""
        self._count(1)
        try:
            yield
        finally:
            self._count(-1)

    def _count(self, step: int) -> None:
        self.inflight += step
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[int], bool]) -> None:
        """Wait (without polling) until the number of requests in flight satisfies ``predicate``;
        ``wait_until(lambda n: n == 0)`` is the drain's wait (a probe may come and go meanwhile)."""
        while not predicate(self.inflight):
            await self._changed.wait()
