"""``open_runtime``: start every actor under one nursery and hand out their handles."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, AsyncIterator

import attrs
import trio

from ..config import Settings
from ..engine import convert
from ..store.store import Store
from . import faults
from .embedder import Embedder
from .loader import model_loader
from .metrics import Metrics, MetricsHandle
from .scheduler import Scheduler, SchedulerHandle
from .store_service import StoreService

log = logging.getLogger("mlxserve.runtime")


@attrs.frozen
class Runtime:
    settings: Settings
    store: StoreService
    scheduler: SchedulerHandle
    metrics: MetricsHandle
    nursery: trio.Nursery  # for services that live as long as the runtime (the HTTP server)
    embedder: Embedder


@contextlib.asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    store = StoreService(Store.for_settings(settings, converter=convert), settings.transfer)
    await store.prune()
    async with trio.open_nursery() as nursery:
        # Models run in their own nursery, inside the outer one, so they stop before the
        # actors they report to.
        async with trio.open_nursery() as runners:
            metrics = await nursery.start(Metrics(log_dir=settings.log_dir, debug=settings.debug).run)
            if (control := faults.control_path(settings)) is not None:  # the chaos harness's fault seam
                faults.SEAM.on_fire = lambda name, model: metrics.record_nowait("fault", fault=name, model=model)
                nursery.start_soon(faults.watch, control)

            def on_event(kind: str, fields: dict[str, Any]) -> None:
                metrics.record_nowait("scheduler", event=kind, **fields)
                if settings.debug:
                    log.debug("scheduler %s %s", kind, fields)

            embedder = Embedder(settings)
            scheduler = await runners.start(
                Scheduler(
                    load_fn=model_loader(settings, store, runners, metrics, embedder),
                    num_parallel=settings.num_parallel,
                    max_loaded=settings.max_loaded_models,
                    max_memory=settings.memory_budget,
                    max_queue=settings.max_queue,
                    default_keep_alive=settings.keep_alive,
                    on_event=on_event,
                ).run
            )
            embedder.scheduler = scheduler
            try:
                yield Runtime(settings, store, scheduler, metrics, nursery, embedder)
            finally:
                # Closing inboxes ends each loop on EndOfChannel; cancel whatever is left after
                # a bounded, shielded wait.
                runners.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
