"""The engine thread: loads one model and runs its continuous-batching step loop for life.

MLX streams belong to the thread that made them, so this one OS thread loads the weights and
runs every step. It knows nothing of trio: commands arrive on a thread-safe queue, and each
step's results leave through one ``deliver`` call (the Runner passes a function that schedules
the batch of events on the trio loop), one cross-thread hop per step rather than per token.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, TypeAlias, cast

import attrs
import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.generate import BatchGenerator, GenerationBatch, StopSequences
from mlx_lm.models.cache import BatchKVCache, LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import greedy_sampler

from ..config import DEFAULT_NUM_PARALLEL, AdmitWindow
from . import sampling, vision
from .constrain import GrammarProcessor, TokenizerCache
from .model import LoadedModel
from .stops import StopMatcher
from .tokenizer import StreamDecoder

if TYPE_CHECKING:
    from mlx_lm.sample_utils import LogitsProcessor, Sampler

log = logging.getLogger("mlxserve.engine")


MIN_LOGPROB = -9999.0  # what JSON can carry for "impossible" (as llama.cpp and OpenAI report it)


# ---- commands (trio side -> engine thread) ----
@attrs.frozen
class Add:
    seq_id: int
    prompt_ids: list[int]
    max_tokens: int
    params: sampling.SamplingParams
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; 0: chosen token only; n: with top-n alternatives
    grammar: str | None = None  # llguidance grammar that every generated token must satisfy
    images: tuple[bytes, ...] = ()  # encoded images for a vision model (engine/vision.py)


@attrs.frozen
class Cancel:
    seq_id: int


@attrs.frozen
class Shutdown:
    pass


# ---- events (engine thread -> trio side) ----
@attrs.frozen
class Ready:
    info: dict[str, Any]


@attrs.frozen
class LoadFailed:
    error: BaseException


@attrs.frozen
class SeqStats:
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    prompt_ns: int
    eval_ns: int


# One generated token's log-probability: (token_id, logprob, ((alt_id, alt_logprob), ...)).
LogprobEntry: TypeAlias = tuple[int, float, tuple[tuple[int, float], ...]]


@attrs.frozen
class Chunk:
    seq_id: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[LogprobEntry, ...] | None = None  # one entry per token in token_ids
    finish: str | None = None  # "stop" | "length" | "cancelled" | "error"
    stats: SeqStats | None = None
    error: str | None = None


@attrs.frozen
class Stopped:
    """The engine thread ended (shutdown or crash); ``error`` is set on a crash."""

    error: str | None = None


Command: TypeAlias = Add | Cancel | Shutdown
Event: TypeAlias = Ready | LoadFailed | Chunk | Stopped


class LayerCache(Protocol):
    """One layer's KV in any of mlx-lm's cache classes; a sequence's cache is a list of them."""

    state: object


class StepSync(Protocol):
    """The seam through which every rank of an mx.distributed group steps in lockstep
    (engine/distributed.py): it decides which commands each step runs."""

    def attach(self, engine: Engine) -> None: ...

    def commands(self, drain: Callable[[bool], list[Command]], block: bool) -> list[Command]: ...


class _Batch(Protocol):
    """What the loop uses of mlx-lm's BatchGenerator, whose methods are unannotated."""

    @property
    def stream(self) -> mx.ThreadLocalStream: ...

    def insert(
        self,
        prompts: list[list[int]],
        max_tokens: list[int] | None = None,
        caches: list[list[LayerCache]] | None = None,
        all_tokens: list[list[int]] | None = None,
        samplers: list[Sampler] | None = None,
        logits_processors: list[list[LogitsProcessor]] | None = None,
        stop_sequences: list[StopSequences] | None = None,
    ) -> list[int]: ...

    def remove(self, uids: list[int]) -> None: ...

    def next(self) -> tuple[list[object], list[GenerationBatch.Response]]: ...

    def close(self) -> None: ...


