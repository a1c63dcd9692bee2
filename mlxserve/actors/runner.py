"""The Runner actor: one per loaded model; owns the engine thread and the open token streams."""

from __future__ import annotations

import collections
import itertools
import logging
import time
from typing import Callable

import attrs
import trio

from ..config import DEFAULT_NUM_PARALLEL, AdmitWindow
from ..engine import loop as eng
from ..engine.memory import release_cached_buffers
from ..engine.model import LoadedModel
from ..engine.tokenizer import TokenizerInfo
from ..errors import EngineError, LoadError, ShuttingDown
from . import activity, faults, heap
from .hosts import HOSTS
from .mailbox import Reply, post, post_nowait_or_drop
from .sequence import SequenceRequest

log = logging.getLogger("mlxserve.runner")
_seq_ids = itertools.count(1)


@attrs.frozen
class Submit:
    cmd: eng.Add
    stream: trio.MemorySendChannel[eng.Chunk]


@attrs.frozen
class CancelSeq:
    seq_id: int


@attrs.frozen
class StopRunner:
    reply: Reply[None] | None = None
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
    _inbox: trio.MemorySendChannel[Submit | CancelSeq | StopRunner]
    _runner: Runner
    tokenizer: TokenizerInfo | None = None  # the handle's own: the runner lets go of its model
    load_seconds: float = 0.0

    @property
    def context_length(self) -> int:
        return self._runner.context_length

    @property
    def weight_bytes(self) -> int:
        return self._runner.weight_bytes

    @property
    def vram_bytes(self) -> int:
        """Bytes held in GPU memory (Ollama's size_vram): the weights when the engine is on a GPU."""
        return self._runner.weight_bytes if self._runner.device_type == "gpu" else 0

    @property
    def alive(self) -> bool:
        return self._runner.alive

    def statistics(self) -> RunnerStats:
        r = self._runner
        return RunnerStats(len(r.engine_active), r.context_length, r.weight_bytes, r.alive)

    def running(self) -> int:
        return len(self._runner.engine_active)

    def finished(self) -> list[tuple[int, str, eng.SeqStats | None]]:
        """Recently ended sequences: (seq_id, finish reason, stats), oldest first."""
        return list(self._runner.finished)

    async def wait_exited(self) -> None:
        """Wait until the runner has stopped its engine and let go of the model."""
        await self._runner.exited.wait()

    async def wait_until(self, predicate: Callable[[RunnerStats], bool]) -> RunnerStats:
        """Wait (without polling) until the runner's statistics satisfy ``predicate``."""
        while True:
            stats = self.statistics()
            if predicate(stats) or not self._runner.alive:
                return stats
            await self._runner.changed.wait()

    def submit_nowait(self, request: SequenceRequest) -> tuple[int, trio.MemoryReceiveChannel[eng.Chunk]]:
        """Queue a sequence; returns its id and the channel its chunks arrive on.

        The channel's buffer is the request's own token budget, so the engine never waits on a
        slow reader; closing the receive end is how a caller says it is gone.
        """
        seq_id = next(_seq_ids)
        cmd = request.command(seq_id)
        send, recv = trio.open_memory_channel[eng.Chunk](cmd.max_tokens + 16)
        post(self._inbox, Submit(cmd, send))
        return seq_id, recv

    def cancel_nowait(self, seq_id: int) -> None:
        # Dropped only when the runner is gone or swamped; a closed stream is noticed at its next
        # chunk anyway.
        post_nowait_or_drop(self._inbox, CancelSeq(seq_id))

    async def stop(self, reason: str = "model was unloaded", *, now: bool = False) -> None:
        """Fail the open streams with ``reason`` and wait for the engine to let go of the model
        (``now`` changes nothing: a runner never finishes its streams first)."""
        reply: Reply[None] = Reply()
        try:
            post(self._inbox, StopRunner(reply, reason))
        except ShuttingDown:
            return
        await reply.wait()


@attrs.frozen
class CancelRecord:
    """A sequence whose requester left, measured from the cancel to the engine freeing its slot.

    ``phase`` is where the sequence was when its requester left: ``queued`` (behind
    ``num_parallel`` earlier sequences, not yet started), ``prefill`` (holding a slot, no token
    yet) or ``decode`` (tokens already generated).
    """

    seq_id: int
    phase: str
    tokens: int
    seconds: float


