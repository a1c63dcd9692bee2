"""Embeddings: batching on one engine thread per embedding model; residency is the Scheduler's.

``Embedder.embed`` leases the model from the Scheduler (which loads it, keeps it alive, evicts
it, and counts it against the one memory budget) and hands the request to that model's
``EmbedWorker``: an ``EmbedEngine`` (mlxserve.engine.embed) on a reused host thread, which
loads the model and runs every batch for its whole life (MLX streams are per thread). Inputs are
tokenized (cut or refused) before they queue, so a 400 never waits behind another request's
batch; the thread drains whatever is waiting into one batch and answers with one
``run_sync_soon`` per batch.

BERT-style models (capability "embedding") are served by the MLX BERT encoder; decoder models
(capability "completion") by mean-pooling their last hidden state. A decoder loaded here is a
second copy, separate from the Runner that generates with it (its own Scheduler entry).
"""

from __future__ import annotations

import itertools
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import attrs
import numpy as np
import trio

from ..config import Settings
from ..engine import embed as eng
from ..engine.memory import release_cached_buffers
from ..errors import BadRequest, EngineError, LoadError, MlxserveError, ShuttingDown
from ..specs.modelspec import ModelSpec
from ..store.store import ResolvedModel
from . import activity, heap
from .hosts import HOSTS
from .mailbox import Reply
from .scheduler import Kind, LoadSpec, OnExit, SchedulerHandle

log = logging.getLogger("mlxserve.embedder")
_generations = itertools.count(1)
_INLINE_CHARS = 4096  # texts up to this many characters in all are tokenized on the trio thread
EMBED_KINDS: tuple[Kind, ...] = ("bert", "decoder")

# (resolved model, its linked directory, kind) -> what the engine thread calls to load it.
EmbedLoadFn = Callable[[ResolvedModel, Path, str], Callable[[], Any]]


@attrs.frozen
class EmbedRequest:
    inputs: tuple[str | tuple[int, ...], ...]  # texts, or token ids of the model's vocabulary
    truncate: bool = True
    dimensions: int | None = None
    num_ctx: int | None = None


@attrs.frozen
class EmbedResult:
    vectors: np.ndarray  # (len(inputs), D) float32, in input order
    token_counts: tuple[int, ...]
    load_ns: int  # time spent loading the model, for the requests that waited for that load
    model_kind: str

    @property
    def prompt_tokens(self) -> int:
        return sum(self.token_counts)


@attrs.frozen
class EmbedModelStats:
    """One embedding model's batching state (its residency is in the Scheduler's statistics)."""

    name: str
    kind: str
    state: str  # "loading" | "ready"
    active: int  # requests queued or computing
    weight_bytes: int
    dimension: int
    generation: int
    digest: str = ""
    context_length: int = 0
    computing: int = 0  # requests whose inputs the model thread is working on now
    steps: int = 0  # checkpoints the thread has passed (one per chunk and per group)
    cancelled: int = 0  # requests dropped because their callers had gone


@attrs.frozen
class EmbedderStats:
    models: tuple[EmbedModelStats, ...]
    active: int


def model_kind(spec: ModelSpec) -> Kind | None:
    """ "bert" for embedding models, "decoder" for completion models, None otherwise."""
    caps = spec.capabilities or []
    if "embedding" in caps:
        return "bert"
    if "completion" in caps:
        return "decoder"
    return None


def embed_spec(resolved: ResolvedModel, kind: Kind) -> LoadSpec:
    return LoadSpec(
        key=f"{resolved.digest}|embed:{kind}",
        name=resolved.display,
        digest=resolved.digest,
        size=resolved.size,
        details=resolved.spec.details(),
        resolved=resolved,
        kind=kind,
    )


