"""Scheduler policy with an injected load function (no MLX) on trio's autojump clock.

``trio.sleep`` below advances virtual time (keep-alive deadlines), it does not synchronise.
"""

from __future__ import annotations

import itertools
import math

import pytest
import trio
import trio.testing

from mlxserve.actors.scheduler import LoadSpec, Scheduler
from mlxserve.errors import EngineError, LoadError, ServerBusy

_gen = itertools.count(1)


class FakeRunner:
    """Stands in for a RunnerHandle: what the Scheduler reads, plus a record of stops."""

    def __init__(self, key, on_exit):
        self.key = key
        self.generation = next(_gen)
        self.alive = True
        self.context_length = 2048
        self.weight_bytes = self.vram_bytes = 0
        self.load_seconds = 0.0
        self.on_exit = on_exit

    def running(self) -> int:
        return 0

    async def stop(self, reason: str = "unloaded", *, now: bool = False):
        self.alive = False
        self.on_exit(self.key, self.generation, None)

    def crash(self):
        self.alive = False
        self.on_exit(self.key, self.generation, "engine crashed: boom")


class Loads:
    def __init__(self, seconds=1.0, fail: set[str] | None = None):
        self.seconds = seconds
        self.fail = fail or set()
        self.started: list[str] = []
        self.active = 0
        self.max_active = 0
        self.runners: dict[str, FakeRunner] = {}

    async def __call__(self, spec: LoadSpec, on_exit):
        self.started.append(spec.key)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await trio.sleep(self.seconds)
            if spec.key in self.fail:
                raise LoadError(f"cannot load {spec.key}")
            r = FakeRunner(spec.key, on_exit)
            self.runners[spec.key] = r
            return r
        finally:
            self.active -= 1


def spec(name: str) -> LoadSpec:
    return LoadSpec(key=name, name=name, digest="sha256:" + name)


@pytest.fixture
async def sched(nursery):
    loads = Loads()

    async def start(**kw):
        s = Scheduler(load_fn=loads, **kw)
        handle = await nursery.start(s.run)
        return s, handle

    return loads, start


async def test_keep_alive_expiry_unloads_idle_models(sched, autojump_clock):
    loads, start = sched
    s, h = await start(default_keep_alive=300)
    lease = await h.acquire(spec("a"), keep_alive=300)
    await trio.sleep(1000)  # busy models never expire
    assert loads.runners["a"].alive
    lease.release()
    await trio.sleep(299)
    assert loads.runners["a"].alive
    await trio.sleep(2)
    assert not loads.runners["a"].alive
    assert (await h.statistics()).loaded == 0


async def test_keep_alive_zero_and_forever(sched, autojump_clock):
    loads, start = sched
    s, h = await start()
    (await h.acquire(spec("zero"), keep_alive=0)).release()
    (await h.acquire(spec("forever"), keep_alive=math.inf)).release()
    await trio.sleep(1)
    assert not loads.runners["zero"].alive
    await trio.sleep(10**7)
    assert loads.runners["forever"].alive
    stats = await h.statistics()
    assert [m.expires_at for m in stats.models] == [math.inf]


async def test_last_requests_keep_alive_wins(sched, autojump_clock):
    loads, start = sched
    s, h = await start()
    a = await h.acquire(spec("m"), keep_alive=10)
    b = await h.acquire(spec("m"), keep_alive=1000)
    a.release()
    b.release(keep_alive=20)
    await trio.sleep(19)
    assert loads.runners["m"].alive
    await trio.sleep(2)
    assert not loads.runners["m"].alive


async def test_eviction_is_lru_and_never_touches_busy_models(sched, autojump_clock):
    loads, start = sched
    s, h = await start(max_loaded=2)
    a = await h.acquire(spec("a"), 300)
    b = await h.acquire(spec("b"), 300)
    a.release()
    await trio.sleep(5)
    b.release()
    c = await h.acquire(spec("c"), 300)  # evicts a (least recently used), keeps b
    assert not loads.runners["a"].alive and loads.runners["b"].alive and c.handle.alive
    # Both residents busy: a fourth model waits until one is released, then evicts it.
    b2 = await h.acquire(spec("b"), 300)
    got = []

    async def want_d():
        got.append(await h.acquire(spec("d"), 300))

    async with trio.open_nursery() as n:
        n.start_soon(want_d)
        await trio.sleep(100)
        assert got == [] and loads.runners["b"].alive and loads.runners["c"].alive
        c.release()
    assert got and not loads.runners["c"].alive and loads.runners["b"].alive
    b2.release()


async def test_one_load_at_a_time_and_failed_load_fails_every_waiter(autojump_clock, nursery):
    loads = Loads(seconds=5, fail={"bad"})
    s = Scheduler(load_fn=loads)
    h = await nursery.start(s.run)
    errors, leases = [], []

    async def want(name):
        try:
            leases.append(await h.acquire(spec(name), 300))
        except LoadError as exc:
            errors.append(str(exc))

    async with trio.open_nursery() as n:
        for name in ["bad", "bad", "bad", "good", "other"]:
            n.start_soon(want, name)
    assert loads.max_active == 1
    assert errors == ["cannot load bad"] * 3
    assert sorted(lease.handle.key for lease in leases) == ["good", "other"]
    assert loads.started.count("bad") == 1  # the waiters shared one load attempt


