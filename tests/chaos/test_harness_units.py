"""The harness's parts and the runtime seams it relies on, without a daemon process."""

from __future__ import annotations

import functools
import itertools
import json
import threading

import pytest
import trio
import trio.testing

from mlxserve.actors import faults
from mlxserve.actors.hosts import EngineHosts
from mlxserve.actors.scheduler import LoadSpec, Scheduler
from mlxserve.actors.store_service import StoreService
from mlxserve.chaos import clients, wire
from mlxserve.chaos.clients import Plan, Result, Template, _Reader, _wellformed_error
from mlxserve.chaos.scenarios import pct
from mlxserve.errors import EngineError
from mlxserve.store.store import Store


def _result(route: str) -> Result:
    return Result(Plan(Template(route, "tiny", "hi", "greedy", 4)))


def _feed(route: str, lines: list) -> Result:
    r = _result(route)
    reader = _Reader(r, route)
    for line in lines:
        reader.feed(line if isinstance(line, bytes) else json.dumps(line).encode())
    return r


def test_ndjson_stream_pieces_final_and_trailing_garbage():
    final = {"done": True, "done_reason": "length", "eval_count": 2, "total_duration": 1, "response": ""}
    r = _feed("generate", [{"response": "He", "done": False}, {"response": "llo", "done": False}, final])
    assert r.text == "Hello" and r.finished and r.finish_reason == "length" and not r.problems
    r = _feed("generate", [{"response": "a", "done": False}, final, {"response": "b", "done": False}])
    assert any("after the end" in p for p in r.problems)
    r = _feed("chat", [{"message": {"role": "assistant", "content": "x"}, "done": False}, {"error": "boom"}])
    assert r.error == "boom" and not r.finished
    r = _feed("chat", [{"done": True}])
    assert {"final line lacks done_reason", "final line lacks eval_count"} <= set(r.problems)


def test_sse_stream_needs_role_finish_and_done():
    chunk = lambda delta, fin=None: (
        b"data: "
        + json.dumps(  # noqa: E731
            {"choices": [{"index": 0, "delta": delta, "finish_reason": fin}]}
        ).encode()
    )
    r = _feed(
        "openai",
        [chunk({"role": "assistant", "content": ""}), chunk({"content": "Hi"}), chunk({}, "stop"), b"data: [DONE]"],
    )
    assert r.text == "Hi" and r.finished and r.finish_reason == "stop" and not r.problems
    r = _feed("openai", [chunk({"content": "Hi"}), b"data: [DONE]"])
    assert "first chunk has no delta.role" in r.problems and "[DONE] before a finish_reason" in r.problems
    r = _feed("openai", [b'data: {"error": {"message": "m", "type": "t", "param": null, "code": null}}'])
    assert r.error == "m"
    r = _feed("openai", [b'data: {"error": "flat"}'])
    assert r.error == "" and any("malformed error" in p for p in r.problems)


def test_error_shapes_per_dialect():
    assert _wellformed_error("generate", {"error": "x"}) == "x"
    assert _wellformed_error("generate", {"error": ""}) is None
    assert _wellformed_error("openai", {"error": "x"}) is None
    assert _wellformed_error("openai", {"error": {"message": "x", "type": "t", "param": None, "code": None}}) == "x"


def test_percentile_is_nearest_rank():
    assert pct([], 50) is None
    assert pct([3.0, 1.0, 2.0], 50) == 2.0
    assert pct(list(range(1, 101)), 99) == 99


async def test_wire_decodes_chunked_bodies_and_aborts_with_rst():
    body = b"4\r\nabc\n\r\n3\r\ndef\r\n2\r\n\n\n\r\n0\r\n\r\n"
    got_request = trio.Event()

    async def handler(stream):
        await stream.receive_some(65536)
        got_request.set()
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n" + body)
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            listeners = await n.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            conn = await wire.Connection.open("127.0.0.1", port, rcvbuf=4096)
            await conn.send("POST", "/x", b"{}")
            status, headers = await conn.read_head()
            lines = [line async for line in conn.lines()]
            assert (status, headers["x-a"]) == (200, "b")
            assert lines == [b"abc", b"def", b""]
            assert conn.abort(reset=True) == conn.abort()  # idempotent, remembers when
            n.cancel_scope.cancel()


def test_client_fault_plans_expect_4xx_only():
    assert all(400 <= code < 500 for code in clients.CLIENT_FAULTS.values())
    for kind in clients.CLIENT_FAULTS:
        path, body, headers = clients._fault_request(kind, Template("chat", "tiny", "hi", "greedy", 4))
        assert path.startswith(("/api/", "/v1/")) and body