@attrs.define(eq=False)
class EmbedWorker:
    """One loaded embedding model: its engine thread and the requests it holds (trio thread)."""

    spec: LoadSpec
    generation: int
    engine: eng.EmbedEngine | None = None
    state: str = "loading"  # loading -> ready -> stopping -> stopped
    jobs: dict[int, tuple[eng.EmbedJob, Reply[eng.JobDone]]] = attrs.Factory(dict)
    weight_bytes: int = 0
    dimension: int = 0
    context_length: int = 0
    device: str = "cpu"
    computing: set[int] = attrs.Factory(set)  # id(job) of the jobs in the thread's current batch
    steps: int = 0
    cancelled: int = 0
    served: int = 0
    crash: str | None = None
    stop_error: MlxserveError | None = None  # what requests that come too late are told
    load_error: BaseException | None = None
    ready: trio.Event = attrs.Factory(trio.Event)
    stopped: trio.Event = attrs.Factory(trio.Event)
    exited: trio.Event = attrs.Factory(trio.Event)
    # Set by the host thread when the engine has returned (hosts are reused, never joined).
    finished: threading.Event = attrs.Factory(threading.Event)

    def stats(self) -> EmbedModelStats:
        return EmbedModelStats(
            self.spec.name,
            self.spec.kind,
            self.state,
            len(self.jobs),
            self.weight_bytes,
            self.dimension,
            self.generation,
            self.spec.digest,
            self.context_length,
            len(self.computing),
            self.steps,
            self.cancelled,
        )


@attrs.define(eq=False)
class EmbedWorkerHandle:
    """What the Scheduler and the Embedder hold of a worker (a ``ModelHandle``)."""

    _w: EmbedWorker
    key: str
    generation: int
    load_seconds: float = 0.0

    @property
    def alive(self) -> bool:
        return self._w.state == "ready"

    @property
    def weight_bytes(self) -> int:
        return self._w.weight_bytes

    @property
    def vram_bytes(self) -> int:
        return self._w.weight_bytes if self._w.device == "gpu" else 0

    @property
    def context_length(self) -> int:
        return self._w.context_length

    def running(self) -> int:
        return len(self._w.jobs)

    async def stop(self, reason: str = "model was unloaded", *, now: bool = False) -> None:
        """Stop the thread (``now``: at its next chunk, failing what it holds; else after the
        batch in progress) and wait, bounded, until it has let go of the model."""
        w = self._w
        if w.engine is not None and w.state not in ("stopping", "stopped"):
            w.state = "stopping"  # out of the statistics at once: it takes no more requests
            w.stop_error = ShuttingDown(reason) if now else EngineError(reason)
            if now:
                _fail_jobs(w, w.stop_error)
            w.engine.submit(eng.EmbedShutdown(reason, now=now))
        with trio.move_on_after(10, shield=True):
            await w.exited.wait()

    async def embed(self, request: EmbedRequest) -> tuple[eng.JobDone, str]:
        w = self._w
        job = eng.EmbedJob(tuple(request.inputs), request.truncate, request.dimensions, request.num_ctx)
        if not job.inputs:
            return eng.JobDone(job, np.zeros((0, w.dimension), np.float32), token_counts=()), w.spec.kind
        if sum(len(x) for x in job.inputs if isinstance(x, str)) <= _INLINE_CHARS:
            tokens = _tokenize(w, job)
        else:
            tokens = await trio.to_thread.run_sync(_tokenize, w, job, abandon_on_cancel=True)
        if w.state != "ready" or w.engine is None:  # stopped while the inputs were tokenized
            raise w.stop_error or EngineError("model was unloaded")
        job.tokens = tokens
        reply: Reply[eng.JobDone] = Reply()
        w.jobs[id(job)] = (job, reply)
        w.engine.submit(job)
        try:
            return await reply.wait(), w.spec.kind
        finally:
            # A caller that left (cancelled) should not cost a batch slot: the thread skips it.
            job.cancelled = True


# Inputs are tokenized (cut or refused when too long, token ids checked) before the job queues.
def _tokenize(w: EmbedWorker, job: eng.EmbedJob) -> list[Any]:
    m = w.engine.model if w.engine is not None else None
    if m is None:  # the thread has just ended (its report is on the way)
        raise w.stop_error or EngineError("model was unloaded")
    tokens: list[Any] = m.tokenize(job.inputs, truncate=job.truncate, limit=job.limit)
    return tokens