async def test_queue_cap_counts_requests_for_loaded_models(sched, autojump_clock):
    loads, start = sched
    s, h = await start(num_parallel=1, max_queue=2)
    leases = [await h.acquire(spec("m"), 300) for _ in range(3)]  # 1 running + 2 queued
    assert (await h.statistics()).queued == 2
    with pytest.raises(ServerBusy):
        await h.acquire(spec("m"), 300)
    with pytest.raises(ServerBusy):  # a model that is not loaded is refused too
        await h.acquire(spec("other"), 300)
    leases[0].release()
    await trio.testing.wait_all_tasks_blocked()
    leases.append(await h.acquire(spec("m"), 300))  # a slot freed: admitted again


async def test_a_queued_request_that_gives_up_is_not_counted(sched, autojump_clock):
    loads, start = sched
    loads.seconds = 50
    s, h = await start(max_queue=1)
    with trio.move_on_after(10):
        await h.acquire(spec("slow"), 300)  # gives up while the model loads
    await trio.testing.wait_all_tasks_blocked()
    assert (await h.statistics()).queued == 0
    lease = await h.acquire(spec("slow"), 300)  # the cap has room again
    lease.release()
    await trio.testing.wait_all_tasks_blocked()
    st = await h.statistics()
    assert [m.running for m in st.models] == [0]  # the abandoned grant was handed back


async def test_crashed_runner_restarts_then_gives_up(sched, autojump_clock):
    loads, start = sched
    s, h = await start()
    first = await h.acquire(spec("m"), 300)
    gen1 = first.handle.generation
    for _ in range(3):  # MAX_CRASH_RESTARTS
        runner = loads.runners["m"]
        runner.crash()
        await trio.testing.wait_all_tasks_blocked()
        lease = await h.acquire(spec("m"), 300)
        assert lease.handle.generation > gen1
        gen1 = lease.handle.generation
    loads.runners["m"].crash()
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(EngineError, match="crashed"):
        await h.acquire(spec("m"), 300)


async def test_memory_budget_evicts_idle_models_first(sched, autojump_clock):
    loads, start = sched
    s, h = await start(max_loaded=5, max_memory=100)

    def sized(name: str, size: int) -> LoadSpec:
        return LoadSpec(key=name, name=name, digest="sha256:" + name, size=size)

    (await h.acquire(sized("a", 40), 300)).release()
    await trio.sleep(1)
    b = await h.acquire(sized("b", 40), 300)  # 80 of 100: both fit
    assert loads.runners["a"].alive and loads.runners["b"].alive
    c = await h.acquire(sized("c", 40), 300)  # would be 120: the idle one (a) goes, busy b stays
    assert not loads.runners["a"].alive and loads.runners["b"].alive and c.handle.alive
    got = []

    async def want_d():
        got.append(await h.acquire(sized("d", 40), 300))

    async with trio.open_nursery() as n:
        n.start_soon(want_d)
        await trio.sleep(100)
        assert got == []  # b and c busy: never evicted, d waits
        b.release()
    assert got and not loads.runners["b"].alive and loads.runners["c"].alive


async def test_a_cold_models_burst_takes_its_running_slots_before_the_queue_cap(autojump_clock, nursery):
    """Requests waiting for a load take the model's running slots once it is ready, so they count
    against max_queue as requests to a loaded model do: beyond num_parallel only."""
    loads = Loads(seconds=5)
    s = Scheduler(load_fn=loads, num_parallel=16, max_queue=34)
    h = await nursery.start(s.run)

    async def burst(n: int) -> tuple[list, int]:
        leases, busy = [], []

        async def want():
            try:
                leases.append(await h.acquire(spec("m"), 300))
            except ServerBusy:
                busy.append(1)

        async with trio.open_nursery() as inner:
            for _ in range(n):
                inner.start_soon(want)
            await trio.testing.wait_all_tasks_blocked()
            assert (await h.statistics()).queued == 34  # 16 of the 50 admitted run at once
        return leases, len(busy)

    with trio.fail_after(60):
        cold, refused = await burst(51)
        assert loads.started == ["m"] and (len(cold), refused) == (50, 1)
        for lease in cold:
            lease.release()
        warm, refused = await burst(51)  # the same burst to the loaded model: the same answer
        assert loads.started == ["m"] and (len(warm), refused) == (50, 1)


class OtherHandle(FakeRunner):
    """A handle of another kind than the caller asks for (as an embedding worker is to HTTP)."""


async def test_acquire_as_gives_the_concrete_handle_and_refuses_another_kind(sched, autojump_clock):
    loads, start = sched
    s, h = await start()
    with trio.fail_after(60):
        lease = await h.acquire_as(FakeRunner, spec("a"), 300)
        assert lease.handle is loads.runners["a"]
        lease.release()
        with pytest.raises(TypeError, match="served by a FakeRunner, not a OtherHandle"):
            await h.acquire_as(OtherHandle, spec("a"), 300)
        # The refused grant went back: the model is idle again, not held by a lease nobody has.
        await trio.sleep(0)
        (model,) = (await h.statistics()).models
        assert model.running == 0 and model.expires_at is not None
