"""The daemon: runtime + Hypercorn in one nursery, drained by SIGINT/SIGTERM, stopped by an event."""

from __future__ import annotations

import logging
import signal

import attrs
import trio

from ..actors import heap
from ..actors.runtime import Runtime, open_runtime
from ..config import Settings
from ..errors import ShuttingDown
from .app import serve
from .drain import Drain

log = logging.getLogger("mlxserve")


@attrs.frozen
class DaemonInfo:
    url: str
    runtime: Runtime
    drain: Drain


async def run_daemon(
    settings: Settings,
    *,
    shutdown: trio.Event | None = None,
    preload: list[str] | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until a signal or ``shutdown``; ``task_status.started`` gets a DaemonInfo.

    A signal (or ``DaemonInfo.drain.start()``) drains first: readiness answers 503, new work is
    refused, and the requests in flight get ``settings.drain_seconds`` to finish; a second signal
    ends the drain at once. ``shutdown`` stops without a drain.
    """
    shutdown = trio.Event() if shutdown is None else shutdown
    drain = Drain()
    async with open_runtime(settings) as rt:
        async with trio.open_nursery() as nursery:
            signals = trio.CancelScope()
            nursery.start_soon(_watch_signals, drain, settings.drain_seconds, shutdown, signals)
            binds = await nursery.start(serve, rt, shutdown, drain)
            url = binds[0] if binds else settings.base_url
            for name in preload or []:
                await _preload(rt, name)
            heap.freeze()  # imports and the app live as long as the daemon
            task_status.started(DaemonInfo(url, rt, drain))
            await shutdown.wait()
            # In-flight streams get a final error line: runners stop first and fail their
            # sequences, then Hypercorn's graceful shutdown lets the handlers write it.
            with trio.move_on_after(10, shield=True):
                try:
                    await rt.scheduler.stop_all()
                except ShuttingDown:
                    pass  # the runtime is already going down
            signals.cancel()
            # Hypercorn's own graceful period applies; this bounds the whole stop.
            nursery.cancel_scope.deadline = trio.current_time() + 8


async def _preload(rt, name: str) -> None:
    from ..http import generation as g

    resolved = await rt.store.resolve(name)
    opts = g.merge_options(resolved.spec.parameters, None)
    lease, _ = await g.acquire(rt, resolved, opts, rt.settings.keep_alive)
    lease.release(rt.settings.keep_alive)


async def _watch_signals(drain: Drain, seconds: float, shutdown: trio.Event, scope: trio.CancelScope) -> None:
    with scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_wait_signal, drain, shutdown)
            await drain.started.wait()
            log.info(
                "draining: %d request(s) in flight get up to %gs to finish (a second signal stops now)",
                drain.inflight,
                seconds,
            )
            with trio.move_on_after(seconds):
                await drain.wait_until(lambda n: n == 0)
            shutdown.set()


async def _wait_signal(drain: Drain, shutdown: trio.Event) -> None:
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for sig in signals:
                if drain.draining:
                    log.info("received %s again, shutting down now", signal.Signals(sig).name)
                    shutdown.set()
                    return
                log.info("received %s, draining then shutting down", signal.Signals(sig).name)
                drain.start()
    except ValueError:  # not the main thread (tests): the caller starts the drain or sets ``shutdown``
        await trio.sleep_forever()
