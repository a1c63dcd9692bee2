"""The Loader actor: one load at a time; verifies blobs, then starts a Runner.

The Runner is started in the runtime's runner nursery so it outlives this call; the Loader only
waits until the engine thread reports the weights are in memory (or that loading failed).
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable

import attrs
import trio

from ..config import Settings
from ..engine import model as engine_model
from .mailbox import Reply, ask, fail_pending
from .runner import Runner, RunnerHandle
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


@attrs.define(eq=False)
class Loader:
    settings: Settings
    store: Any  # StoreHandle
    runner_nursery: trio.Nursery

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
        runner = Runner(
            key=spec.key,
            generation=generation,
            load_fn=default_load_fn(path, self.settings, spec.num_ctx),
            num_parallel=self.settings.num_parallel,
            prefill_chunk=self.settings.prefill_chunk,
            prompt_cache_bytes=self.settings.prompt_cache_bytes,
            on_exit=lambda r, crash: on_exit(r.key, r.generation, crash),
        )
        log.info("loading %s", spec.name)
        return await self.runner_nursery.start(runner.run)
