"""Two ranks on 127.0.0.1 over the ring backend, on the CPU, serving one model between them.

Rank 0 is a real daemon (``mlxctl serve``) started by ``mlx.launch`` or with the environment it
sets; rank 1 follows it. Answers are compared with one rank's (an in-process daemon on the same
store): the tiny model splits tensor parallel (its heads divide by 2), SmolLM2 pipeline parallel
(9 heads, 3 KV heads do not).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
from support import start_daemon

BIN = Path(sys.executable).parent
PROMPTS = ["Why is the sky blue?", "Write a haiku about rivers.", "List three prime numbers."]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _free_port_pair(avoid: int) -> int:
    """A port whose next one is free too: mlx.launch's ring backend binds ``--starting-port`` and
    the one after it (two unrelated free ports left the second taken: bind error 98)."""
    for _ in range(100):
        (port,) = _free_ports(1)
        if avoid in (port, port + 1):  # the daemon's HTTP port, closed until it starts
            continue
        socks = [socket.socket() for _ in range(2)]
        try:
            for s, p in zip(socks, (port, port + 1)):
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no two consecutive free ports on 127.0.0.1")


class Group:
    """Two ranks of ``mlxctl serve`` in their own process group (so teardown reaches both)."""

    def __init__(self, models_dir: Path, tmp: Path, *, launcher: bool, timeout_s: float = 30.0, **env_extra) -> None:
        http, ring0, ring1 = _free_ports(3)
        self.url = f"http://127.0.0.1:{http}"
        env = {
            **os.environ,
            "MLXSERVE_MODELS": str(models_dir),
            "MLXSERVE_HOST": f"127.0.0.1:{http}",
            "MLXSERVE_DIST_TIMEOUT": str(timeout_s),
            "MLXSERVE_KEEP_ALIVE": "10m",
            # BLAS float32 on both sides of a comparison (and no kernel build on a fresh cache)
            "MLXSERVE_WEIGHT_DTYPE": "float32",
            **env_extra,
        }
        self.procs: list[subprocess.Popen] = []
        self.logs = [tmp / "rank0.log", tmp / "rank1.log"]
        if launcher:  # the documented way: mlx.launch starts both ranks
            port = _free_port_pair(avoid=http)
            cmd = [
                str(BIN / "mlx.launch"),
                "--backend",
                "ring",
                "-n",
                "2",
                "--starting-port",
                str(port),
                str(BIN / "mlxctl"),
                "serve",
            ]
            self.procs.append(
                subprocess.Popen(
                    cmd, env=env, stdout=self.logs[0].open("w"), stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        else:  # the environment mlx.launch sets, one process a rank: rank 0 outlives a follower
            hostfile = tmp / "hosts.json"
            hostfile.write_text(json.dumps([[f"127.0.0.1:{ring0}"], [f"127.0.0.1:{ring1}"]]))
            for rank in (0, 1):
                self.procs.append(
                    subprocess.Popen(
                        [str(BIN / "mlxctl"), "serve"],
                        env={**env, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)},
                        stdout=self.logs[rank].open("w"),
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

    def wait_ready(self, deadline_s: float = 180.0) -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if any(p.poll() is not None for p in self.procs):
                break
            try:
                if httpx.get(self.url + "/api/version", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("the group did not start:\n" + self.log_tail())

    def log_tail(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in self.logs if p.exists())

    def follower_pid(self) -> int:
        return self.procs[1].pid

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture(scope="module")
def group(smol_store_template, tmp_path_factory):
    g = Group(smol_store_template, tmp_path_factory.mktemp("group"), launcher=True)
    g.wait_ready()
    yield g
    g.stop()


async def _generate(c: httpx.AsyncClient, model: str, prompt: str, n: int = 24, **options) -> dict:
    r = await c.post(
        "/api/generate",
        json={
            "model": model,
            "prompt": prompt,
            "stream": False,
            "options": {"temperature": 0, "num_predict": n, **options},
        },
    )
    assert r.status_code == 200, r.text
    return r.json()


async def _batch(url: str, model: str, n: int = 24) -> list[str]:
    """The prompts at once, so the group's engine batches them."""
    out: dict[int, str] = {}
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        async with trio.open_nursery() as nursery:
            for i, p in enumerate(PROMPTS):

                async def one(i=i, p=p):
                    out[i] = (await _generate(c, model, p, n))["response"]

                nursery.start_soon(one)
    return [out[i] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("model, split", [("tiny", "tensor"), ("smol", "pipeline")])
async def test_greedy_output_equals_one_rank(group, smol_store_template, model, split):
    with trio.fail_after(400):
        two = await _batch(group.url, model)
        again = await _batch(group.url, model)  # from the prefix cache: every rank trims its own KV
        async with httpx.AsyncClient(base_url=group.url, timeout=10) as c:
            ps = (await c.get("/api/ps")).json()["models"]
            status = (await c.get("/api/status")).json()
        async with trio.open_nursery() as nursery:
            one_rank = await start_daemon(nursery, smol_store_template, weight_dtype="float32")
            one = await _batch(one_rank.url, model)
            one_rank.shutdown.set()
    assert two == one and again == one
    assert all(t for t in two)
    entry = next(m for m in ps if m["name"] == f"{model}:latest")
    assert entry["group"] == {"backend": "ring", "ranks": 2, "split": split, "state": "up", "error": None}
    assert status["group"]["state"] == "up"
    assert [m["group"]["split"] for m in status["models"] if m["loaded"]] == [split]


async def test_cancellation_and_disconnect_storm_keeps_ranks_in_step(group):
    """Streams that leave at random points, a grammar-constrained answer and unseeded sampling in
    one batch: a rank that fell out of step would fail the group (token checksums) or hang it."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    left, finished = [], []
    with trio.fail_after(240):
        async with httpx.AsyncClient(base_url=group.url, timeout=120) as c:
            reference = (await _generate(c, "tiny", PROMPTS[0]))["response"]

            async def leave_after(i: int, tokens: int) -> None:
                body = {"model": "tiny", "prompt": f"{i} {PROMPTS[i % 3]}", "options": {"num_predict": 200}}
                async with c.stream("POST", "/api/generate", json=body) as r:
                    seen = 0
                    async for line in r.aiter_lines():
                        seen += bool(line.strip())
                        if seen >= tokens:
                            break
                left.append(i)

            async def structured() -> None:
                r = await c.post(
                    "/api/generate",
                    json={
                        "model": "tiny",
                        "prompt": "Give n.",
                        "stream": False,
                        "format": schema,
                        "options": {"num_predict": 40},
                    },
                )
                finished.append(r.status_code)

            async def sampled() -> None:
                r = await c.post(
                    "/api/generate",
                    json={
                        "model": "tiny",
                        "prompt": "Go on",
                        "stream": False,
                        "options": {"temperature": 0.9, "num_predict": 30},
                    },
                )
                finished.append(r.status_code)

            for _round in range(3):
                async with trio.open_nursery() as nursery:
                    for i in range(8):
                        nursery.start_soon(leave_after, i, 1 + (i * 5) % 13)
                    nursery.start_soon(structured)
                    nursery.start_soon(sampled)
            again = (await _generate(c, "tiny", PROMPTS[0]))["response"]
            while (status := (await c.get("/api/status")).json())["running"]:
                await trio.sleep(0.05)
    assert len(left) == 24 and finished == [200] * 6
    assert again == reference
    assert status["group"] == {"backend": "ring", "ranks": 2, "split": "tensor", "state": "up", "error": None}


async def _arm(pid: int, control: Path, fault: str) -> None:
    """Arm an engine fault through the daemon's fault seam (actors/faults.py) and wait for its ack."""
    control.write_text(json.dumps({"id": 1, "faults": [{"fault": fault, "model": "tiny:latest"}]}))
    os.kill(pid, signal.SIGUSR1)
    ack = control.with_name(control.name + ".ack")

    def acked() -> bool:
        try:
            return json.loads(ack.read_text()).get("id") == 1
        except (OSError, ValueError):
            return False

    with trio.fail_after(10):
        while not acked():
            await trio.sleep(0.02)  # bounded polling: the ack is a file the daemon writes


@pytest.mark.parametrize("fault", ["kill", "hang"])
async def test_a_lost_rank_fails_its_requests_cleanly_and_rank_0_stays_up(models_dir, tmp_path, fault):
    """SIGKILL (the connection drops) or SIGSTOP (the rank goes silent; the ring backend would
    wait for ever) on rank 1 mid-stream: the stream ends with an error within the watchdog's
    bound, the daemon answers, /api/status says the group is down and why, and the model's next
    request is a clean 503.

    The killed group's first step raises (a chaos fault armed on rank 0): every rank must fail
    that step and reseed alike, or the unseeded sampling after it would part them."""
    control = tmp_path / "faults.json"
    g = Group(models_dir, tmp_path, launcher=False, timeout_s=2.0, MLXSERVE_FAULT_CONTROL=str(control))
    try:
        g.wait_ready()
        with trio.fail_after(120):
            async with httpx.AsyncClient(base_url=g.url, timeout=60) as c:
                await _generate(c, "tiny", "warm", 2)
                if fault == "kill":
                    await _arm(g.procs[0].pid, control, "step_raise")
                first = await c.post(
                    "/api/generate",
                    json={"model": "tiny", "prompt": "warm", "stream": False, "options": {"num_predict": 2}},
                )
                sampled = []
                async with trio.open_nursery() as nursery:
                    for i in range(3):

                        async def one(i=i):
                            sampled.append(
                                await c.post(
                                    "/api/generate",
                                    json={
                                        "model": "tiny",
                                        "prompt": f"{i} go on",
                                        "stream": False,
                                        "options": {"temperature": 0.9, "num_predict": 20},
                                    },
                                )
                            )

                        nursery.start_soon(one)
                before = (await c.get("/api/status")).json()["group"]
                body = {"model": "tiny", "prompt": "Tell me a long story", "options": {"num_predict": 100000}}
                lines = []
                async with c.stream("POST", "/api/generate", json=body) as r:
                    async for line in r.aiter_lines():
                        if not line.strip():
                            continue
                        lines.append(json.loads(line))
                        if len(lines) == 3:
                            os.kill(g.follower_pid(), signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
                            t_fault = time.monotonic()
                waited = time.monotonic() - t_fault
                status = (await c.get("/api/status")).json()
                version = await c.get("/api/version")
                again = await c.post("/api/generate", json={"model": "tiny", "prompt": "hi", "stream": False})
    finally:
        if fault == "hang" and g.procs[1].poll() is None:
            os.kill(g.follower_pid(), signal.SIGCONT)
        g.stop()
    if fault == "kill":
        assert first.status_code == 500 and "injected fault" in first.json()["error"]
    assert [r.status_code for r in sampled] == [200] * 3
    assert before["state"] == "up", before
    assert "distributed group failed" in lines[-1].get("error", ""), lines[-1]
    assert waited < 2.0 + 8.0  # the watchdog's bound plus its own half-second polls, on a busy box
    assert version.status_code == 200
    assert status["group"]["state"] == "down"
    assert ("closed its connection" if fault == "kill" else "sent nothing") in status["group"]["error"]
    assert again.status_code == 503 and "down" in again.json()["error"]
