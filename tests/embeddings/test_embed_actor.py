"""The Embedder with an injected model (no MLX) under a real Scheduler: batching, keep-alive
(the Scheduler's), failures.

The worker threads are real, so these tests use a MockClock running at real speed (jumped by
hand to reach keep-alive deadlines) rather than the autojump clock, which would jump to a
deadline while a thread is busy.
"""

from __future__ import annotations

import threading
import time
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import trio
import trio.testing

from mlxserve.actors.embedder import Embedder, EmbedRequest
from mlxserve.actors.loader import model_loader
from mlxserve.actors.scheduler import Scheduler
from mlxserve.config import Settings
from mlxserve.engine.embedinputs import Tokenized
from mlxserve.errors import BadRequest, LoadError, MlxserveError, ShuttingDown
from mlxserve.specs.modelspec import ModelSpec


class FakeModel:
    """Vector of an input = (its length, 1, 0, 0); records the size of every batch."""

    dimension = 4
    weight_bytes = 16
    context_length = 32

    def __init__(self, log: dict):
        self.log = log

    def tokenize(self, inputs, *, truncate=True, limit=None):
        if "BAD" in inputs:
            raise BadRequest("bad input")
        return [Tokenized([7] * len(s)) for s in inputs]

    def embed_ids(self, seqs, *, dimensions=None, chunk=None, keep_going=None):
        self.log["batches"].append(len(seqs))
        self.log["started"].set()
        assert self.log["gate"].wait(10)
        return np.array([[len(s), 1, 0, 0] for s in seqs], dtype=np.float32).reshape(-1, 4)


class FakeStore:
    async def load_path(self, resolved):
        return f"/models/{resolved.display}"


def _model(name: str, caps=("embedding",)):
    spec = ModelSpec(format="safetensors", capabilities=list(caps))
    return SimpleNamespace(digest=f"sha256:{name}", display=f"{name}:latest", size=1000, spec=spec)


@pytest.fixture
def clock():
    return trio.testing.MockClock(rate=1.0)


@pytest.fixture
def log():
    gate = threading.Event()
    gate.set()
    return {"batches": [], "loads": [], "gate": gate, "started": threading.Event(), "models": []}


def _fake_loader(log: dict):
    def load_fn(resolved, path, kind):
        def load():
            log["loads"].append((resolved.display, kind, path))
            if resolved.display.startswith("broken"):
                raise RuntimeError("no weights")
            model = FakeModel(log)
            log["models"].append(weakref.ref(model))
            return model

        return load

    return load_fn


async def _start(embedder: Embedder, settings: Settings, runners: trio.Nursery) -> None:
    embedder.scheduler = await runners.start(
        Scheduler(load_fn=model_loader(settings, FakeStore(), runners, None, embedder), max_loaded=1).run
    )


@pytest.fixture
async def embedder(log, tmp_path):
    settings = Settings(models_dir=tmp_path, max_loaded_models=1)
    embedder = Embedder(settings, load_fn=_fake_loader(log))
    async with trio.open_nursery() as runners:
        await _start(embedder, settings, runners)
        yield embedder
        runners.cancel_scope.cancel()


async def test_requests_that_arrive_together_share_a_batch(embedder, log):
    m = _model("e")
    results: dict[int, object] = {}
    log["gate"].clear()

    async def one(i: int, inputs: tuple):
        try:
            results[i] = await embedder.embed(m, EmbedRequest(inputs), 60)
        except BadRequest as exc:
            results[i] = exc

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(one, 0, ("a",))
            await trio.to_thread.run_sync(log["started"].wait)  # the first batch is running
            n.start_soon(one, 1, ("bb", "ccc"))
            n.start_soon(one, 2, ("dddd",))
            n.start_soon(one, 3, ("BAD",))  # fails alone; its neighbours are served
            await trio.testing.wait_all_tasks_blocked()
            log["gate"].set()
    assert log["batches"] == [1, 3]  # requests 1 and 2 (3 inputs) in one pass
    assert results[1].vectors[:, 0].tolist() == [2, 3] and results[2].vectors[:, 0].tolist() == [4]
    assert results[1].token_counts == (2, 3) and results[1].prompt_tokens == 5
    assert isinstance(results[3], BadRequest)