@attrs.define
class _Seq:
    cmd: Add
    uid: int
    decoder: StreamDecoder
    stops: StopMatcher
    t_start: float
    cached: int = 0
    t_first: float | None = None
    generated: int = 0
    token_ids: list[int] = attrs.Factory(list)


# Set by engine/distributed.py on rank 0 of an mx.distributed group: makes each Engine's step seam.
STEP_SYNC: Callable[[], StepSync] | None = None

_MakeMask: TypeAlias = Callable[..., mx.array | None]


def _unmasked_decode(make_mask: _MakeMask) -> _MakeMask:
    """No mask for a decode step of unpadded rows: mlx-lm's BatchKVCache hands every layer a
    boolean mask anyway, and with one mlx-cuda's attention leaves its one-query kernel
    (benchmarks/results/history-gpu.md). ``left_padding`` changes only when rows join or leave."""

    def wrapped(self: BatchKVCache, N: int, return_array: bool = False, **kwargs: Any) -> mx.array | None:
        padding = cast(list[int], self.left_padding.tolist())  # a 1-D array: a list
        if N == 1 and not return_array and kwargs.get("window_size") is None and not any(padding):
            return None
        return make_mask(self, N, return_array=return_array, **kwargs)

    # Markers: the patch is applied once, and benchmarks/step_profile.py can undo it.
    wrapped.__dict__.update(unmasked_decode=True, __wrapped__=make_mask)
    return wrapped


if not getattr(BatchKVCache.make_mask, "unmasked_decode", False):
    # mlx-lm makes every batch's caches itself, so the patch goes on its class.
    BatchKVCache.make_mask = _unmasked_decode(BatchKVCache.make_mask)  # type: ignore[method-assign]


class _WithLogprobs:
    """A row's sampler, marked: this row reports log-probabilities. Rows whose samplers wrap
    the same one still sample in one call."""

    __slots__ = ("inner",)

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner

    def __call__(self, x: mx.array) -> mx.array:
        return self.inner(x)


class _GenerationBatch(GenerationBatch):
    """mlx-lm's decode step, normalizing the logits (a logsumexp over the vocabulary, then one
    slice per row to evaluate) only when a row reports log-probabilities or samples other than
    greedily (top-p and typical-p need normalized values): greedy argmax ignores a shift."""

    def _step(self) -> Any:  # (tokens, per row: its log-probabilities or None)
        b: Any = self  # mlx-lm types these attributes from their empty initial values
        b._current_tokens = b._next_tokens
        b._current_logprobs = b._next_logprobs
        inputs = b._current_tokens
        logits = b.model(inputs[:, None], cache=b.prompt_cache)[:, -1, :]
        token_context = []
        if any(b.logits_processors):  # as mlx-lm: only rows with processors need a context
            processed = []
            for e in range(len(b.uids)):
                row = logits[e : e + 1]
                if processors := b.logits_processors[e]:
                    context = b._token_context[e].update_and_fetch(inputs[e : e + 1])
                    token_context.append(context)
                    for processor in processors:
                        row = processor(context, row)
                processed.append(row)
            logits = mx.concatenate(processed, axis=0)
        samplers = [b.fallback_sampler if s is None else s for s in (b.samplers or [None] * len(b.uids))]
        wants = [isinstance(s, _WithLogprobs) for s in samplers]
        bases = [s.inner if isinstance(s, _WithLogprobs) else s for s in samplers]
        if any(wants) or any(s is not greedy_sampler for s in bases):
            logits = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if not bases or all(s is bases[0] for s in bases):
            sampled = (bases[0] if bases else b.fallback_sampler)(logits)
        else:
            sampled = mx.concatenate([s(logits[e : e + 1]) for e, s in enumerate(bases)], axis=0)
        b._next_tokens = sampled
        b._next_logprobs = [logits[e] if w else None for e, w in enumerate(wants)]
        mx.async_eval(  # type: ignore[no-untyped-call]
            sampled, [x for x in b._next_logprobs if x is not None], token_context
        )
        # The tokens in flight since the last step: wait for them (see mlx-lm's own step).
        mx.eval(inputs, [x for x in b._current_logprobs if x is not None])
        tokens = cast(list[int], inputs.tolist())
        for sti, ti in zip(b.tokens, tokens):
            sti.append(ti)
        return tokens, b._current_logprobs


