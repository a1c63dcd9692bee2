"""Loading a model: the function the Scheduler awaits (it already runs one load at a time).

Blobs are verified and linked through the Store, then the model starts on an engine thread: a
Runner for generation, an EmbedWorker (the Embedder's) for embeddings. Either is started in the
runtime's runner nursery, so it outlives this call, which returns once the weights are in memory
(or raises why they are not).
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Callable

import trio

from ..config import Settings
from ..engine import model as engine_model, patches as engine_patches
from ..errors import LoadError
from . import faults
from .embedder import Embedder
from .metrics import MetricsHandle
from .runner import CancelRecord, Runner
from .scheduler import LoadFn, LoadSpec, ModelHandle, OnExit
from .store_service import StoreService

log = logging.getLogger("mlxserve.loader")
_generations = itertools.count(1)


def default_load_fn(path: Path, settings: Settings, num_ctx: int | None) -> Callable[[], engine_model.LoadedModel]:
    """The function the engine thread calls: build the model on that thread."""

    def load() -> engine_model.LoadedModel:
        lm = engine_model.load_path(path, weight_dtype=settings.weight_dtype)
        if num_ctx:
            lm.context_length = min(int(num_ctx), lm.context_length) if lm.context_length else int(num_ctx)
            engine_patches.fit_context(lm.model, lm.context_length)  # phi3's LongRoPE factors
        return lm

    return load


def _with_faults(load: Callable[[], engine_model.LoadedModel], name: str) -> Callable[[], engine_model.LoadedModel]:
    """Fault seam (chaos harness only; see faults.py): a slow or failing load, on the engine
    thread, where a big or broken model file would make it slow or fail."""
    fail = faults.SEAM.take("load_fail", name)
    slow = faults.SEAM.take("load_slow", name)

    def faulty() -> engine_model.LoadedModel:
        if slow is not None:
            time.sleep(float(slow.get("seconds", 2.0)))
        if fail is not None:
            raise LoadError(f"model '{name}' failed to load: injected fault")
        return load()

    return faulty if fail is not None or slow is not None else load


def model_loader(
    settings: Settings,
    store: StoreService,
    runners: trio.Nursery,
    metrics: MetricsHandle | None = None,
    embedder: Embedder | None = None,
) -> LoadFn:
    """The Scheduler's ``load_fn``: models start in ``runners``; cancel timings go to ``metrics``."""

    async def load(spec: LoadSpec, on_exit: OnExit) -> ModelHandle:
        if spec.resolved is None:
            raise LoadError(f"model '{spec.name}' has no store record to load from")
        path = await store.load_path(spec.resolved)
        if spec.kind != "generate":
            if embedder is None:
                raise LoadError("this runtime serves no embeddings")
            return await embedder.start_worker(spec, path, on_exit, runners)
        load_fn = default_load_fn(path, settings, spec.num_ctx)
        if faults.SEAM.active:
            load_fn = _with_faults(load_fn, spec.name)
        runner = Runner(
            key=spec.key,
            generation=next(_generations),
            load_fn=load_fn,
            num_parallel=settings.num_parallel,
            prefill_chunk=settings.prefill_chunk,
            prompt_cache_bytes=settings.prompt_cache_bytes,
            device=settings.device,
            admit=settings.admit_window,
            on_exit=lambda r, crash: on_exit(r.key, r.generation, crash, r.served),
            name=spec.name,
            on_cancel=_cancel_recorder(metrics, spec.name),
        )
        log.info("loading %s", spec.name)
        handle: ModelHandle = await runners.start(runner.run)
        return handle

    return load


def _cancel_recorder(metrics: MetricsHandle | None, name: str) -> Callable[[CancelRecord], None] | None:
    if metrics is None:
        return None

    def record(rec: CancelRecord) -> None:
        metrics.record_nowait("cancel", model=name, phase=rec.phase, tokens=rec.tokens, seconds=rec.seconds)

    return record