async def test_a_cancelled_request_is_skipped_by_the_thread(embedder, log):
    m = _model("e")
    log["gate"].clear()
    leaver = trio.CancelScope()

    async def leaving():
        with leaver:  # a client that disconnects while its request is queued
            await embedder.embed(m, EmbedRequest(("bb",)), 60)

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(embedder.embed, m, EmbedRequest(("a",)), 60)
            await trio.to_thread.run_sync(log["started"].wait)  # the first batch is running
            n.start_soon(leaving)
            await trio.testing.wait_all_tasks_blocked()  # queued behind it
            leaver.cancel()
            await trio.testing.wait_all_tasks_blocked()
            log["gate"].set()
        # The queue is FIFO: once a later request is answered, the cancelled one was handled.
        await embedder.embed(m, EmbedRequest(("ccc",)), 60)
    assert log["batches"] == [1, 1]  # "bb" never reached the model
    assert embedder.statistics().active == 0


async def test_a_request_in_flight_when_the_runtime_ends_is_told_503(log, tmp_path):
    """The runtime cancelled (SIGTERM without a drain) fails what the thread holds with 503 (the
    daemon stops; a balancer retries elsewhere), not 500."""
    settings = Settings(models_dir=tmp_path, max_loaded_models=1)
    embedder = Embedder(settings, load_fn=_fake_loader(log))
    log["gate"].clear()
    told: list[Exception] = []

    async def request():
        try:
            await embedder.embed(_model("e"), EmbedRequest(("a",)), 60)
        except MlxserveError as exc:
            told.append(exc)
        log["gate"].set()  # lets the thread finish its batch and exit

    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            async with trio.open_nursery() as runners:
                await _start(embedder, settings, runners)
                clients.start_soon(request)
                await trio.to_thread.run_sync(log["started"].wait)  # the batch is in the thread
                runners.cancel_scope.cancel()
    assert len(told) == 1 and isinstance(told[0], ShuttingDown) and told[0].status == 503


async def test_bad_input_fails_only_its_request(embedder):
    with trio.fail_after(10):
        with pytest.raises(BadRequest, match="bad input"):
            await embedder.embed(_model("e"), EmbedRequest(("BAD",)), 60)
        ok = await embedder.embed(_model("e"), EmbedRequest(("xy",)), 60)
    assert ok.vectors.shape == (1, 4)


async def test_first_request_reports_load_time_then_not(embedder, log):
    with trio.fail_after(10):
        first = await embedder.embed(_model("e"), EmbedRequest(("a",)), 60)
        second = await embedder.embed(_model("e"), EmbedRequest(("a",)), 60)
    assert first.load_ns > 0 and second.load_ns == 0
    assert log["loads"] == [("e:latest", "bert", "/models/e:latest")]


async def test_keep_alive_expiry_and_zero(embedder, log, clock):
    # Each fail_after covers only real waiting: the clock jumps happen outside them.
    m = _model("e")
    with trio.fail_after(10):
        await embedder.embed(m, EmbedRequest(("a",)), 60)
    [stats] = embedder.statistics().models
    assert stats.state == "ready" and stats.active == 0
    [resident] = (await embedder.scheduler.statistics()).models  # residency is the Scheduler's
    assert resident.kind == "bert" and 59 < resident.expires_at - time.time() <= 60
    clock.jump(30)
    with trio.fail_after(10):
        await trio.testing.wait_all_tasks_blocked()
    assert len(embedder.statistics().models) == 1
    clock.jump(31)
    with trio.fail_after(10):
        await trio.testing.wait_all_tasks_blocked()
    assert embedder.statistics().models == ()
    with trio.fail_after(10):
        # keep_alive 0: unloaded as soon as the request is answered.
        await embedder.embed(m, EmbedRequest(("a",)), 0)
        await trio.testing.wait_all_tasks_blocked()
    assert embedder.statistics().models == ()
    assert len(log["loads"]) == 2