class _BatchGenerator(BatchGenerator):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # New rows take their first token in mlx-lm's step, then join this batch.
        self._generation_batch = _GenerationBatch.empty(self.model, self.sampler)


_thread_streams = threading.local()


def thread_stream(device: mx.Device) -> mx.ThreadLocalStream:
    """One MLX stream per OS thread, reused across loads: MLX starts a worker thread for every
    stream and never stops it, so a new stream per load leaks threads on reused hosts."""
    stream: mx.ThreadLocalStream | None = getattr(_thread_streams, "stream", None)
    if stream is None or stream.device != device:
        stream = _thread_streams.stream = mx.new_thread_local_stream(device)
    return stream


def keep_kernels_on_disk() -> None:
    """mlx-cuda compiles kernels with NVRTC on first use (tens of seconds for a model's set) and
    caches them under MLX_PTX_CACHE_DIR, by default in /tmp; ours lasts across reboots. Read
    when the process compiles its first kernel, so it is set before any load."""
    if mx.cuda.is_available():
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        version: str = mx.__version__  # type: ignore[attr-defined]  # set by the extension; its stub omits it
        os.environ.setdefault("MLX_PTX_CACHE_DIR", str(base / "mlxserve" / "mlx-ptx" / version))


def resolve_device(name: str | mx.Device) -> mx.Device | mx.DeviceType:
    """ "cpu" / "gpu" (MLXSERVE_DEVICE) -> an mx.Device; a GPU asked for but absent is an error."""
    if not isinstance(name, str):
        return name
    if name == "gpu":
        if not mx.is_available(mx.gpu):
            raise RuntimeError("MLXSERVE_DEVICE=gpu but no GPU is available to MLX")
        return mx.gpu
    if name == "cpu":
        return mx.cpu
    raise ValueError(f"unknown device '{name}' (cpu or gpu)")


def owned(cache: list[LayerCache]) -> list[LayerCache]:
    """A finished sequence's KV in buffers of its own, exactly as large as the prompt cache counts.

    mlx-lm's ``extract`` returns lazy slices of the batch's KV (every row, rounded up to 256).
    Kept unevaluated, an entry would pin a batch-sized copy of that buffer; evaluated now,
    ``mx.contiguous`` copies the slice out.
    """
    for c in cache:
        c.state = tree_map(lambda x: mx.contiguous(x) if isinstance(x, mx.array) else x, c.state)
    mx.eval([c.state for c in cache])
    return cache


class EngineFaults:
    """The engine's faults, armed by the chaos harness through the one fault seam
    (actors/faults.py): ``step_raise``: the next step raises; ``thread_die``: the thread exits."""

    def __init__(self) -> None:
        self.armed: set[str] = set()

    def take(self, name: str) -> bool:
        if name in self.armed:
            self.armed.discard(name)
            return True
        return False


