"""Engine host threads: OS threads that run engines one after another, kept for reuse.

MLX gives each OS thread that uses a stream its own stream worker thread, and never reclaims it
when the OS thread exits (mlx 0.32: a thread-local stream touched from a new thread starts one
more worker; mlx-lm's module-level ``generation_stream`` is such a stream). One fresh OS thread
per model load therefore leaks MLX threads on every load, keep-alive expiry, crash restart and
eviction (the chaos harness measured two per load cycle). A host thread that outlives its engine
and runs the next one keeps those per-thread streams bounded by the number of hosts, which is
bounded by how many engines ever ran at once.

Hosts never exit: an idle one waits on its queue. ``statistics()`` says how many exist and how
many are busy (exported on /metrics so the harness can tell a new host from a leak).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from typing import Callable

import attrs

log = logging.getLogger("mlxserve.hosts")
_names = itertools.count(1)


@attrs.frozen
class HostStats:
    total: int
    busy: int


class _Host:
    def __init__(self, pool: EngineHosts):
        self._pool = pool
        self.jobs: queue.SimpleQueue[tuple[Callable[[], None], Callable[[], None]]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._main, name=f"engine-host-{next(_names)}", daemon=True)

    def _main(self) -> None:
        while True:
            job: tuple[Callable[[], None], Callable[[], None]] | None = self.jobs.get()
            assert job is not None
            fn, on_done = job
            try:
                fn()
            except BaseException:  # an engine must report its own failures; never lose a host
                log.exception("engine job raised")
            finally:
                # Back in the pool before on_done: the next load may want this very host.
                self._pool._put_back(self)
                try:
                    on_done()
                except BaseException:
                    log.exception("engine on_done raised")
                # Waiting for the next job, this frame must not hold the last one: its engine
                # holds the model, and an unloaded model's weights stayed in memory until the
                # host ran another load.
                job = fn = on_done = None  # type: ignore[assignment]


class EngineHosts:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Host] = []
        self._total = 0

    def run(self, fn: Callable[[], None], on_done: Callable[[], None]) -> None:
        """Run ``fn`` on an idle host (or a new one); ``on_done`` is called on that thread after."""
        with self._lock:
            host = self._idle.pop() if self._idle else None
            if host is None:
                host = _Host(self)
                self._total += 1
                start = True
            else:
                start = False
        host.jobs.put((fn, on_done))
        if start:
            host.thread.start()

    def _put_back(self, host: _Host) -> None:
        with self._lock:
            self._idle.append(host)

    def statistics(self) -> HostStats:
        with self._lock:
            return HostStats(self._total, self._total - len(self._idle))


HOSTS = EngineHosts()  # one per process: MLX's per-thread streams are per process too
