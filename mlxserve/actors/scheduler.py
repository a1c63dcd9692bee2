"""The Scheduler actor: admission, queue caps, residency, keep-alive and eviction.

It owns every loaded model, generative (a Runner) or embedding (an EmbedWorker): one memory
budget, one eviction policy, one list for /api/ps. It never touches MLX: loading goes through an
injected ``load_fn`` (``loader.model_loader``, or a fake in tests), so every policy here is
testable with trio's autojump clock.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import Any, Awaitable, Callable, Generic, Literal, Protocol, TypeVar, Union

import attrs
import trio

from ..config import DEFAULT_NUM_PARALLEL
from ..errors import EngineError, MlxserveError, ServerBusy, ShuttingDown
from ..store.store import ResolvedModel
from .mailbox import Inbox, Reply, ask, fail_pending, open_inbox

log = logging.getLogger("mlxserve.scheduler")
MAX_CRASH_RESTARTS = 3


# What a resident model serves: generation (a Runner), or embeddings with a BERT encoder or a
# decoder's pooled hidden states (an EmbedWorker).
Kind = Literal["generate", "bert", "decoder"]


@attrs.frozen
class LoadSpec:
    """Everything needed to load a model; ``key`` identifies a loaded instance."""

    key: str
    name: str
    digest: str
    size: int = 0
    num_ctx: int | None = None
    kv_bytes: int = 0  # KV cache estimate for a full batch at num_ctx
    details: dict[str, Any] = attrs.field(factory=dict, eq=False)
    resolved: ResolvedModel | None = attrs.field(default=None, eq=False)  # the store's record
    kind: Kind = "generate"


class ModelHandle(Protocol):
    """What the Scheduler needs of a loaded model (RunnerHandle, EmbedWorkerHandle)."""

    key: str
    generation: int
    load_seconds: float

    @property
    def alive(self) -> bool: ...

    @property
    def weight_bytes(self) -> int: ...

    @property
    def vram_bytes(self) -> int: ...

    @property
    def context_length(self) -> int: ...

    def running(self) -> int:
        """Sequences or jobs its engine holds now (a gone client's stay until dropped)."""
        ...

    async def stop(self, reason: str = "model was unloaded", *, now: bool = False) -> None:
        """Stop and wait until the engine has let go of the model; ``now``: do not finish the
        batch in progress (shutdown)."""
        ...


H = TypeVar("H", bound=ModelHandle)  # the concrete handle a caller needs (RunnerHandle, EmbedWorkerHandle)

# Called by a model when it exits: (key, generation, crash reason or None, sequences served).
OnExit = Callable[[str, int, Union[str, None], int], None]
LoadFn = Callable[[LoadSpec, OnExit], Awaitable[ModelHandle]]


# ---- messages ----
@attrs.frozen
class Grant:
    handle: ModelHandle
    fresh: bool  # the request waited for this very load


@attrs.frozen
class Acquire:
    spec: LoadSpec
    keep_alive: float
    reply: Reply[Grant]


@attrs.frozen
class Release:
    key: str
    generation: int
    keep_alive: float | None


@attrs.frozen
class LoadDone:
    spec: LoadSpec
    handle: ModelHandle | None = None
    error: BaseException | None = None


@attrs.frozen
class RunnerExited:
    key: str
    generation: int
    crash: str | None
    served: int = 0  # sequences it finished normally: a crash after serving is not a crash loop


@attrs.frozen
class Unload:
    name: str | None  # None: all
    reply: Reply[int]
    kinds: tuple[Kind, ...] | None = None  # None: every kind


@attrs.frozen
class StopAll:
    """Shutdown: stop every runner now (their open streams get an error chunk)."""

    reply: Reply[None]


@attrs.frozen
class Residents:
    reply: Reply[dict[str, ModelHandle]]


@attrs.frozen
class Snapshot:
    reply: Reply[SchedulerStats]


@attrs.frozen
class Dequeue:
    """A waiting acquire gave up (its client left): stop counting it as queued."""

    reply: Reply[Grant]


def _footprint(r: Resident) -> int:
    """What a resident model holds: its weights as loaded (f32 on a CPU may be 6x the file) plus
    the KV estimate it was admitted with."""
    return (r.handle.weight_bytes or r.spec.size) + r.spec.kv_bytes


@attrs.define
class Resident:
    spec: LoadSpec
    handle: ModelHandle
    refcount: int = 0
    keep_alive: float = 300.0
    expires_at: float = math.inf  # trio clock; inf while busy or kept forever
    last_used: float = 0.0
    loaded_at_wall: float = attrs.Factory(time.time)
    unloading: bool = False


@attrs.frozen
class ModelStatus:
    name: str
    key: str
    digest: str
    size: int
    loaded: bool
    running: int
    queued: int
    expires_at: float | None  # unix time; None while busy; inf forever
    context_length: int
    details: dict[str, Any]
    engine_running: int = 0  # sequences the engine holds (a left client's stays until dropped)
    size_vram: int = 0
    kind: Kind = "generate"


@attrs.frozen
class SchedulerStats:
    models: tuple[ModelStatus, ...]
    queued: int
    running: int
    loaded: int


@attrs.define(eq=False)
class Lease(Generic[H]):
    """A claim on a loaded model; release it (sync) when the request ends."""

    handle: H  # a RunnerHandle for "generate" specs, an EmbedWorkerHandle else
    _scheduler: SchedulerHandle
    fresh: bool = False  # this request waited for the model's load
    _released: bool = False

    def release(self, keep_alive: float | None = None) -> None:
        if not self._released:
            self._released = True
            self._scheduler.release_nowait(self.handle.key, self.handle.generation, keep_alive)

    def __enter__(self) -> Lease[H]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@attrs.define(eq=False)
class SchedulerHandle:
    _inbox: Inbox[Any]

    async def acquire(self, spec: LoadSpec, keep_alive: float) -> Lease[ModelHandle]:
        grant = await self._grant(spec, keep_alive)
        return Lease(grant.handle, self, fresh=grant.fresh)

    async def acquire_as(self, handle_type: type[H], spec: LoadSpec, keep_alive: float) -> Lease[H]:
        """``acquire`` for a caller that uses the concrete handle: the model's kind decides which
        one serves it, so a mismatch is a bug (the grant goes back at once)."""
        grant = await self._grant(spec, keep_alive)
        handle = grant.handle
        if not isinstance(handle, handle_type):
            self.release_nowait(handle.key, handle.generation, None)
            raise TypeError(f"{spec.name} is served by a {type(handle).__name__}, not a {handle_type.__name__}")
        return Lease(handle, self, fresh=grant.fresh)

    async def _grant(self, spec: LoadSpec, keep_alive: float) -> Grant:
        reply: Reply[Grant] = Reply()
        self._inbox.post(Acquire(spec, keep_alive, reply))
        try:
            return await reply.wait()
        except trio.Cancelled:
            # Gave up while queued (client gone): if the lease arrives later, it is handed back.
            self._inbox.deliver(Dequeue(reply))
            raise

    def release_nowait(self, key: str, generation: int, keep_alive: float | None) -> None:
        self._inbox.deliver(Release(key, generation, keep_alive))  # must arrive: never dropped

    async def unload(self, name: str | None = None, kinds: tuple[Kind, ...] | None = None) -> int:
        """Unload ``name`` (every model when None; only these kinds of it if given) as soon as
        nothing runs on it; returns how many were marked."""
        return await ask(self._inbox, lambda r: Unload(name, r, kinds))

    async def statistics(self) -> SchedulerStats:
        return await ask(self._inbox, Snapshot)

    async def runners(self) -> dict[str, ModelHandle]:
        """Loaded generation runners by model name (for observability and tests)."""
        return await ask(self._inbox, Residents)

    async def stop_all(self) -> None:
        await ask(self._inbox, StopAll)


@attrs.define(eq=False)
class Scheduler:
    load_fn: LoadFn
    num_parallel: int = DEFAULT_NUM_PARALLEL
    max_loaded: int = 3
    max_memory: int | None = None  # bytes for resident models (weights + KV estimate); None: no cap
    max_queue: int = 512
    default_keep_alive: float = 300.0
    on_event: Callable[[str, dict[str, Any]], None] | None = None

    residents: dict[str, Resident] = attrs.field(factory=dict, init=False)
    waiting: dict[str, deque[Acquire]] = attrs.field(factory=dict, init=False)
    loading: str | None = attrs.field(default=None, init=False)
    crashes: dict[str, int] = attrs.field(factory=dict, init=False)
    closing: bool = attrs.field(default=False, init=False)  # StopAll: later acquires are refused
    _send: Inbox[Any] | None = attrs.field(default=None, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)

    # -- queue accounting: requests that will not run as soon as their model is ready --
    def queued(self) -> int:
        waiting = sum(self._queued_waiting(key, q) for key, q in self.waiting.items())
        over = sum(max(0, r.refcount - self.num_parallel) for r in self.residents.values())
        return waiting + over

    def _queued_waiting(self, key: str, q: deque[Acquire]) -> int:
        """Waiters for the model being loaded (or next to load) take its running slots when it is
        ready, as requests to a loaded model do, so only those beyond the slots are queued: counting
        them all refused a cold model's burst beyond MAX_QUEUE (4 of 50 served). Waiters for any
        other model all count, so the slack stays one model's."""
        first = self.loading if self.loading is not None else next(iter(self.waiting), None)
        return max(0, len(q) - self.num_parallel) if key == first else len(q)

    async def run(self, *, task_status: trio.TaskStatus[SchedulerHandle] = trio.TASK_STATUS_IGNORED) -> None:
        # Requests beyond this many unread are refused; releases and exits always get in.
        send, inbox = open_inbox(self.max_queue * 2 + 1024)
        self._send = send
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(SchedulerHandle(send))
            async with inbox:
                try:
                    await self._serve(inbox)
                finally:
                    fail_pending(inbox)
                    for a in (a for q in self.waiting.values() for a in q):
                        a.reply.fail(ShuttingDown())
            await self._unload_all()

    async def _serve(self, inbox: trio.MemoryReceiveChannel[Any]) -> None:
        while True:
            # Keep-alive expiry is a deadline on this loop, not a sleeping task per model.
            deadline = min((r.expires_at for r in self.residents.values()), default=math.inf)
            msg = None
            with trio.move_on_at(deadline):
                try:
                    msg = await inbox.receive()
                except trio.EndOfChannel:
                    return
            if msg is None:
                self._expire(trio.current_time())
            else:
                self._handle(msg)
            self._maybe_start_load()

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.on_event is not None:
            self.on_event(kind, fields)

    def _handle(self, msg: Any) -> None:
        match msg:
            case Acquire():
                self._on_acquire(msg)
            case Release(key=key, generation=gen, keep_alive=ka):
                r = self.residents.get(key)
                if r is None or r.handle.generation != gen:
                    return  # a stale release from a runner that is already gone
                r.refcount = max(0, r.refcount - 1)
                if ka is not None:
                    r.keep_alive = ka
                r.last_used = trio.current_time()
                if r.refcount == 0:
                    r.expires_at = trio.current_time() + r.keep_alive
            case LoadDone():
                self._on_load_done(msg)
            case RunnerExited(key=key, generation=gen, crash=crash, served=served):
                r = self.residents.get(key)
                if r is not None and r.handle.generation == gen:
                    del self.residents[key]
                if crash:
                    # The cap is on crashes in a row: a runner that served requests before it
                    # crashed starts the count again, or a model would be refused for good after
                    # a few unrelated crashes over a long uptime.
                    self.crashes[key] = 1 if served else self.crashes.get(key, 0) + 1
                    self._emit("runner_crashed", key=key, error=crash)
                else:
                    self.crashes.pop(key, None)
            case Unload(name=name, reply=reply, kinds=kinds):
                n = 0
                for r in list(self.residents.values()):
                    if (
                        (name is None or r.spec.name == name)
                        and (kinds is None or r.spec.kind in kinds)
                        and not r.unloading
                    ):
                        r.keep_alive = 0
                        if r.refcount == 0:
                            self._emit("unload", model=r.spec.name)
                            self._stop(r)
                        n += 1
                reply.send(n)
            case Snapshot(reply=reply):
                reply.send(self._snapshot())
            case Residents(reply=reply):
                reply.send(
                    {
                        r.spec.name: r.handle
                        for r in self.residents.values()
                        if not r.unloading and r.spec.kind == "generate"
                    }
                )
            case StopAll(reply=reply):
                self.closing = True
                for a in (a for q in self.waiting.values() for a in q):
                    a.reply.fail(ShuttingDown())
                self.waiting.clear()
                assert self._nursery is not None
                self._nursery.start_soon(self._stop_all, list(self.residents.values()), reply)
            case Dequeue(reply=reply):
                for q in self.waiting.values():
                    for a in q:
                        if a.reply is reply:
                            q.remove(a)
                            self._emit("dequeued", model=a.spec.name)
                            break
                if reply.done:  # the lease had already been granted: give it back
                    try:
                        grant = reply.value_nowait()
                    except Exception:
                        return
                    if isinstance(grant, Grant):
                        self._handle(Release(grant.handle.key, grant.handle.generation, None))

    def _on_acquire(self, msg: Acquire) -> None:
        if self.closing:
            msg.reply.fail(ShuttingDown())
            return
        key = msg.spec.key
        r = self.residents.get(key)
        if r is not None and r.handle.alive and not r.unloading:
            if r.refcount >= self.num_parallel and self.queued() >= self.max_queue:
                msg.reply.fail(ServerBusy(retry_after=1))
                self._emit("rejected", model=msg.spec.name)
                return
            self._grant(r, msg)
            return
        if self.queued() >= self.max_queue:
            msg.reply.fail(ServerBusy(retry_after=2))
            self._emit("rejected", model=msg.spec.name)
            return
        if self.crashes.get(key, 0) > MAX_CRASH_RESTARTS:
            msg.reply.fail(EngineError(f"model '{msg.spec.name}' crashed {self.crashes[key]} times; not restarting"))
            return
        self.waiting.setdefault(key, deque()).append(msg)

    def _grant(self, r: Resident, msg: Acquire, *, fresh: bool = False) -> None:
        r.refcount += 1
        r.keep_alive = msg.keep_alive
        r.expires_at = math.inf
        r.last_used = trio.current_time()
        msg.reply.send(Grant(r.handle, fresh))

    def _maybe_start_load(self) -> None:
        if self.loading is not None:
            return
        # Drop keys whose waiters all left.
        for key in [k for k, q in self.waiting.items() if not q]:
            del self.waiting[key]
        if not self.waiting:
            return
        key = next(iter(self.waiting))
        spec = self.waiting[key][0].spec
        live = [r for r in self.residents.values() if not r.unloading]
        over_memory = (
            self.max_memory is not None
            and live
            and sum(_footprint(r) for r in live) + spec.size + spec.kv_bytes > self.max_memory
        )
        if len(live) >= self.max_loaded or over_memory:
            idle = [r for r in live if r.refcount == 0]
            if not idle:
                return  # wait for a release; never evict a model with running sequences
            victim = min(idle, key=lambda r: r.last_used)
            self._emit("evict", model=victim.spec.name)
            self._stop(victim)
            return  # the next load starts when its RunnerExited arrives
        if any(r.unloading for r in self.residents.values()) and len(self.residents) >= self.max_loaded:
            return
        self.loading = key
        assert self._nursery is not None
        self._nursery.start_soon(self._load_task, spec)

    async def _load_task(self, spec: LoadSpec) -> None:
        assert self._send is not None
        t0 = time.perf_counter()
        try:
            handle = await self.load_fn(spec, self._runner_exited)
            handle.load_seconds = time.perf_counter() - t0
        except MlxserveError as exc:
            self._send.deliver(LoadDone(spec, error=exc))
        except Exception as exc:  # a bug in loading must still answer the waiters
            log.exception("load of %s failed", spec.name)
            self._send.deliver(LoadDone(spec, error=EngineError(f"load failed: {exc}")))
        else:
            self._send.deliver(LoadDone(spec, handle=handle))

    def _runner_exited(self, key: str, generation: int, crash: str | None, served: int = 0) -> None:
        assert self._send is not None
        self._send.deliver(RunnerExited(key, generation, crash, served))  # must arrive

    def _on_load_done(self, msg: LoadDone) -> None:
        key = msg.spec.key
        self.loading = None
        waiters = self.waiting.pop(key, deque())
        if msg.error is not None:
            self._emit("load_failed", model=msg.spec.name, error=str(msg.error))
            for a in waiters:
                a.reply.fail(msg.error)
            return
        assert msg.handle is not None
        r = Resident(msg.spec, msg.handle, keep_alive=self.default_keep_alive)
        r.last_used = trio.current_time()
        self.residents[key] = r
        self._emit("loaded", model=msg.spec.name, seconds=msg.handle.load_seconds)
        for a in waiters:
            self._grant(r, a, fresh=True)
        if not waiters:
            r.expires_at = trio.current_time() + r.keep_alive

    def _expire(self, now: float) -> None:
        for r in list(self.residents.values()):
            if r.refcount == 0 and r.expires_at <= now and not r.unloading:
                self._emit("expire", model=r.spec.name)
                self._stop(r)

    def _stop(self, r: Resident) -> None:
        r.unloading = True
        r.expires_at = math.inf
        assert self._nursery is not None
        self._nursery.start_soon(r.handle.stop)

    async def _stop_all(self, residents: list[Resident], reply: Reply[None]) -> None:
        async def stop(r: Resident) -> None:
            await r.handle.stop("server is shutting down", now=True)

        async with trio.open_nursery() as n:
            for r in residents:
                r.unloading = True
                n.start_soon(stop, r)
        reply.send(None)

    async def _unload_all(self) -> None:
        with trio.move_on_after(15, shield=True):
            async with trio.open_nursery() as n:
                for r in self.residents.values():
                    n.start_soon(r.handle.stop)

    def _snapshot(self) -> SchedulerStats:
        now, wall = trio.current_time(), time.time()
        models = []
        for key, r in self.residents.items():
            if r.unloading:
                continue
            if r.refcount > 0:
                expires = None
            elif math.isinf(r.expires_at):
                expires = math.inf
            else:
                expires = wall + (r.expires_at - now)
            models.append(
                ModelStatus(
                    r.spec.name,
                    key,
                    r.spec.digest,
                    r.spec.size,
                    True,
                    min(r.refcount, self.num_parallel),
                    max(0, r.refcount - self.num_parallel),
                    expires,
                    r.handle.context_length,
                    r.spec.details,
                    r.handle.running(),
                    r.handle.vram_bytes,
                    r.spec.kind,
                )
            )
        for key, q in self.waiting.items():
            if q and key not in self.residents:
                s = q[0].spec
                models.append(
                    ModelStatus(
                        s.name,
                        key,
                        s.digest,
                        s.size,
                        False,
                        0,
                        self._queued_waiting(key, q),
                        None,
                        0,
                        s.details,
                        kind=s.kind,
                    )
                )
        running = sum(min(r.refcount, self.num_parallel) for r in self.residents.values())
        return SchedulerStats(tuple(models), self.queued(), running, len(self.residents))
