"""Embeddings: pooled embeddings from decoder (mlx-lm) models, and the embedder thread.

A decoder's embedding is the mean of its last hidden state (after the final norm) over the
input's tokens, L2-normalised. Inputs are batched right-padded: under a causal mask no real
token attends to a pad that follows it, so padding does not change any real token's state.
Long inputs run in column chunks over a KV cache, as generation's prefill does: memory stays
bounded (attention is chunk x context, not context x context) and, between chunks, the engine
can drop work whose callers have gone or stop for a shutdown.

Like every model, an embedder must be loaded and run on one thread (MLX streams are per thread).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

import attrs
import mlx.core as mx
import numpy as np

from ..errors import EngineError, LoadError, MlxserveError, ShuttingDown
from .embedinputs import (
    EmbedInput,
    KeepGoing,
    Tokenized,
    batch_groups,
    mean_pool,
    normalize_rows,
    padded,
    reduce_dimensions,
    tokenize_all,
)
from .loop import thread_stream

log = logging.getLogger("mlxserve.embed")

MAX_BATCH_TOKENS = 4096
DEFAULT_CHUNK = 256  # tokens per row per forward pass (MLXSERVE_PREFILL_CHUNK, as generation's)
# While a model generates, an embedding waits between chunks up to this many times its last
# chunk's time: computing alongside a decode slows the decode far more than a fair share, and
# the embedding still gets a quarter of the time.
GIVE_WAY = 3


class DecoderEmbedder:
    """Mean-pooled, normalised last hidden states of an mlx-lm decoder model."""

    kind = "decoder"

    def __init__(self, lm):  # lm: mlxserve.engine.model.LoadedModel
        backbone = getattr(lm.model, "model", None)
        if backbone is None or not callable(backbone):
            raise LoadError(
                f"model type '{lm.config.get('model_type')}' has no hidden-state "
                "backbone (model.model) to pool embeddings from"
            )
        self.lm = lm
        self.backbone = backbone
        self.weight_bytes = lm.weight_bytes
        self.context_length = lm.context_length
        self.dimension = int(lm.config.get("hidden_size") or 0)
        tok = lm.tokenizer
        self._prefix = [tok.bos_token_id] if tok.add_bos and tok.bos_token_id is not None else []

    @classmethod
    def load(cls, path: str | Path, *, weight_dtype: str | None = None) -> DecoderEmbedder:
        from .model import load_path

        return cls(load_path(path, weight_dtype=weight_dtype))

    def tokenize(
        self, inputs: Sequence[EmbedInput], *, truncate: bool = True, limit: int | None = None
    ) -> list[Tokenized]:
        """``limit`` (num_ctx) caps the model's context length for this request."""
        max_len = min(limit, self.context_length) if limit else self.context_length
        tok = self.lm.tokenizer
        return tokenize_all(
            inputs,
            lambda text: tok.encode(text, add_bos=False),
            self._prefix,
            [],
            max_len,
            truncate=truncate,
            vocab_size=tok.vocab_size,
        )

    def hidden_states(self, ids: mx.array) -> mx.array:
        return self.backbone(ids)

    def embed_ids(
        self,
        seqs: Sequence[Sequence[int]],
        *,
        dimensions: int | None = None,
        chunk: int | Callable[[], int] = DEFAULT_CHUNK,
        keep_going: KeepGoing | None = None,
    ) -> np.ndarray:
        """(N, D) vectors in input order. A group wider than ``chunk`` runs ``chunk`` columns at
        a time over a KV cache (a callable ``chunk`` is asked before each one); rows of a group
        that ``keep_going`` drops stay zero."""
        chunk_now = chunk if callable(chunk) else (lambda: chunk)
        out: np.ndarray | None = None
        for idx in batch_groups([len(s) for s in seqs], MAX_BATCH_TOKENS):
            if keep_going is not None and not keep_going(idx):
                continue
            ids, mask = padded(seqs, idx)
            vecs = self._pooled(ids, mask, chunk_now, lambda idx=idx: keep_going is None or keep_going(idx))
            if vecs is None:
                continue
            got = np.array(vecs, dtype=np.float32)
            if out is None:
                out = np.zeros((len(seqs), got.shape[-1]), dtype=np.float32)
            out[idx] = got
        if out is None:
            out = np.zeros((len(seqs), self.dimension), dtype=np.float32)
        return reduce_dimensions(out, dimensions)

    def _pooled(
        self, ids: mx.array, mask: mx.array, chunk: Callable[[], int], keep_going: Callable[[], bool]
    ) -> mx.array | None:
        if ids.shape[1] <= chunk():
            vecs = normalize_rows(mean_pool(self.hidden_states(ids), mask))
            mx.eval(vecs)
            return vecs
        try:
            return self._pooled_in_chunks(ids, mask, chunk, keep_going)
        finally:
            # The KV cache (up to a context of K and V per row) is garbage now; MLX's buffer
            # cache would keep its memory after the request.
            mx.clear_cache()

    def _pooled_in_chunks(
        self, ids: mx.array, mask: mx.array, chunk: Callable[[], int], keep_going: Callable[[], bool]
    ) -> mx.array | None:
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.lm.model)
        m = mask.astype(mx.float32)
        width = ids.shape[1]
        total = None
        start = 0
        while start < width:
            end = start + max(1, chunk())
            h = self.backbone(ids[:, start:end], cache=cache).astype(mx.float32)
            part = (h * m[:, start:end, None]).sum(axis=1)
            total = part if total is None else total + part
            mx.eval(total, [c.state for c in cache])
            start = end
            if start < width and not keep_going():
                return None
        vecs = normalize_rows(total / mx.maximum(m.sum(axis=1, keepdims=True), 1e-9))
        mx.eval(vecs)
        return vecs

    def embed(
        self, inputs: Sequence[EmbedInput], *, truncate: bool = True, dimensions: int | None = None
    ) -> np.ndarray:
        return self.embed_ids([t.ids for t in self.tokenize(inputs, truncate=truncate)], dimensions=dimensions)