async def test_unload_and_lru_eviction(embedder, log):
    a, b = _model("a"), _model("b", caps=("completion",))
    with trio.fail_after(10):
        await embedder.embed(a, EmbedRequest(("x",)), float("inf"))
        await embedder.embed(b, EmbedRequest(("x",)), float("inf"))  # max_loaded=1: evicts a
        await trio.testing.wait_all_tasks_blocked()
        assert [(s.name, s.kind) for s in embedder.statistics().models] == [("b:latest", "decoder")]
        await embedder.unload(b)
        assert embedder.statistics().models == ()


async def test_an_unloaded_model_is_let_go(embedder, log):
    m = _model("u")
    with trio.fail_after(10):
        await embedder.embed(m, EmbedRequest(("x",)), float("inf"))
        await embedder.unload(m)
        for w in embedder.stopping():  # the worker records stay behind for a while ...
            await trio.to_thread.run_sync(w.finished.wait)
    assert log["models"][-1]() is None  # ... but not the model


async def test_load_failure_is_reported_and_retried(embedder, log):
    with trio.fail_after(10):
        for _ in range(2):
            with pytest.raises(LoadError, match="no weights"):
                await embedder.embed(_model("broken"), EmbedRequest(("x",)), 60)
    assert len(log["loads"]) == 2 and embedder.statistics().models == ()


async def test_model_without_capability_is_refused(embedder, log):
    with trio.fail_after(10):
        with pytest.raises(BadRequest, match="does not support embeddings"):
            await embedder.embed(_model("v", caps=("vision",)), EmbedRequest(("x",)), 60)
    assert log["loads"] == []


async def test_a_refusal_does_not_wait_for_the_running_batch(embedder, log):
    """Inputs are tokenized (and refused) when they arrive, not when the thread takes them."""
    m = _model("e")
    with trio.fail_after(10):
        await embedder.embed(m, EmbedRequest(("a",)), 60)  # loaded
        log["gate"].clear()
        log["started"].clear()
        async with trio.open_nursery() as n:
            n.start_soon(embedder.embed, m, EmbedRequest(("long",)), 60)
            await trio.to_thread.run_sync(log["started"].wait)  # the thread is busy with it
            with pytest.raises(BadRequest, match="bad input"):
                await embedder.embed(m, EmbedRequest(("BAD",)), 60)
            assert not log["gate"].is_set()  # answered while the batch still ran
            log["gate"].set()
    assert log["batches"] == [1, 1]


class _Generator:
    """Stands in for a generation RunnerHandle: what the Scheduler reads of a resident."""

    def __init__(self, key, on_exit):
        self.key, self.on_exit, self.generation = key, on_exit, 1
        self.alive, self.context_length, self.load_seconds = True, 64, 0.0
        self.weight_bytes, self.vram_bytes = 100, 0

    def running(self) -> int:
        return 0

    async def stop(self, reason="", *, now=False):
        self.alive = False
        self.on_exit(self.key, self.generation, None, 0)


async def test_generating_and_embedding_models_share_one_budget(log, tmp_path):
    """One residency owner: MAX_LOADED_MODELS (and the memory budget) count both kinds, so an
    embedding model evicts an idle generating one, and /api/ps's source lists it."""
    from mlxserve.actors.scheduler import LoadSpec

    settings = Settings(models_dir=tmp_path, max_loaded_models=1)
    embedder = Embedder(settings, load_fn=lambda resolved, path, kind: lambda: FakeModel(log))
    generators: list[_Generator] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as runners:
            embed_load = model_loader(settings, FakeStore(), runners, None, embedder)

            async def load(spec, on_exit):
                if spec.kind == "generate":
                    generators.append(_Generator(spec.key, on_exit))
                    return generators[-1]
                return await embed_load(spec, on_exit)

            sched = embedder.scheduler = await runners.start(Scheduler(load_fn=load, max_loaded=1).run)
            (await sched.acquire(LoadSpec(key="gen", name="gen:latest", digest="sha256:gen"), 60)).release()
            await embedder.embed(_model("e"), EmbedRequest(("a",)), 60)
            stats = await sched.statistics()
            assert [(m.name, m.kind) for m in stats.models] == [("e:latest", "bert")]
            assert not generators[0].alive  # evicted for the embedding model
            runners.cancel_scope.cancel()