class Engine:
    def __init__(
        self,
        load: Callable[[], LoadedModel],
        deliver: Callable[[list[Event]], None],
        *,
        num_parallel: int = DEFAULT_NUM_PARALLEL,
        prefill_chunk: int = 256,
        device: str | mx.Device | None = None,
        prompt_cache_bytes: int = 0,
        warm_up: bool | None = None,
        admit: AdmitWindow = AdmitWindow(),
        sync: StepSync | None = None,
    ) -> None:
        self._load = load
        self._warm_up = warm_up  # None: on GPUs only
        self._deliver = deliver
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._num_parallel = num_parallel
        self._admit = admit
        self._prefill_chunk = prefill_chunk
        self._device = device
        self.faults = EngineFaults()
        self.lm: LoadedModel | None = None
        self.warm_up_s: float | None = None  # how long the load's warm-up took (None: none ran)
        self.warm_batch_sizes: list[int] = []  # the decode batch sizes the warm-up stepped through
        self._lltok = TokenizerCache()
        # KV of finished sequences keyed by their tokens: a later prompt sharing a prefix (a
        # system prompt, an earlier turn) resumes from it instead of prefilling again.
        self._prefix = LRUPromptCache(max_size=64, max_bytes=prompt_cache_bytes) if prompt_cache_bytes > 0 else None
        # On an mx.distributed group every rank steps in lockstep through this seam: rank 0
        # sends the commands it drained each step, the followers run on them (engine/distributed.py).
        self._sync = sync if sync is not None else STEP_SYNC() if STEP_SYNC is not None else None
        if self._sync is not None:
            self._sync.attach(self)

    # -- called from any thread --
    def submit(self, cmd: Command) -> None:
        self._commands.put(cmd)

    # -- the thread body --
    def run(self) -> None:
        try:
            if self._device is not None:
                mx.set_default_device(resolve_device(self._device))
            stream = thread_stream(mx.default_device())
            keep_kernels_on_disk()
            with mx.stream(stream):
                self.lm = self._load()
                warm = stream.device.type == mx.gpu if self._warm_up is None else self._warm_up
                if warm:
                    self._warm(self.lm, stream)
        except BaseException as exc:  # every load failure must reach the waiting requests
            log.debug("load failed: %s", traceback.format_exc())
            self._deliver([LoadFailed(exc)])
            return
        lm = self.lm
        self._deliver(
            [
                Ready(
                    {
                        "weight_bytes": lm.weight_bytes,
                        "context_length": lm.context_length,
                        "device": mx.default_device().type.name,
                        "warm_up_s": self.warm_up_s,
                    }
                )
            ]
        )
        error = None
        try:
            self._loop(lm, stream)
        except BaseException as exc:  # a crash ends the runner; the Scheduler restarts it
            error = f"engine crashed: {exc.__class__.__name__}: {exc}"
            log.error("%s\n%s", error, traceback.format_exc())
        self._deliver([Stopped(error)])

    def _new_generator(self, lm: LoadedModel, stream: mx.ThreadLocalStream) -> _Batch:
        return _BatchGenerator(
            lm.model,
            stop_tokens=[[i] for i in lm.tokenizer.eos_token_ids],
            completion_batch_size=self._num_parallel,
            prefill_batch_size=self._num_parallel,
            prefill_step_size=self._prefill_chunk,
            stream=stream,
        )

    def _loop(self, lm: LoadedModel, stream: mx.ThreadLocalStream) -> None:
        gen = self._new_generator(lm, stream)
        seqs: dict[int, _Seq] = {}  # by BatchGenerator uid
        by_id: dict[int, int] = {}  # seq_id -> uid
        while True:
            out: list[Event] = []
            busy = bool(seqs)
            cmds = self._drain(block=not busy) if self._sync is None else self._sync.commands(self._drain, not busy)
            for cmd in cmds:
                match cmd:
                    case Shutdown():
                        for s in seqs.values():
                            out.append(self._finish(s, "cancelled", ""))
                        self._deliver(out)
                        return
                    case Cancel(seq_id=sid):
                        uid = by_id.pop(sid, None)
                        if uid is not None:
                            gen.remove([uid])
                            out.append(self._finish(seqs.pop(uid), "cancelled", ""))
                    case Add():
                        self._add(lm, gen, cmd, seqs, by_id, out)
            if log.isEnabledFor(logging.DEBUG) and (added := sum(isinstance(c, Add) for c in cmds)):
                log.debug("admitted %d, %d active", added, len(seqs))
            if out and seqs:  # report cancellations now, not after one more step
                self._deliver(out)
                out = []
            if seqs:
                gen = self._step(lm, stream, gen, seqs, by_id, out)
            if out:
                self._deliver(out)
            if busy and not seqs:
                # Idle now: MLX keeps every freed buffer for reuse, so the process would stay at
                # the peak of the last burst's scratch memory until the next one.
                mx.clear_cache()

    def _add(
        self,
        lm: LoadedModel,
        gen: _Batch,
        cmd: Add,
        seqs: dict[int, _Seq],
        by_id: dict[int, int],
        out: list[Event],
    ) -> None:
        """Its own frame so that the reused prefix KV is not held past the call (see ``_step``)."""
        t_start = time.perf_counter()
        cache: list[LayerCache] | None
        try:
            processors = self._processors(lm, cmd)
            sampler = sampling.make_sampler(cmd.params)
            if cmd.logprobs is not None:
                sampler = _WithLogprobs(sampler)
            if cmd.images:  # vision tower and prefill here; the batch goes on from that KV
                cache, ids = vision.prefill(lm, cmd.prompt_ids, cmd.images, self._prefill_chunk, gen.stream)
                cmd = attrs.evolve(cmd, prompt_ids=ids, max_tokens=min(cmd.max_tokens, lm.context_length - len(ids)))
        except Exception as exc:  # bad settings fail that request only, never the runner
            out.append(
                Chunk(
                    cmd.seq_id, "", (), finish="error", error=str(exc), stats=SeqStats(len(cmd.prompt_ids), 0, 0, 0, 0)
                )
            )
            return
        if cmd.images:
            rest, cached, reused = cmd.prompt_ids[-1:], 0, len(cmd.prompt_ids) - 1
        else:
            cache, rest = self._cached_prefix(cmd.prompt_ids)
            cached = reused = len(cmd.prompt_ids) - len(rest)
        uid = gen.insert(
            [rest],
            max_tokens=[cmd.max_tokens],
            caches=[cache] if cache is not None else None,
            all_tokens=[cmd.prompt_ids[:reused]],
            samplers=[sampler],
            logits_processors=[processors],
        )[0]
        seqs[uid] = _Seq(cmd, uid, StreamDecoder(lm.tokenizer), StopMatcher(cmd.stop), t_start, cached)
        by_id[cmd.seq_id] = uid

    def _step(
        self,
        lm: LoadedModel,
        stream: mx.ThreadLocalStream,
        gen: _Batch,
        seqs: dict[int, _Seq],
        by_id: dict[int, int],
        out: list[Event],
    ) -> _Batch:
        """One batch step; returns the generator to go on with (a new one after a failed step).
        Its own frame so that the step's responses, whose finished rows carry lazy slices of the
        whole batch's KV, are gone when it returns, not held while the engine waits idle."""
        if self.faults.take("thread_die"):
            raise RuntimeError("injected fault: engine thread died")
        try:
            if self.faults.take("step_raise"):
                raise RuntimeError("injected fault: step raised")
            _, responses = gen.next()
        except Exception as exc:
            # One bad step fails the sequences in it, not the runner: start a clean batch.
            log.error("step failed: %s\n%s", exc, traceback.format_exc())
            for failed in seqs.values():
                out.append(self._finish(failed, "error", "", error=f"generation failed: {exc}"))
            seqs.clear()
            by_id.clear()
            gen = self._new_generator(lm, stream)
            # An exception inside a compiled sampler leaves this thread's random state
            # unusable for every later request; a reseed repairs it.
            mx.random.seed(int(time.time_ns() % (1 << 63)))
            responses = []
        for r in responses:
            s = seqs.get(r.uid)
            if s is None:
                continue
            chunk = self._on_token(lm, s, r)
            # Image tokens are alike whatever the image: a vision prompt's KV is no prefix to reuse.
            if (
                r.finish_reason is not None
                and r.prompt_cache is not None
                and r.all_tokens is not None  # set with prompt_cache, on a finished row
                and self._prefix is not None
                and not s.cmd.images
            ):
                self._prefix.insert_cache("m", list(r.all_tokens), owned(r.prompt_cache))
            if chunk.finish is not None:
                seqs.pop(r.uid, None)
                by_id.pop(s.cmd.seq_id, None)
                if r.finish_reason is None:  # a stop string ended it, not the batch
                    gen.remove([r.uid])
            out.append(chunk)
        return gen

    def _warm(self, lm: LoadedModel, stream: mx.ThreadLocalStream) -> None:
        """Run every kind of step once before the model is reported ready: mlx-cuda compiles each
        kernel with NVRTC the first time a process meets it, a cost that belongs to the load, not
        to somebody's first request. Two rows, both through the logprob path: greedy, and seeded
        top-k/top-p/min-p sampling with penalties under a JSON grammar."""
        from .constrain import ANY_JSON_OBJECT, grammar_for_schema

        t0 = time.perf_counter()
        prompt = [lm.tokenizer.eos_token_ids[0] if lm.tokenizer.eos_token_ids else 0] * 4
        rows = [
            Add(-1, prompt, 2, sampling.SamplingParams(temperature=0)),
            Add(
                -2,
                prompt,
                2,
                sampling.SamplingParams(
                    temperature=0.7, min_p=0.05, seed=1, presence_penalty=0.1, frequency_penalty=0.1
                ),
            ),
        ]
        try:  # not every tokenizer can drive a grammar; such a model simply warms up without one
            constrained = attrs.evolve(rows[1], grammar=grammar_for_schema(ANY_JSON_OBJECT))
            processors = [self._processors(lm, rows[0]), self._processors(lm, constrained)]
        except Exception as exc:
            log.debug("warm-up without a grammar: %s", exc)
            processors = [self._processors(lm, r) for r in rows]
        gen = self._new_generator(lm, stream)
        try:  # a warm-up is an optimisation: it never fails the load
            gen.insert(
                [r.prompt_ids for r in rows],
                max_tokens=[r.max_tokens for r in rows],
                samplers=[_WithLogprobs(sampling.make_sampler(r.params)) for r in rows],
                logits_processors=processors,
            )
            done = 0
            while done < len(rows):
                _, responses = gen.next()
                for r in responses:
                    if r.logprobs is not None:
                        self._logprob_entry(r.logprobs, int(r.token), 2)
                    done += r.finish_reason is not None
            self._warm_batches(lm, stream)
        except Exception as exc:
            log.warning("warm-up failed (requests will compile kernels on first use): %s", exc)
        finally:
            gen.close()
        self.warm_up_s = time.perf_counter() - t0
        log.info(
            "warm-up steps on %s (decode batches %s): %.2f s",
            stream.device,
            f"{min(self.warm_batch_sizes)}-{max(self.warm_batch_sizes)}" if self.warm_batch_sizes else "none",
            self.warm_up_s,
        )

    def _warm_batches(self, lm: LoadedModel, stream: mx.ThreadLocalStream) -> None:
        """mlx-cuda picks its product kernels by row count (engine/cuda/linear.py) and compiles each
        on first use: one greedy batch of every slot, prompts of one prefill chunk and more (as a
        burst of arrivals prefills, padding included), whose rows end one step apart, so decoding
        passes through every batch size from all slots down to one."""
        n = self._num_parallel
        vocab = int(lm.config.get("vocab_size") or lm.tokenizer.vocab_size)
        prompts = [[(7919 * i + 104729 * j) % vocab for j in range(self._prefill_chunk + 2 + i)] for i in range(n)]
        gen = self._new_generator(lm, stream)
        try:
            gen.insert(
                prompts,
                max_tokens=list(range(1, n + 1)),  # no stop token ends a row early
                samplers=[sampling.make_sampler(sampling.SamplingParams(temperature=0))] * n,
                stop_sequences=[StopSequences()] * n,
            )
            done = 0
            while done < n:
                _, responses = gen.next()
                if responses:
                    self.warm_batch_sizes.append(len(responses))
                done += sum(r.finish_reason is not None for r in responses)
        finally:
            gen.close()

    def _processors(self, lm: LoadedModel, cmd: Add) -> list[LogitsProcessor]:
        processors = sampling.make_processors(cmd.params)
        if cmd.grammar is not None:
            vocab = int(lm.config.get("vocab_size") or lm.tokenizer.vocab_size)
            processors.append(GrammarProcessor(self._lltok.get(lm.tokenizer, vocab), cmd.grammar, vocab))
        return processors

    def _cached_prefix(self, prompt: list[int]) -> tuple[list[LayerCache] | None, list[int]]:
        if self._prefix is None or len(prompt) < 2:
            return None, prompt
        cache, rest = self._prefix.fetch_nearest_cache("m", prompt)
        if cache is None:
            return None, prompt
        if not rest:  # an exact hit: the last token must still run to produce logits
            if not can_trim_prompt_cache(cache):
                return None, prompt
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        return cache, rest

    def _drain(self, block: bool) -> list[Command]:
        cmds: list[Command] = []
        if block:  # idle: collect a burst (see AdmitWindow)
            w = self._admit
            cmds.append(self._commands.get())
            adds = 1
            deadline = time.monotonic() + w.max_s
            while isinstance(cmds[-1], Add) and adds < self._num_parallel and (left := deadline - time.monotonic()) > 0:
                try:
                    cmds.append(self._commands.get(timeout=min(w.first_gap_s if adds == 1 else w.gap_s, left)))
                except queue.Empty:
                    break
                adds += isinstance(cmds[-1], Add)
            if adds > 1:
                log.debug("collected %d requests in %.1f ms", adds, (time.monotonic() - deadline + w.max_s) * 1e3)
        while True:
            try:
                cmds.append(self._commands.get_nowait())
            except queue.Empty:
                return cmds

    def _on_token(self, lm: LoadedModel, s: _Seq, r: GenerationBatch.Response) -> Chunk:
        now = time.perf_counter()
        if s.t_first is None:
            s.t_first = now
        token = int(r.token)
        is_eos = r.finish_reason == "stop" and token in lm.tokenizer.eos_token_ids
        logprobs = None
        if not is_eos:
            s.generated += 1
            s.token_ids.append(token)
            if s.cmd.logprobs is not None:
                logprobs = (self._logprob_entry(r.logprobs, token, s.cmd.logprobs),)
        text = "" if is_eos else s.decoder.add(token)
        text, matched = s.stops.feed(text)
        finish = "stop" if matched else r.finish_reason
        if finish is not None and not matched:
            tail, _ = s.stops.feed(s.decoder.flush())
            text += tail + s.stops.flush()
        if finish is None:
            return Chunk(s.cmd.seq_id, text, () if is_eos else (token,), logprobs)
        return self._finish(s, finish, text, token_ids=() if is_eos else (token,), logprobs=logprobs)

    @staticmethod
    def _logprob_entry(row: mx.array, token: int, top: int) -> LogprobEntry:
        alts: tuple[tuple[int, float], ...] = ()
        if top > 0:
            idx = mx.argpartition(-row, kth=top - 1)[:top]
            vals = row[idx]
            order = mx.argsort(-vals)
            # Tokens a grammar or filter ruled out have -inf: they are no alternative at all.
            ids = cast(list[int], idx[order].tolist())  # 1-D arrays: lists
            logprobs = cast(list[float], vals[order].tolist())
            alts = tuple((i, v) for i, v in zip(ids, logprobs) if math.isfinite(v))
        chosen = cast(float, row[token].item())
        return (token, chosen if math.isfinite(chosen) else MIN_LOGPROB, alts)

    @staticmethod
    def _finish(
        s: _Seq,
        finish: str,
        text: str,
        *,
        token_ids: tuple[int, ...] = (),
        logprobs: tuple[LogprobEntry, ...] | None = None,
        error: str | None = None,
    ) -> Chunk:
        now = time.perf_counter()
        first = s.t_first or now
        stats = SeqStats(
            prompt_tokens=len(s.cmd.prompt_ids),
            cached_tokens=s.cached,
            generated_tokens=s.generated,
            prompt_ns=int((first - s.t_start) * 1e9),
            eval_ns=int((now - first) * 1e9),
        )
        return Chunk(s.cmd.seq_id, text, tuple(token_ids), logprobs, finish, stats, error)
