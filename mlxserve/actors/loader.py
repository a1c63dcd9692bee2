"""The Loader actor: one load at a time; verifies blobs, then starts a Runner.

The Runner is started in the runtime's runner nursery so it outlives this call; the Loader only
waits until the engine thread reports the weights are in memory (or that loading failed).
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Callable

import attrs
import trio

from ..config import Settings
from ..engine import model as engine_model
from ..errors import LoadError
from . import faults
from .mailbox import Reply, ask, fail_pending
from .runner import CancelRecord, Runner, RunnerHandle
from .scheduler import LoadSpec

log = logging.getLogger("mlxserve.loader")
_generations = itertools.count(1)


@attrs.frozen
class Load:
    spec: LoadSpec
    on_exit: Callable[[str, int, str | None], None]
    reply: Reply


@attrs.define(eq=False)
class LoaderHandle:
    _inbox: trio.MemorySendChannel

    async def load(self, spec: LoadSpec, on_exit: Callable[[str, int, str | None], None]) -> RunnerHandle:
        return await ask(self._inbox, lambda r: Load(spec, on_exit, r))


def default_load_fn(path, settings: Settings, num_ctx: int | None) -> Callable[[], engine_model.LoadedModel]:
    """The function the engine thread calls: build the model on that thread."""

    def load() -> engine_model.LoadedModel:
        lm = engine_model.load_path(path, weight_dtype=settings.weight_dtype)
        if num_ctx:
            lm.context_length = min(int(num_ctx), lm.context_length) if lm.context_length else int(num_ctx)
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


@attrs.define(eq=False)
class Loader:
    settings: Settings
    store: Any  # StoreHandle
    runner_nursery: trio.Nursery
    metrics: Any = None  # MetricsHandle: cancel-to-slot-free timings of every runner

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        send, inbox = trio.open_memory_channel(64)
        task_status.started(LoaderHandle(send))
        async with inbox:
            try:
                async for msg in inbox:
                    try:
                        handle = await self._load(msg.spec, msg.on_exit)
                    except Exception as exc:
                        msg.reply.fail(exc)
                    else:
                        msg.reply.send(handle)
            finally:
                fail_pending(inbox)

    async def _load(self, spec: LoadSpec, on_exit) -> RunnerHandle:
        resolved = spec.payload
        await self.store.verify_for_load(resolved)
        path = await self.store.model_path(resolved)
        generation = next(_generations)
        load_fn = default_load_fn(path, self.settings, spec.num_ctx)
        if faults.SEAM.active:
            load_fn = _with_faults(load_fn, spec.name)
        runner = Runner(
            key=spec.key,
            generation=generation,
            load_fn=load_fn,
            num_parallel=self.settings.num_parallel,
            prefill_chunk=self.settings.prefill_chunk,
            prompt_cache_bytes=self.settings.prompt_cache_bytes,
            device=self.settings.device,
            admit=self.settings.admit_window,
            on_exit=lambda r, crash: on_exit(r.key, r.generation, crash, served=r.served),
            name=spec.name,
            on_cancel=self._cancel_recorder(spec.name),
        )
        log.info("loading %s", spec.name)
        return await self.runner_nursery.start(runner.run)

    def _cancel_recorder(self, name: str) -> Callable[[CancelRecord], None] | None:
        metrics = self.metrics
        if metrics is None:
            return None

        def record(rec: CancelRecord) -> None:
            metrics.record_nowait("cancel", model=name, phase=rec.phase, tokens=rec.tokens,
                                  seconds=rec.seconds)

        return record