def _exit_error(w: EmbedWorker) -> MlxserveError:
    if w.crash is not None:
        return EngineError(w.crash)
    return w.stop_error or EngineError("model was unloaded")


def _fail_jobs(w: EmbedWorker, error: BaseException) -> None:
    jobs, w.jobs = w.jobs, {}
    for _, reply in jobs.values():
        reply.fail(error)


def default_load_fn(settings: Settings) -> EmbedLoadFn:
    def make(resolved: ResolvedModel, path: Path, kind: str) -> Callable[[], Any]:
        return lambda: eng.load_embedder(path, kind, weight_dtype=settings.weight_dtype)

    return make


@attrs.define(eq=False)
class Embedder:
    """Starts embedding workers for the Scheduler's loads and batches requests onto them."""

    settings: Settings
    scheduler: SchedulerHandle | None = None  # set by the runtime once the Scheduler runs
    load_fn: EmbedLoadFn | None = None
    workers: dict[str, EmbedWorker] = attrs.field(factory=dict, init=False)  # by LoadSpec.key
    _stopping: list[EmbedWorker] = attrs.field(factory=list, init=False)
    changed: trio.Event = attrs.field(factory=trio.Event, init=False)  # set at every event

    # ---- requests ----
    async def embed(self, resolved: ResolvedModel, request: EmbedRequest, keep_alive: float) -> EmbedResult:
        """Embed ``request.inputs`` with the model (loading it if needed); raises BadRequest for
        inputs the model refuses (too long with truncate false, bad token ids, dimensions)."""
        kind = model_kind(resolved.spec)
        if kind is None:
            raise BadRequest(f'"{resolved.display}" does not support embeddings')
        assert self.scheduler is not None
        lease = await self.scheduler.acquire_as(EmbedWorkerHandle, embed_spec(resolved, kind), keep_alive)
        try:
            handle = lease.handle
            done, model_kind_ = await handle.embed(request)
            load_ns = int(handle.load_seconds * 1e9) if lease.fresh else 0
        finally:
            lease.release(keep_alive)
        if done.error is not None:
            raise done.error
        assert done.vectors is not None
        return EmbedResult(done.vectors, tuple(done.token_counts), load_ns, model_kind_)

    async def load(self, resolved: ResolvedModel, keep_alive: float) -> int:
        """Make the model resident (an embed of nothing); returns the load time in ns."""
        return (await self.embed(resolved, EmbedRequest(()), keep_alive)).load_ns

    async def unload(self, resolved: ResolvedModel) -> None:
        """Unload the model's embedding copy once no request holds it, and wait until its thread
        has let go of it."""
        assert self.scheduler is not None
        if await self.scheduler.unload(resolved.display, kinds=EMBED_KINDS):
            while any(w.spec.digest == resolved.digest for w in self.workers.values()):
                await self.changed.wait()

    async def wait_until(self, predicate: Callable[[EmbedderStats], bool]) -> EmbedderStats:
        """Wait (without polling) until the statistics satisfy ``predicate``."""
        while True:
            stats = self.statistics()
            if predicate(stats):
                return stats
            await self.changed.wait()

    def statistics(self) -> EmbedderStats:
        models = tuple(w.stats() for w in self.workers.values() if w.state in ("loading", "ready"))
        return EmbedderStats(models, sum(m.active for m in models))

    def stopping(self) -> Sequence[EmbedWorker]:
        """Workers asked to stop whose threads may still run (tests wait on ``finished``)."""
        self._stopping = [w for w in self._stopping if not w.finished.is_set()]
        return tuple(self._stopping)

    # ---- the Scheduler's loads ----
    async def start_worker(
        self, spec: LoadSpec, path: Path, on_exit: OnExit, nursery: trio.Nursery
    ) -> EmbedWorkerHandle:
        """Start the model's thread in ``nursery``; returns once it is loaded (raises if not)."""
        handle: EmbedWorkerHandle = await nursery.start(self._run_worker, spec, path, on_exit)
        return handle

    async def _run_worker(
        self,
        spec: LoadSpec,
        path: Path,
        on_exit: OnExit,
        *,
        task_status: trio.TaskStatus[EmbedWorkerHandle] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        assert spec.resolved is not None
        load_fn = (self.load_fn or default_load_fn(self.settings))(spec.resolved, path, spec.kind)
        w = EmbedWorker(spec, next(_generations))
        token = trio.lowlevel.current_trio_token()

        def deliver(events: list[Any]) -> None:
            try:
                token.run_sync_soon(self._on_events, w, events)
            except trio.RunFinishedError:
                pass

        w.engine = eng.EmbedEngine(
            load_fn,
            deliver,
            device=self.settings.device,
            chunk=self.settings.prefill_chunk,
            generation_idle=activity.IDLE,
        )
        self.workers[spec.key] = w
        log.info("loading %s for embeddings (%s)", spec.name, spec.kind)
        HOSTS.run(w.engine.run, w.finished.set)
        try:
            await w.ready.wait()
            if w.load_error is not None:
                err = w.load_error
                raise err if isinstance(err, MlxserveError) else LoadError(f"model failed to load: {err}")
            task_status.started(EmbedWorkerHandle(w, spec.key, w.generation))
            await w.stopped.wait()
        finally:
            if w.state in ("loading", "ready") and w.engine is not None:  # cancelled: the runtime ends
                # Requests still tokenizing or queued are told 503 (the daemon stops), not 500.
                w.state, w.stop_error = "stopping", ShuttingDown("server is shutting down")
                w.engine.submit(eng.EmbedShutdown("server is shutting down", now=True))
            self._stopping.append(w)
            _fail_jobs(w, _exit_error(w))
            w.engine = None  # the engine holds the model
            with trio.move_on_after(10, shield=True):
                await trio.to_thread.run_sync(w.finished.wait, abandon_on_cancel=True)
            self._drop(w)  # gone from ``workers`` only once its thread has let go of the model
            w.exited.set()
            self._notify()
        on_exit(spec.key, w.generation, w.crash, w.served)

    # ---- events from a worker thread (run on the trio thread by run_sync_soon) ----
    def _on_events(self, w: EmbedWorker, events: list[Any]) -> None:
        for ev in events:
            match ev:
                case eng.Loaded(info=info):
                    w.state = "ready"
                    w.weight_bytes = info["weight_bytes"]
                    w.dimension = info["dimension"]
                    w.context_length = info.get("context_length", 0)
                    w.device = info.get("device", "cpu")
                    log.info("loaded %s for embeddings in %.2fs", w.spec.name, info["load_ns"] / 1e9)
                    heap.freeze()
                    w.ready.set()
                case eng.BatchStarted(jobs=jobs):
                    w.computing = {id(j) for j in jobs}
                case eng.Step():
                    w.steps += 1
                case eng.JobDone(job=job, cancelled=cancelled):
                    w.computing.discard(id(job))
                    w.cancelled += cancelled
                    entry = w.jobs.pop(id(job), None)
                    if entry is not None:
                        w.served += ev.error is None
                        entry[1].send(ev)
                case eng.EmbedLoadFailed(error=error):
                    w.state = "stopped"
                    w.load_error = error
                    w.ready.set()
                    w.stopped.set()
                case eng.EmbedStopped(error=error):
                    w.state = "stopped"
                    w.crash = error
                    _fail_jobs(w, _exit_error(w))
                    w.stopped.set()
                    heap.reclaim(release_cached_buffers)  # the engine let go of the model first
        self._notify()

    def _drop(self, w: EmbedWorker) -> None:
        if self.workers.get(w.spec.key) is w:
            del self.workers[w.spec.key]

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()
