"""The Runner actor: one per loaded model; owns the engine thread and the open token streams."""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from typing import Any, Callable

import attrs
import trio

from ..engine import loop as eng
from ..engine.model import LoadedModel
from ..errors import EngineError, LoadError, ShuttingDown
from .mailbox import Reply, post

log = logging.getLogger("mlxserve.runner")
_seq_ids = itertools.count(1)


@attrs.frozen
class Submit:
    cmd: eng.Add
    stream: trio.MemorySendChannel


@attrs.frozen
class CancelSeq:
    seq_id: int


@attrs.frozen
class StopRunner:
    reply: Reply | None = None
    reason: str = "model was unloaded"


@attrs.frozen
class RunnerStats:
    running: int
    context_length: int
    weight_bytes: int
    alive: bool


@attrs.define(eq=False)
class RunnerHandle:
    """What callers hold: submit work, cancel it, read stats. Never touches engine state."""

    key: str  # the model's manifest digest plus load options: what the Scheduler indexes by
    generation: int
    _inbox: trio.MemorySendChannel
    _runner: "Runner"
    load_seconds: float = 0.0

    @property
    def tokenizer(self):
        return self._runner.loaded.tokenizer

    @property
    def context_length(self) -> int:
        return self._runner.context_length

    @property
    def weight_bytes(self) -> int:
        return self._runner.weight_bytes

    @property
    def alive(self) -> bool:
        return self._runner.alive

    def statistics(self) -> RunnerStats:
        r = self._runner
        return RunnerStats(len(r.engine_active), r.context_length, r.weight_bytes, r.alive)

    def finished(self) -> list[tuple[int, str, eng.SeqStats | None]]:
        """Recently ended sequences: (seq_id, finish reason, stats), oldest first."""
        return list(self._runner.finished)

    async def wait_until(self, predicate: Callable[[RunnerStats], bool]) -> RunnerStats:
        """Wait (without polling) until the runner's statistics satisfy ``predicate``."""
        while True:
            stats = self.statistics()
            if predicate(stats) or not self._runner.alive:
                return stats
            await self._runner.changed.wait()

    def submit_nowait(self, cmd_fields: dict[str, Any]) -> tuple[int, trio.MemoryReceiveChannel]:
        """Queue a sequence; returns its id and the channel its chunks arrive on.

        The channel's buffer is the request's own token budget, so the engine never waits on a
        slow reader; closing the receive end is how a caller says it is gone.
        """
        seq_id = next(_seq_ids)
        cmd = eng.Add(seq_id=seq_id, **cmd_fields)
        send, recv = trio.open_memory_channel(cmd.max_tokens + 16)
        post(self._inbox, Submit(cmd, send))
        return seq_id, recv

    def cancel_nowait(self, seq_id: int) -> None:
        try:
            self._inbox.send_nowait(CancelSeq(seq_id))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the runner is gone or busy; a closed stream is noticed on the next chunk anyway

    async def stop(self, reason: str = "model was unloaded") -> None:
        reply = Reply()
        try:
            post(self._inbox, StopRunner(reply, reason))
        except ShuttingDown:
            return
        await reply.wait()