def load_embedder(path: str | Path, kind: str, *, weight_dtype: str | None = None):
    """``kind`` "bert": a sentence encoder directory; "decoder": any model mlx-lm can load."""
    if kind == "bert":
        from .bert import BertEmbedder

        if not Path(path).is_dir():
            raise LoadError("BERT embedding models are supported as safetensors directories only (not GGUF)")
        return BertEmbedder.load(path)
    if kind == "decoder":
        return DecoderEmbedder.load(path, weight_dtype=weight_dtype)
    raise LoadError(f"unknown embedder kind '{kind}'")


# ---- the embedder thread: commands in on a queue, results out through one callback ----
@attrs.define(eq=False)
class EmbedJob:
    """One request's inputs. ``tag`` is the caller's; ``cancelled`` may be set from any thread."""

    inputs: tuple
    truncate: bool = True
    dimensions: int | None = None
    limit: int | None = None  # num_ctx: caps the context length for this request
    tag: object = None
    cancelled: bool = False
    tokens: list[Tokenized] | None = None  # already tokenized by the owner, or None


@attrs.frozen
class EmbedShutdown:
    reason: str = "model was unloaded"
    # True (the server is stopping): the batch in progress is dropped at its next chunk and its
    # jobs fail; False (unload, expiry): it finishes first.
    now: bool = False


@attrs.frozen
class Loaded:
    info: dict


@attrs.frozen
class EmbedLoadFailed:
    error: BaseException


@attrs.frozen
class JobDone:
    job: EmbedJob
    vectors: np.ndarray | None  # (N, D) float32; None when the job failed or was cancelled
    token_counts: tuple[int, ...] = ()
    error: BaseException | None = None
    compute_ns: int = 0
    cancelled: bool = False  # dropped because its caller had gone


@attrs.frozen
class BatchStarted:
    jobs: tuple[EmbedJob, ...]  # the jobs whose inputs go to the model now


@attrs.frozen
class Step:
    """One checkpoint of a running batch (before each group, after each chunk)."""


@attrs.frozen
class EmbedStopped:
    error: str | None = None


