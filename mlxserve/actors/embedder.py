"""The Embedder actor: embedding models, one dedicated OS thread each, batched, kept alive.

Each loaded model is a *worker*: an ``EmbedEngine`` (mlxserve.engine.embed) running on its own
thread, which loads the model and runs every batch for its whole life (MLX streams are per
thread). Requests reach the thread through its thread-safe queue; the thread drains whatever
is waiting into one batch and hands the results back with one ``run_sync_soon`` per batch.

BERT-style models (capability "embedding") are served by the MLX BERT encoder; decoder models
(capability "completion") by mean-pooling their last hidden state. A decoder loaded here is a
second copy, separate from the Scheduler's Runner for generation.

Keep-alive: a worker with no job in flight expires ``keep_alive`` seconds after its last
request (0: at once; inf: never); the loop waits on the next expiry as a deadline. At most
``max_loaded`` workers stay resident: a new one evicts the least recently used idle worker.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import threading
import time
from typing import Any, Callable

import attrs
import numpy as np
import trio

from ..config import Settings
from ..engine import embed as eng
from ..engine.memory import release_cached_buffers
from ..errors import BadRequest, EngineError, LoadError, MlxserveError, ServerBusy, ShuttingDown
from . import activity, heap
from .hosts import HOSTS
from .mailbox import Reply, fail_pending, post

log = logging.getLogger("mlxserve.embedder")
_generations = itertools.count(1)
_INLINE_CHARS = 4096  # texts up to this many characters in all are tokenized on the trio thread


@attrs.frozen
class EmbedRequest:
    inputs: tuple  # str or tuple[int, ...] (token ids) each
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
    name: str
    kind: str
    state: str  # "loading" | "ready"
    active: int
    expires_at: float | None  # trio clock; None while busy; inf for "never"
    weight_bytes: int
    dimension: int
    generation: int
    digest: str = ""
    size: int = 0  # bytes in the store
    spec: Any = None  # ModelSpec, for /api/ps's details
    context_length: int = 0
    expires_unix: float | None = None  # expires_at on the wall clock (inf: never)
    size_vram: int = 0  # the weights' bytes when the model runs on a GPU
    computing: int = 0  # requests whose inputs the model thread is working on now
    steps: int = 0  # checkpoints the thread has passed (one per chunk and per group)
    cancelled: int = 0  # requests dropped because their callers had gone


@attrs.frozen
class EmbedderStats:
    models: tuple[EmbedModelStats, ...]
    active: int


# ---- messages ----
@attrs.frozen
class Embed:
    resolved: Any  # ResolvedModel
    request: EmbedRequest
    keep_alive: float
    job: eng.EmbedJob
    reply: Reply


@attrs.frozen
class Unload:
    digest: str
    reply: Reply


@attrs.frozen
class StopAll:
    reply: Reply


@attrs.frozen
class _Wake:
    pass


def model_kind(spec) -> str | None:
    """"bert" for embedding models, "decoder" for completion models, None otherwise."""
    caps = spec.capabilities or []
    if "embedding" in caps:
        return "bert"
    if "completion" in caps:
        return "decoder"
    return None


@attrs.define(eq=False)
class EmbedderHandle:
    _inbox: trio.MemorySendChannel
    _actor: "Embedder"

    async def embed(self, resolved, request: EmbedRequest, keep_alive: float) -> EmbedResult:
        """Embed ``request.inputs`` with the model (loading it if needed); raises BadRequest for
        inputs the model refuses (too long with truncate false, bad token ids, dimensions)."""
        job = eng.EmbedJob(tuple(request.inputs), request.truncate, request.dimensions,
                           request.num_ctx)
        reply = Reply()
        post(self._inbox, Embed(resolved, request, keep_alive, job, reply))
        try:
            return await reply.wait()
        finally:
            # A caller that left (cancelled) should not cost a batch slot: the thread skips it.
            job.cancelled = True

    async def load(self, resolved, keep_alive: float) -> int:
        """Make the model resident (an embed of nothing); returns the load time in ns."""
        return (await self.embed(resolved, EmbedRequest(()), keep_alive)).load_ns

    async def unload(self, resolved) -> None:
        reply = Reply()
        post(self._inbox, Unload(resolved.digest, reply))
        await reply.wait()

    async def stop_all(self) -> None:
        """At shutdown: fail every request (503), and stop each model thread at its next chunk;
        later requests are refused. Returns without waiting for the threads."""
        reply = Reply()
        post(self._inbox, StopAll(reply))
        await reply.wait()

    async def wait_until(self, predicate: Callable[[EmbedderStats], bool]) -> EmbedderStats:
        """Wait (without polling) until the statistics satisfy ``predicate``."""
        while True:
            stats = self.statistics()
            if predicate(stats):
                return stats
            await self._actor.changed.wait()

    def statistics(self) -> EmbedderStats:
        a = self._actor
        now, wall = trio.current_time(), time.time()

        def unix(t: float | None) -> float | None:
            return t if t is None or math.isinf(t) else wall + (t - now)

        models = tuple(
            EmbedModelStats(w.name, w.kind, w.state, len(w.jobs), w.expires_at, w.weight_bytes,
                            w.dimension, w.generation, w.digest, w.size, w.spec, w.context_length,
                            unix(w.expires_at), w.weight_bytes if w.device == "gpu" else 0,
                            len(w.computing), w.steps, w.cancelled)
            for w in a.workers.values()
        )
        return EmbedderStats(models, sum(m.active for m in models))


@attrs.define(eq=False)
class _Worker:
    key: str
    digest: str
    name: str
    kind: str
    generation: int
    engine: eng.EmbedEngine
    state: str = "loading"  # loading -> ready -> (removed)
    jobs: dict = attrs.Factory(dict)  # id(job) -> Embed message, until answered
    keep_alive: float = 300.0
    expires_at: float | None = None
    last_used: float = 0.0
    load_ns: int = 0
    weight_bytes: int = 0
    dimension: int = 0
    size: int = 0
    spec: Any = None
    context_length: int = 0
    device: str = "cpu"
    computing: set = attrs.Factory(set)  # id(job) of the jobs in the thread's current batch
    steps: int = 0
    cancelled: int = 0
    # Set by the host thread when the engine has returned (hosts are reused, never joined).
    finished: threading.Event | None = None
    load_fn: Callable[[], Any] | None = None  # set by _boot once the store has linked the files


def default_load_fn(settings: Settings) -> Callable[[Any, Any, str], Callable[[], Any]]:
    def make(resolved, path, kind: str) -> Callable[[], Any]:
        return lambda: eng.load_embedder(path, kind, weight_dtype=settings.weight_dtype)
    return make


@attrs.define(eq=False)
class Embedder:
    settings: Settings
    store: Any  # StoreHandle: blobs are verified and linked before a load
    max_loaded: int | None = None  # default: settings.max_loaded_models
    load_fn: Callable[[Any, Any, str], Callable[[], Any]] | None = None
    workers: dict[str, _Worker] = attrs.field(factory=dict, init=False)
    _stopping: list[_Worker] = attrs.field(factory=list, init=False)
    _inbox_send: trio.MemorySendChannel | None = attrs.field(default=None, init=False)
    _token: Any = attrs.field(default=None, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _closing: bool = attrs.field(default=False, init=False)  # shutting down: refuse new work
    changed: trio.Event = attrs.field(factory=trio.Event, init=False)  # set at every event

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        if self.load_fn is None:
            self.load_fn = default_load_fn(self.settings)
        if self.max_loaded is None:
            self.max_loaded = max(1, self.settings.max_loaded_models)
        send, inbox = trio.open_memory_channel(max(16, self.settings.max_queue))
        self._inbox_send = send
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(EmbedderHandle(send, self))
                async with inbox:
                    try:
                        await self._loop(inbox)
                    finally:
                        fail_pending(inbox)
                nursery.cancel_scope.cancel()
        finally:
            send.close()
            await self._stop_all("server is shutting down")

    async def _loop(self, inbox: trio.MemoryReceiveChannel) -> None:
        while True:
            with trio.move_on_at(self._next_expiry()):
                try:
                    msg = await inbox.receive()
                except trio.EndOfChannel:
                    return
                match msg:
                    case Embed():
                        self._on_embed(msg)
                    case Unload(digest=digest, reply=reply):
                        for w in [w for w in self.workers.values() if w.digest == digest]:
                            self._stop_worker(w, "model was unloaded")
                        reply.send(None)
                    case StopAll(reply=reply):
                        self._stop_now("server is shutting down")
                        reply.send(None)
                    case _Wake():
                        pass
                continue
            self._expire()

    # ---- requests ----
    def _on_embed(self, msg: Embed) -> None:
        kind = model_kind(msg.resolved.spec)
        if kind is None:
            msg.reply.fail(BadRequest(f'"{msg.resolved.display}" does not support embeddings'))
            return
        if self._closing:
            msg.reply.fail(ShuttingDown())
            return
        if sum(len(w.jobs) for w in self.workers.values()) >= self.settings.max_queue:
            msg.reply.fail(ServerBusy())
            return
        key = f"{msg.resolved.digest}|{kind}"
        w = self.workers.get(key)
        if w is None:
            w = self._start_worker(key, msg.resolved, kind)
        msg.job.tag = w.state == "loading"  # this request waits for the load: report its time
        w.jobs[id(msg.job)] = msg
        w.keep_alive = msg.keep_alive
        w.expires_at = None
        w.last_used = trio.current_time()
        if w.state != "ready" or not msg.job.inputs:
            w.engine.submit(msg.job)  # the thread tokenizes once the model has loaded
        elif sum(len(x) for x in msg.job.inputs if isinstance(x, str)) <= _INLINE_CHARS:
            self._tokenize_then_submit(w, msg, None)
        else:
            self._nursery.start_soon(self._tokenize_in_thread, w, msg)
        self._evict_over_cap()

    # Inputs are tokenized (cut or refused when too long, token ids checked) here, before the
    # job queues: a 400 never waits behind another request's batch.
    def _tokenize(self, w: _Worker, msg: Embed) -> list:
        job, m = msg.job, w.engine.model
        if m is None:  # the thread has just ended (its report is on the way)
            raise EngineError("model was unloaded")
        return m.tokenize(job.inputs, truncate=job.truncate, limit=job.limit)

    async def _tokenize_in_thread(self, w: _Worker, msg: Embed) -> None:
        try:
            tokens = await trio.to_thread.run_sync(self._tokenize, w, msg, abandon_on_cancel=True)
        except Exception as exc:  # noqa: BLE001 - answers this request only
            tokens = exc
        self._tokenize_then_submit(w, msg, tokens)

    def _tokenize_then_submit(self, w: _Worker, msg: Embed, tokens: list | Exception | None) -> None:
        job = msg.job
        if tokens is None:
            try:
                tokens = self._tokenize(w, msg)
            except Exception as exc:  # noqa: BLE001
                tokens = exc
        if w.jobs.get(id(job)) is not msg:
            return  # already answered (the server is stopping, or the thread ended)
        if isinstance(tokens, Exception):
            self._answer(w, eng.JobDone(job, None, error=tokens))
        elif self.workers.get(w.key) is not w:  # unloaded meanwhile: its thread takes no more jobs
            self._answer(w, eng.JobDone(job, None, error=EngineError("model was unloaded")))
        else:
            job.tokens = tokens
            w.engine.submit(job)
            return
        self._notify()

    def _start_worker(self, key: str, resolved, kind: str) -> _Worker:
        generation = next(_generations)

        def deliver(events: list) -> None:
            try:
                self._token.run_sync_soon(self._on_events, w, events)
            except trio.RunFinishedError:
                pass

        engine = eng.EmbedEngine(lambda: w.load_fn(), deliver, device=self.settings.device,
                                 chunk=self.settings.prefill_chunk, generation_idle=activity.IDLE)
        w = _Worker(key, resolved.digest, resolved.display, kind, generation, engine,
                    size=resolved.size, spec=resolved.spec)
        self.workers[key] = w
        self._nursery.start_soon(self._boot, w, resolved)
        return w

    async def _boot(self, w: _Worker, resolved) -> None:
        """Verify and link the model's blobs, then start its thread (which loads it)."""
        try:
            await self.store.verify_for_load(resolved)
            path = await self.store.model_path(resolved)
        except Exception as exc:
            self._on_events(w, [eng.EmbedLoadFailed(exc)])
            return
        if self.workers.get(w.key) is not w:  # unloaded while verifying
            self._fail_jobs(w, EngineError("model was unloaded"))
            return
        w.load_fn = self.load_fn(resolved, path, w.kind)
        log.info("loading %s for embeddings (%s)", w.name, w.kind)
        w.finished = threading.Event()
        HOSTS.run(w.engine.run, w.finished.set)

    # ---- events from a worker thread (run on the trio thread by run_sync_soon) ----
    def _on_events(self, w: _Worker, events: list) -> None:
        for ev in events:
            match ev:
                case eng.Loaded(info=info):
                    w.state = "ready"
                    w.load_ns = info["load_ns"]
                    w.weight_bytes = info["weight_bytes"]
                    w.dimension = info["dimension"]
                    w.context_length = info.get("context_length", 0)
                    w.device = info.get("device", "cpu")
                    log.info("loaded %s for embeddings in %.2fs", w.name, w.load_ns / 1e9)
                    heap.freeze()
                case eng.BatchStarted(jobs=jobs):
                    w.computing = {id(j) for j in jobs}
                case eng.Step():
                    w.steps += 1
                case eng.JobDone(job=job, cancelled=cancelled):
                    w.computing.discard(id(job))
                    w.cancelled += cancelled
                    self._answer(w, ev)
                case eng.EmbedLoadFailed(error=error):
                    err = error if isinstance(error, MlxserveError) \
                        else LoadError(f"model failed to load: {error}")
                    self._drop(w)
                    self._fail_jobs(w, err)
                case eng.EmbedStopped(error=error):
                    self._drop(w)
                    self._fail_jobs(w, EngineError(error or "model was unloaded"))
                    heap.reclaim(release_cached_buffers)  # the engine let go of the model first
        self._notify()

    def _answer(self, w: _Worker, done: eng.JobDone) -> None:
        msg: Embed | None = w.jobs.pop(id(done.job), None)
        if msg is None:
            return
        if done.error is not None:
            msg.reply.fail(done.error)
        else:
            msg.reply.send(EmbedResult(done.vectors, done.token_counts,
                                       w.load_ns if done.job.tag else 0, w.kind))
        if not w.jobs and self.workers.get(w.key) is w:
            w.expires_at = trio.current_time() + w.keep_alive if w.keep_alive != math.inf else math.inf

    def _fail_jobs(self, w: _Worker, error: BaseException) -> None:
        jobs, w.jobs = w.jobs, {}
        for msg in jobs.values():
            msg.reply.fail(error)

    def _drop(self, w: _Worker) -> None:
        if self.workers.get(w.key) is w:
            del self.workers[w.key]

    def _notify(self) -> None:
        self._wake()
        self.changed.set()
        self.changed = trio.Event()

    def _wake(self) -> None:
        # The loop may be waiting on a later deadline than the one just set.
        try:
            self._inbox_send.send_nowait(_Wake())
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # a full inbox wakes the loop anyway

    # ---- keep-alive and eviction ----
    def _next_expiry(self) -> float:
        deadlines = [w.expires_at for w in self.workers.values() if w.expires_at is not None and not w.jobs]
        return min(deadlines, default=math.inf)

    def _expire(self) -> None:
        now = trio.current_time()
        for w in list(self.workers.values()):
            if not w.jobs and w.expires_at is not None and w.expires_at <= now:
                self._stop_worker(w, "keep_alive expired")

    def _evict_over_cap(self) -> None:
        while len(self.workers) > self.max_loaded:
            idle = [w for w in self.workers.values() if not w.jobs]
            if not idle:
                return  # everything is busy; the next expiry or completion brings it down
            self._stop_worker(min(idle, key=lambda w: w.last_used), "evicted for another model")

    def _stop_worker(self, w: _Worker, reason: str, *, now: bool = False) -> None:
        log.info("unloading %s (embeddings): %s", w.name, reason)
        self._drop(w)
        w.engine.submit(eng.EmbedShutdown(reason, now=now))
        self._stopping.append(w)
        # Threads that already ended need no join at shutdown.
        self._stopping = [s for s in self._stopping if s.finished is None or not s.finished.is_set()]

    def _stop_now(self, reason: str) -> None:
        """Refuse new requests, fail the waiting ones, and stop every thread at its next chunk."""
        self._closing = True
        workers = list(self.workers.values())
        for w in workers:
            self._stop_worker(w, reason, now=True)
        for w in workers:
            self._fail_jobs(w, ShuttingDown(reason))

    async def _stop_all(self, reason: str) -> None:
        self._stop_now(reason)
        # Bounded and shielded: a model mid-batch stops at its next chunk, then its thread ends.
        with trio.move_on_after(10, shield=True):
            for w in self._stopping:
                if w.finished is not None and not w.finished.is_set():
                    await trio.to_thread.run_sync(w.finished.wait, abandon_on_cancel=True)
        self._stopping.clear()