# ---------------------------------------------------------------------- runtime seams


class _FakeRunner:
    def __init__(self, name):
        self.name = name
        self.alive = True
        self.armed: list[str] = []

    def arm_engine_fault(self, fault):
        self.armed.append(fault)


def test_fault_seam_arms_live_runners_and_keeps_the_rest_pending():
    seam = faults.FaultSeam()
    fired: list[tuple[str, str]] = []
    seam.on_fire = lambda f, m: fired.append((f, m))
    live = _FakeRunner("a:latest")
    seam.runner_started(live)
    seam.arm({"fault": "step_raise", "model": "a:latest"})
    assert live.armed == ["step_raise"] and not seam.active
    seam.arm({"fault": "thread_die", "model": "b:latest"})  # not loaded: waits for its runner
    later = _FakeRunner("b:latest")
    seam.runner_started(later)
    assert later.armed == ["thread_die"]
    seam.arm({"fault": "load_slow", "seconds": 1})  # any model
    assert seam.take("load_fail", "a:latest") is None
    assert seam.take("load_slow", "c:latest") == {"fault": "load_slow", "seconds": 1}
    assert seam.take("load_slow", "c:latest") is None  # once per arming
    assert fired == [("step_raise", "a:latest"), ("thread_die", "b:latest"), ("load_slow", "c:latest")]
    with pytest.raises(ValueError):
        seam.arm({"fault": "nope"})


def test_engine_hosts_reuse_their_threads():
    hosts = EngineHosts()
    seen: list[int] = []

    def run_one() -> None:
        done = threading.Event()
        hosts.run(lambda: seen.append(threading.get_ident()), done.set)
        assert done.wait(10)

    run_one()
    run_one()
    assert len(set(seen)) == 1 and hosts.statistics().total == 1
    # Two at once need two hosts; both stay for later.
    release = threading.Event()
    started = [threading.Event(), threading.Event()]
    done = [threading.Event(), threading.Event()]
    for i in range(2):
        hosts.run(lambda i=i: (started[i].set(), release.wait(10)), done[i].set)
    assert all(e.wait(10) for e in started)
    assert hosts.statistics().busy == 2
    release.set()
    assert all(e.wait(10) for e in done)
    assert hosts.statistics().total == 2


class _Runner:
    _gen = itertools.count(1)

    def __init__(self, key, on_exit):
        self.key, self.on_exit = key, on_exit
        self.generation = next(self._gen)
        self.alive = True
        self.context_length = 64
        self.weight_bytes = self.vram_bytes = 0
        self.load_seconds = 0.0

    def running(self) -> int:
        return 0

    async def stop(self, reason="", *, now=False):
        self.alive = False
        self.on_exit(self.key, self.generation, None)

    def crash(self, served):
        self.alive = False
        self.on_exit(self.key, self.generation, "engine crashed: chaos", served)


async def test_crash_cap_counts_crashes_in_a_row_only(nursery):
    runners: list[_Runner] = []

    async def load(spec, on_exit):
        runners.append(_Runner(spec.key, on_exit))
        return runners[-1]

    with trio.fail_after(10):
        h = await nursery.start(Scheduler(load_fn=load).run)
        spec = LoadSpec(key="m", name="m", digest="sha256:m")
        for _ in range(6):  # a runner that served before it crashed: not a crash loop
            (await h.acquire(spec, 300)).release()
            runners[-1].crash(served=1)
            await trio.testing.wait_all_tasks_blocked()
        for _ in range(2):  # crashes with nothing served in between: the cap applies
            (await h.acquire(spec, 300)).release()
            runners[-1].crash(served=0)
            await trio.testing.wait_all_tasks_blocked()
        (await h.acquire(spec, 300)).release()  # the third crash in a row is still restarted
        runners[-1].crash(served=0)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(EngineError, match="crashed"):
            await h.acquire(spec, 300)


async def test_store_service_answers_known_names_without_a_thread(models_dir):
    store = Store(models_dir)
    with trio.fail_after(30):
        h = StoreService(store)
        first = await h.resolve("tiny")
        calls = []
        real = store.resolve
        store.resolve = lambda name: calls.append(name) or real(name)  # count thread round trips
        assert await h.resolve("tiny") is first and calls == []
        await h.copy("tiny-mlx", "tiny")  # a write: the manifest changed
        again = await h.resolve("tiny")
        assert calls == ["tiny"] and again.digest != first.digest
        assert await h.resolve("tiny") is again