class EmbedEngine:
    """The body of one embedding model's thread: load, then serve batches until shut down.

    Every job taken off the queue is answered exactly once (a ``JobDone``), cancelled or not,
    so the owner's accounting of jobs in flight stays exact. Jobs that arrive while a batch
    runs wait on the queue and are drained together into the next one.
    """

    def __init__(
        self,
        load: Callable[[], object],
        deliver: Callable[[list], None],
        *,
        device: str | None = None,
        max_batch_inputs: int = 256,
        chunk: int = DEFAULT_CHUNK,
        generation_idle: threading.Event | None = None,
    ):
        self._load = load
        self._deliver = deliver
        self._device = device
        self._max_inputs = max_batch_inputs
        self._chunk = chunk
        self._generation_idle = generation_idle  # set while no model generates
        self._since = 0.0  # when the last chunk started
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop_now: str | None = None  # set from the owner's thread; read between chunks
        self.model = None

    def submit(self, item: EmbedJob | EmbedShutdown) -> None:
        if isinstance(item, EmbedShutdown) and item.now:
            self._stop_now = item.reason
        self._queue.put(item)

    def run(self) -> None:
        try:
            if self._device in ("cpu", "gpu"):
                mx.set_default_device(mx.cpu if self._device == "cpu" else mx.gpu)
            stream = thread_stream(mx.default_device())
            t0 = time.perf_counter_ns()
            with mx.stream(stream):
                self.model = self._load()
            load_ns = time.perf_counter_ns() - t0
        except BaseException as exc:  # noqa: BLE001 - every load failure must reach the waiters
            log.debug("embedder load failed: %s", traceback.format_exc())
            err = exc if isinstance(exc, MlxserveError) else LoadError(f"model failed to load: {exc}")
            self._deliver([EmbedLoadFailed(err)])
            self._drain_after_stop("model failed to load", err)
            return
        m = self.model
        self._deliver(
            [
                Loaded(
                    {
                        "load_ns": load_ns,
                        "weight_bytes": m.weight_bytes,
                        "dimension": m.dimension,
                        "context_length": m.context_length,
                        "device": stream.device.type.name,
                    }
                )
            ]
        )
        error = None
        try:
            with mx.stream(stream):
                self._loop(m)
        except BaseException as exc:  # noqa: BLE001
            error = f"embedder crashed: {exc.__class__.__name__}: {exc}"
            log.error("%s\n%s", error, traceback.format_exc())
        self._drain_after_stop(error or "model was unloaded", None)
        # The worker record outlives this thread (until the next unload's bookkeeping): it must
        # not keep the weights in memory.
        self.model = m = None
        self._deliver([EmbedStopped(error)])

    def _drain_after_stop(self, reason: str, error: BaseException | None) -> None:
        out = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, EmbedJob):
                out.append(JobDone(item, None, error=error or EngineError(reason)))
        if out:
            self._deliver(out)

    def _loop(self, m) -> None:
        while True:
            batch: list[EmbedJob] = []
            stop: EmbedShutdown | None = None
            item = self._queue.get()
            n_inputs = 0
            while True:
                if isinstance(item, EmbedShutdown):
                    stop = item
                    break
                batch.append(item)
                n_inputs += len(item.inputs)
                if n_inputs >= self._max_inputs:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._deliver(self._run_batch(m, batch))
            if stop is not None:
                return

    def _run_batch(self, m, batch: list[EmbedJob]) -> list[JobDone]:
        t0 = time.perf_counter_ns()
        out: list[JobDone] = []
        live: list[tuple[EmbedJob, list[list[int]]]] = []
        for job in batch:
            if job.cancelled or self._stop_now is not None:
                out.append(self._dropped(job))
                continue
            try:
                tokens = (
                    job.tokens
                    if job.tokens is not None
                    else m.tokenize(job.inputs, truncate=job.truncate, limit=job.limit)
                )
                live.append((job, [t.ids for t in tokens]))
            except Exception as exc:  # bad input fails its own request, not the batch
                out.append(JobDone(job, None, error=exc))
        if out:  # refused and dropped jobs need not wait for the others' vectors
            self._deliver(out)
            out = []
        seqs = [ids for _, job_ids in live for ids in job_ids]
        owners = [job for job, job_ids in live for _ in job_ids]

        def keep_going(rows) -> bool:
            # A group goes on while the server runs and one of its rows' callers still waits.
            self._deliver([Step()])
            wanted = lambda: self._stop_now is None and not all(owners[r].cancelled for r in rows)  # noqa: E731
            self._give_way(wanted)
            return wanted()

        self._since = time.perf_counter()
        if live:
            self._deliver([BatchStarted(tuple(job for job, _ in live))])
        try:
            vectors = (
                m.embed_ids(seqs, chunk=self._chunk_now, keep_going=keep_going)
                if seqs
                else np.zeros((0, m.dimension), np.float32)
            )
        except Exception as exc:  # noqa: BLE001
            log.error("embedding batch failed: %s\n%s", exc, traceback.format_exc())
            err = EngineError(f"embedding failed: {exc.__class__.__name__}: {exc}")
            return out + [JobDone(job, None, error=err) for job, _ in live]
        ns = time.perf_counter_ns() - t0
        row = 0
        for job, job_ids in live:
            mine = vectors[row : row + len(job_ids)]
            row += len(job_ids)
            if job.cancelled or self._stop_now is not None:  # its rows may not have been computed
                out.append(self._dropped(job))
                continue
            try:
                mine = reduce_dimensions(mine, job.dimensions)
            except Exception as exc:
                out.append(JobDone(job, None, error=exc))
                continue
            out.append(JobDone(job, mine, tuple(len(i) for i in job_ids), compute_ns=ns))
        return out

    def _chunk_now(self) -> int:
        # Smaller chunks while a model generates: its steps wait for no more than one of them.
        idle = self._generation_idle
        if idle is None or idle.is_set():
            return self._chunk
        return max(16, self._chunk // 8)

    def _give_way(self, wanted: Callable[[], bool]) -> None:
        idle = self._generation_idle
        if idle is not None and not idle.is_set():
            until = time.perf_counter() + GIVE_WAY * (time.perf_counter() - self._since)
            # In slices, so that a shutdown or a caller that leaves is seen meanwhile.
            while wanted() and not idle.is_set() and (left := until - time.perf_counter()) > 0:
                idle.wait(min(left, 0.05))
        self._since = time.perf_counter()

    def _dropped(self, job: EmbedJob) -> JobDone:
        if self._stop_now is not None:  # only the daemon's own stop is immediate: 503, not 500
            return JobDone(job, None, error=ShuttingDown(self._stop_now))
        return JobDone(job, None, error=EngineError("cancelled"), cancelled=True)