@attrs.define(eq=False)
class Runner:
    key: str
    generation: int
    load_fn: Callable[[], LoadedModel]
    num_parallel: int = DEFAULT_NUM_PARALLEL
    prefill_chunk: int = 256
    on_exit: Callable[[Runner, str | None], None] | None = None
    device: str | None = None  # "cpu" or "gpu" (MLXSERVE_DEVICE); None: the GPU when present
    prompt_cache_bytes: int = 0
    admit: AdmitWindow = AdmitWindow()
    name: str = ""  # the model's display name (logs and the fault seam)
    on_cancel: Callable[[CancelRecord], None] | None = None

    streams: dict[int, trio.MemorySendChannel[eng.Chunk]] = attrs.field(factory=dict, init=False)
    # Sequences the engine holds (submitted, not yet reported finished), in submission order,
    # with the tokens each has produced: the true slot count, which stays up after a client
    # leaves until the engine has dropped its sequence.
    engine_active: dict[int, int] = attrs.field(factory=dict, init=False)
    # Sequences cancelled and not yet dropped by the engine: seq_id -> (when, phase, tokens).
    _cancelled: dict[int, tuple[float, str, int]] = attrs.field(factory=dict, init=False)
    served: int = attrs.field(default=0, init=False)  # sequences finished with stop or length
    finished: collections.deque[tuple[int, str, eng.SeqStats | None]] = attrs.field(
        factory=lambda: collections.deque(maxlen=256), init=False
    )
    changed: trio.Event = attrs.field(factory=trio.Event, init=False)
    loaded: LoadedModel | None = attrs.field(default=None, init=False)
    context_length: int = attrs.field(default=0, init=False)
    weight_bytes: int = attrs.field(default=0, init=False)
    device_type: str = attrs.field(default="cpu", init=False)
    alive: bool = attrs.field(default=False, init=False)
    _engine: eng.Engine | None = attrs.field(default=None, init=False)
    _engine_done: trio.Event = attrs.field(factory=trio.Event, init=False)
    _ready: trio.Event = attrs.field(factory=trio.Event, init=False)
    _stopped: trio.Event = attrs.field(factory=trio.Event, init=False)
    exited: trio.Event = attrs.field(factory=trio.Event, init=False)
    _load_error: BaseException | None = attrs.field(default=None, init=False)
    _crash: str | None = attrs.field(default=None, init=False)
    _stop_reason: str = attrs.field(default="model was unloaded", init=False)

    async def run(self, *, task_status: trio.TaskStatus[RunnerHandle] = trio.TASK_STATUS_IGNORED) -> None:
        token = trio.lowlevel.current_trio_token()

        def deliver(events: list[eng.Event]) -> None:
            try:
                token.run_sync_soon(self._on_events, events)
            except trio.RunFinishedError:
                pass

        def engine_returned() -> None:
            try:
                token.run_sync_soon(self._on_engine_returned)
            except trio.RunFinishedError:
                pass

        self._engine = eng.Engine(
            self.load_fn,
            deliver,
            num_parallel=self.num_parallel,
            prefill_chunk=self.prefill_chunk,
            device=self.device,
            prompt_cache_bytes=self.prompt_cache_bytes,
            admit=self.admit,
        )
        faults.SEAM.runner_started(self)
        # A reused host thread, not a new one per load: see hosts.py for the MLX thread leak.
        HOSTS.run(self._engine.run, engine_returned)
        await self._ready.wait()
        if self._load_error is not None:
            await self._join_thread()
            err = self._load_error
            raise err if isinstance(err, LoadError) else LoadError(f"model failed to load: {err}") from err
        heap.freeze()  # the model's Python objects live until unload: out of the collector's way
        send, inbox = trio.open_memory_channel[Submit | CancelSeq | StopRunner](1024)
        assert self.loaded is not None  # set with the Ready report
        handle = RunnerHandle(self.key, self.generation, send, self, self.loaded.tokenizer)
        self.alive = True
        task_status.started(handle)
        stop_reply: Reply[None] | None = None
        try:
            async with inbox:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_crash, nursery.cancel_scope)
                    async for msg in inbox:
                        match msg:
                            case Submit(cmd=cmd, stream=stream):
                                self.streams[cmd.seq_id] = stream
                                self.engine_active[cmd.seq_id] = 0
                                self._engine.submit(cmd)
                                self._notify()
                            case CancelSeq(seq_id=sid):
                                if self.streams.pop(sid, None) is not None:
                                    self._cancel(sid)
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
            self._report_cancelled()  # the engine is gone: every slot it held is free
            # Handles outlive the runner (the Loader's last reply, a late request's lease): they
            # must not keep the weights in memory.
            self.loaded = self._engine = None  # the engine holds the model and the prefix KV cache
            heap.reclaim(release_cached_buffers)  # and the model's cycles, frozen since its load
            self.exited.set()
            if self.on_exit is not None:
                self.on_exit(self, self._crash)
            if stop_reply is not None:
                stop_reply.send(None)

    async def _watch_crash(self, scope: trio.CancelScope) -> None:
        await self._stopped.wait()
        scope.cancel()

    async def _join_thread(self) -> None:
        await self._engine_done.wait()

    def _on_engine_returned(self) -> None:
        self._engine_done.set()
        # Engine.run always reports Ready/LoadFailed and Stopped first; if it ever does not,
        # nobody must wait for those reports forever.
        if not self._ready.is_set():
            self._load_error = LoadError("the engine thread ended before the model was loaded")
            self._ready.set()
        if not self._stopped.is_set():
            self._crash = self._crash or "engine thread ended unexpectedly"
            self.engine_active.clear()
            self._stopped.set()
            self._notify()

    def arm_engine_fault(self, name: str) -> None:
        """Fault seam (chaos harness only): arm one of the engine's own faults now."""
        if self._engine is not None:
            self._engine.faults.armed.add(name)

    def _cancel(self, sid: int) -> None:
        """The requester of ``sid`` is gone: drop it at the engine's next step and time that."""
        if sid in self.engine_active and sid not in self._cancelled:
            tokens = self.engine_active[sid]
            if tokens:
                phase = "decode"
            else:
                # The engine admits sequences first come, first served, num_parallel at a time.
                rank = next(i for i, s in enumerate(self.engine_active) if s == sid)
                phase = "queued" if rank >= self.num_parallel else "prefill"
            self._cancelled[sid] = (time.perf_counter(), phase, tokens)
        if self._engine is not None:  # None once the runner has exited: nothing left to cancel
            self._engine.submit(eng.Cancel(sid))

    def _slot_freed(self, sid: int) -> None:
        entry = self._cancelled.pop(sid, None)
        if entry is not None and self.on_cancel is not None:
            t0, phase, tokens = entry
            try:
                self.on_cancel(CancelRecord(sid, phase, tokens, time.perf_counter() - t0))
            except Exception:
                log.exception("on_cancel failed")

    def _report_cancelled(self) -> None:
        for sid in list(self._cancelled):
            self._slot_freed(sid)

    def _on_events(self, events: list[eng.Event]) -> None:
        for ev in events:
            match ev:
                case eng.Chunk():
                    self._route(ev)
                case eng.Ready(info=info):
                    assert self._engine is not None and self._engine.lm is not None
                    self.loaded = loaded = self._engine.lm
                    log.info(
                        "loaded %s: %.1f MB of weights as %s, context %d",
                        self.key[:19],
                        info["weight_bytes"] / 1e6,
                        loaded.weight_dtype,
                        info["context_length"],
                    )
                    self.context_length = info["context_length"]
                    self.weight_bytes = info["weight_bytes"]
                    self.device_type = info.get("device", "cpu")
                    self._ready.set()
                case eng.LoadFailed(error=error):
                    self._load_error = error
                    self._ready.set()
                case eng.Stopped(error=error):
                    self._crash = error
                    self.engine_active.clear()
                    self._report_cancelled()
                    self._stopped.set()
                    self._notify()

    def _notify(self) -> None:
        activity.report(self, self.alive and bool(self.engine_active))
        self.changed.set()
        self.changed = trio.Event()

    def _route(self, chunk: eng.Chunk) -> None:
        if chunk.finish is not None:
            self.engine_active.pop(chunk.seq_id, None)
            self.finished.append((chunk.seq_id, chunk.finish, chunk.stats))
            if chunk.finish in ("stop", "length"):
                self.served += 1
            self._slot_freed(chunk.seq_id)
            self._notify()
        elif chunk.token_ids and chunk.seq_id in self.engine_active:
            self.engine_active[chunk.seq_id] += len(chunk.token_ids)
        stream = self.streams.get(chunk.seq_id)
        if stream is None:
            return
        try:
            stream.send_nowait(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The requester closed its end: it is gone. Drop the sequence at the next step.
            self.streams.pop(chunk.seq_id, None)
            if chunk.finish is None:
                self._cancel(chunk.seq_id)
            return
        except trio.WouldBlock:  # cannot happen with a budget-sized buffer; fail loudly if it does
            self.streams.pop(chunk.seq_id, None)
            self._cancel(chunk.seq_id)
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