@attrs.define(eq=False)
class Runner:
    key: str
    generation: int
    load_fn: Callable[[], LoadedModel]
    num_parallel: int = 8
    prefill_chunk: int = 256
    on_exit: Callable[["Runner", str | None], None] | None = None
    device: Any = None
    prompt_cache_bytes: int = 0

    streams: dict[int, trio.MemorySendChannel] = attrs.field(factory=dict, init=False)
    # Sequences the engine holds (submitted, not yet reported finished): the true slot count,
    # which stays up after a client leaves until the engine has dropped its sequence.
    engine_active: set[int] = attrs.field(factory=set, init=False)
    finished: collections.deque = attrs.field(factory=lambda: collections.deque(maxlen=256), init=False)
    changed: trio.Event = attrs.field(factory=trio.Event, init=False)
    loaded: LoadedModel | None = attrs.field(default=None, init=False)
    context_length: int = attrs.field(default=0, init=False)
    weight_bytes: int = attrs.field(default=0, init=False)
    alive: bool = attrs.field(default=False, init=False)
    _engine: eng.Engine | None = attrs.field(default=None, init=False)
    _thread: threading.Thread | None = attrs.field(default=None, init=False)
    _ready: trio.Event = attrs.field(factory=trio.Event, init=False)
    _stopped: trio.Event = attrs.field(factory=trio.Event, init=False)
    _load_error: BaseException | None = attrs.field(default=None, init=False)
    _crash: str | None = attrs.field(default=None, init=False)
    _stop_reason: str = attrs.field(default="model was unloaded", init=False)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        token = trio.lowlevel.current_trio_token()

        def deliver(events: list) -> None:
            try:
                token.run_sync_soon(self._on_events, events)
            except trio.RunFinishedError:
                pass

        self._engine = eng.Engine(
            self.load_fn, deliver, num_parallel=self.num_parallel,
            prefill_chunk=self.prefill_chunk, device=self.device,
            prompt_cache_bytes=self.prompt_cache_bytes,
        )
        self._thread = threading.Thread(target=self._engine.run, name=f"engine-{self.key[:19]}", daemon=True)
        self._thread.start()
        await self._ready.wait()
        if self._load_error is not None:
            await self._join_thread()
            err = self._load_error
            raise err if isinstance(err, LoadError) else LoadError(f"model failed to load: {err}") from err
        send, inbox = trio.open_memory_channel(1024)
        handle = RunnerHandle(self.key, self.generation, send, self)
        self.alive = True
        task_status.started(handle)
        stop_reply: Reply | None = None
        try:
            async with inbox:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_crash, nursery.cancel_scope)
                    async for msg in inbox:
                        match msg:
                            case Submit(cmd=cmd, stream=stream):
                                self.streams[cmd.seq_id] = stream
                                self.engine_active.add(cmd.seq_id)
                                self._engine.submit(cmd)
                                self._notify()
                            case CancelSeq(seq_id=sid):
                                if self.streams.pop(sid, None) is not None:
                                    self._engine.submit(eng.Cancel(sid))
                            case StopRunner(reply=reply, reason=reason):
                                stop_reply = reply
                                self._stop_reason = reason
                                break
                    nursery.cancel_scope.cancel()
        except Exception:  # a bug here must not take the runtime's nursery down with it
            log.exception("runner %s failed", self.key)
        finally:
            self.alive = False
            self._notify()
            send.close()
            # Tell the requesters first, so the engine's own "cancelled" reports find no stream.
            self._fail_streams(self._crash or self._stop_reason)
            with trio.move_on_after(10, shield=True):
                self._engine.submit(eng.Shutdown())
                await self._join_thread()
            if self.on_exit is not None:
                self.on_exit(self, self._crash)
            if stop_reply is not None:
                stop_reply.send(None)

    async def _watch_crash(self, scope: trio.CancelScope) -> None:
        await self._stopped.wait()
        scope.cancel()

    async def _join_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            await trio.to_thread.run_sync(self._thread.join)

    def _on_events(self, events: list) -> None:
        for ev in events:
            match ev:
                case eng.Chunk():
                    self._route(ev)
                case eng.Ready(info=info):
                    self.loaded = self._engine.lm
                    self.context_length = info["context_length"]
                    self.weight_bytes = info["weight_bytes"]
                    self._ready.set()
                case eng.LoadFailed(error=error):
                    self._load_error = error
                    self._ready.set()
                case eng.Stopped(error=error):
                    self._crash = error
                    self.engine_active.clear()
                    self._stopped.set()
                    self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _route(self, chunk: eng.Chunk) -> None:
        if chunk.finish is not None:
            self.engine_active.discard(chunk.seq_id)
            self.finished.append((chunk.seq_id, chunk.finish, chunk.stats))
            self._notify()
        stream = self.streams.get(chunk.seq_id)
        if stream is None:
            return
        try:
            stream.send_nowait(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The requester closed its end: it is gone. Drop the sequence at the next step.
            self.streams.pop(chunk.seq_id, None)
            if chunk.finish is None:
                self._engine.submit(eng.Cancel(chunk.seq_id))
            return
        except trio.WouldBlock:  # cannot happen with a budget-sized buffer; fail loudly if it does
            self.streams.pop(chunk.seq_id, None)
            self._engine.submit(eng.Cancel(chunk.seq_id))
            stream.close()
            return
        if chunk.finish is not None:
            self.streams.pop(chunk.seq_id, None)
            stream.close()

    def _fail_streams(self, reason: str) -> None:
        for sid, stream in list(self.streams.items()):
            try:
                stream.send_nowait(eng.Chunk(sid, "", (), finish="error", error=reason))
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            stream.close()
        self.streams.clear()


def engine_error(chunk: eng.Chunk) -> EngineError:
    return EngineError(chunk.error or "generation failed")
