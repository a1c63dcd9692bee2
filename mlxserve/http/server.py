"""The daemon: runtime + Hypercorn in one nursery, stopped by SIGINT/SIGTERM or an event."""

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

log = logging.getLogger("mlxserve")


@attrs.frozen
class DaemonInfo:
    url: str
    runtime: Runtime


async def run_daemon(settings: Settings, *, shutdown: trio.Event | None = None,
                     preload: list[str] | None = None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve until a signal or ``shutdown``; ``task_status.started`` gets a DaemonInfo."""
    shutdown = trio.Event() if shutdown is None else shutdown
    async with open_runtime(settings) as rt:
        async with trio.open_nursery() as nursery:
            signals = trio.CancelScope()
            nursery.start_soon(_watch_signals, shutdown, signals)
            binds = await nursery.start(serve, rt, shutdown)
            url = binds[0] if binds else settings.base_url
            for name in preload or []:
                await _preload(rt, name)
            heap.freeze()  # imports and the app live as long as the daemon
            task_status.started(DaemonInfo(url, rt))
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


async def _watch_signals(shutdown: trio.Event, scope: trio.CancelScope) -> None:
    with scope:
        await _wait_signal(shutdown)


async def _wait_signal(shutdown: trio.Event) -> None:
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for sig in signals:
                log.info("received %s, shutting down", signal.Signals(sig).name)
                shutdown.set()
                return
    except ValueError:  # not the main thread (tests): the caller sets ``shutdown`` instead
        await trio.sleep_forever()
