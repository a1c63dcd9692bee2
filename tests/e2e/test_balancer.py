"""Draining on SIGTERM, and two daemons behind HAProxy with deploy/haproxy.cfg.

The first tests drive the drain in process: readiness flips to 503, new work is refused with a
503 that closes its connection, and the requests in flight finish (or are stopped at the
deadline). The balancer tests start two `mlxctl serve` processes and HAProxy on loopback, kill
one mid-load, and check that no request is lost (SIGTERM) or that each ends cleanly (SIGKILL).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest
import trio
from support import make_settings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GREEDY = {"temperature": 0}


async def _start(nursery: trio.Nursery, models_dir: Path, **overrides):
    """An in-process daemon; ``stopped`` is set once run_daemon has returned."""
    from mlxserve.http.server import run_daemon

    settings = make_settings(models_dir, **overrides)
    stopped = trio.Event()

    async def run(task_status):
        try:
            await run_daemon(settings, task_status=task_status)
        finally:
            stopped.set()

    return await nursery.start(run), stopped


def _held_upload(release: trio.Event):
    """A blob upload whose last byte waits for ``release``: a request in flight on demand."""
    head, tail = b"x" * 4096, b"y"
    digest = "sha256:" + hashlib.sha256(head + tail).hexdigest()

    async def body():
        yield head
        await release.wait()
        yield tail

    return f"/api/blobs/{digest}", body()


async def test_drain_flips_readiness_refuses_new_work_and_lets_streams_finish(models_dir):
    with trio.fail_after(120):
        async with trio.open_nursery() as n:
            info, stopped = await _start(n, models_dir, drain_seconds=60)
            async with httpx.AsyncClient(base_url=info.url, timeout=60) as c:
                ready = await c.get("/api/ready")
                assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
                # An upload held open keeps the daemon draining until this test lets it go.
                release, uploaded = trio.Event(), []
                path, body = _held_upload(release)

                async def upload():
                    uploaded.append(await c.post(path, content=body))

                n.start_soon(upload)
                await info.drain.wait_until(lambda k: k == 1)
                lines = []
                req = {"model": "tiny", "prompt": "Hello", "options": {**GREEDY, "num_predict": 200}}
                async with c.stream("POST", "/api/generate", json=req) as s:
                    it = s.aiter_lines()
                    lines.append(json.loads(await it.__anext__()))
                    info.drain.start()

                    ready = await c.get("/api/ready")
                    assert (ready.status_code, ready.json()) == (503, {"status": "draining"})
                    assert (await c.get("/api/health")).status_code == 200  # reads still answer
                    refused = await c.post("/api/generate", json=req)
                    assert refused.status_code == 503 and "draining" in refused.json()["error"]
                    assert refused.headers["connection"] == "close" and refused.headers["retry-after"]
                    oai = await c.post(
                        "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
                    )
                    assert oai.status_code == 503 and oai.json()["error"]["code"] == "server_busy"

                    async for line in it:
                        if line.strip():
                            lines.append(json.loads(line))
                assert not [x for x in lines if "error" in x], lines[-3:]
                assert lines[-1]["done"] is True and lines[-1]["eval_count"] >= 1
                assert not stopped.is_set()  # the held upload is still in flight
                release.set()
                await stopped.wait()  # and once it is done, the daemon exits by itself
                assert uploaded[0].status_code == 201


async def test_drain_deadline_stops_what_is_still_in_flight(models_dir):
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            info, stopped = await _start(n, models_dir, drain_seconds=0.5)
            async with httpx.AsyncClient(base_url=info.url, timeout=60) as c:
                outcome = []
                release = trio.Event()
                path, body = _held_upload(release)

                async def upload():
                    try:
                        outcome.append((await c.post(path, content=body)).status_code)
                    except httpx.TransportError as exc:
                        outcome.append(type(exc).__name__)

                async with trio.open_nursery() as clients:
                    clients.start_soon(upload)
                    await info.drain.wait_until(lambda k: k == 1)
                    info.drain.start()
                    await stopped.wait()  # without waiting for the upload
                    release.set()  # its last byte finds no daemon
                # Served, not refused (it came before the drain), then cut off at the deadline.
                assert outcome[0] in ("RemoteProtocolError", "WriteError", "ReadError"), outcome


def test_drain_seconds_setting():
    from mlxserve.config import Settings

    assert Settings.from_env({"MLXSERVE_DRAIN_SECONDS": "45"}).drain_seconds == 45.0
    assert Settings.from_env({}).drain_seconds == 10.0
    for bad in ("soon", "-1", "nan"):
        with pytest.raises(ValueError, match="MLXSERVE_DRAIN_SECONDS"):
            Settings.from_env({"MLXSERVE_DRAIN_SECONDS": bad})


# ---- two daemons behind HAProxy -------------------------------------------------------------

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")  # not on every PATH
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy; `make test` installs it)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _mlxctl_serve(models: Path, port: int, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "MLXSERVE_MODELS": str(models),
        "MLXSERVE_HOST": f"127.0.0.1:{port}",
        "MLXSERVE_DRAIN_SECONDS": "60",
    }
    with log.open("w") as err:
        proc = subprocess.Popen([BIN / "mlxctl", "serve"], env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    # Printed once the socket is bound; the rest of stdout is not read, and there is little of it.
    line = await trio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)
    assert "listening on" in line, log.read_text()[-3000:]
    return proc


def _haproxy_config(lb_port: int, ports: list[int]) -> str:
    """deploy/haproxy.cfg with its listening and daemon addresses moved onto loopback."""
    text = (ROOT / "deploy" / "haproxy.cfg").read_text()
    text = text.replace("bind *:11434", f"bind 127.0.0.1:{lb_port}")
    for i, port in enumerate(ports, 1):
        text = text.replace(f"10.0.0.{i}:11434", f"127.0.0.1:{port}")
    assert "10.0.0." not in text and f"127.0.0.1:{lb_port}" in text
    return text


async def _start_haproxy(tmp: Path, lb_port: int, ports: list[int]) -> subprocess.Popen:
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(_haproxy_config(lb_port, ports))
    with (tmp / "haproxy.log").open("w") as log:
        proc = subprocess.Popen([HAPROXY, "-db", "-f", cfg], stdout=log, stderr=subprocess.STDOUT)
    # HAProxy says nothing when it listens: try its port until it answers (or HAProxy exits).
    while True:
        assert proc.poll() is None, (tmp / "haproxy.log").read_text()
        try:
            await (await trio.open_tcp_stream("127.0.0.1", lb_port)).aclose()
            return proc
        except OSError:
            await trio.sleep(0.05)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


async def _until_draining(port: int) -> None:
    """Until the daemon's /api/ready says 503: a signal has no echo to wait on but this."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        while (await c.get("/api/ready")).status_code == 200:
            await trio.sleep(0.02)


def _outcome(lines: list[dict]) -> str:
    if lines and lines[-1].get("done") is True:
        return "done"
    return "error line" if lines and "error" in lines[-1] else "cut short silently"


@needs_haproxy
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_two_daemons_behind_haproxy_one_killed_mid_load(tmp_path, models_dir, tiny_store_template, sig):
    second = tmp_path / "models2"
    shutil.copytree(tiny_store_template, second, copy_function=os.link, symlinks=True)
    ports, lb_port = [_free_port(), _free_port()], _free_port()
    procs: list[subprocess.Popen] = []
    try:
        with trio.fail_after(150):
            daemons: list = [None, None]

            async def serve(i: int, models: Path) -> None:
                daemons[i] = await _mlxctl_serve(models, ports[i], tmp_path / f"daemon{i + 1}.log")
                procs.append(daemons[i])

            async with trio.open_nursery() as n:
                n.start_soon(serve, 0, models_dir)
                n.start_soon(serve, 1, second)
            procs.append(await _start_haproxy(tmp_path, lb_port, ports))
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{lb_port}", timeout=60) as c:
                # A model's requests go where it is loaded; the other daemon never loads it.
                one = {"model": "tiny", "prompt": "Hi", "stream": False, "options": {**GREEDY, "num_predict": 4}}
                homes = set()
                for _ in range(3):
                    r = await c.post("/api/generate", json=one)
                    assert r.status_code == 200 and r.json()["done"], r.text
                    homes.add(r.headers["x-served-by"])
                assert len(homes) == 1, homes
                home = int(homes.pop().removeprefix("mlx")) - 1
                other = httpx.get(f"http://127.0.0.1:{ports[1 - home]}/api/ps", timeout=10).json()
                assert other["models"] == []

                # Load: streams on both daemons (past 1.5x the average, bounded-load hashing spills).
                k = 6
                outcomes: list[str | None] = [None] * k
                served_by: list[str | None] = [None] * k
                started, all_started = [0], trio.Event()

                async def stream(i: int) -> None:
                    req = {"model": "tiny", "prompt": f"Story {i}:", "options": {**GREEDY, "num_predict": 300}}
                    lines: list[dict] = []
                    try:
                        async with c.stream("POST", "/api/generate", json=req) as r:
                            assert r.status_code == 200
                            served_by[i] = r.headers["x-served-by"]
                            async for line in r.aiter_lines():
                                if line.strip():
                                    lines.append(json.loads(line))
                                    if len(lines) == 1:
                                        started[0] += 1
                                        if started[0] == k:
                                            all_started.set()
                        outcomes[i] = _outcome(lines)
                    except httpx.TransportError as exc:  # the stream broke: an error, not a hang
                        outcomes[i] = f"transport error: {type(exc).__name__}"

                answers: list[httpx.Response] = []

                async def later(i: int) -> None:
                    answers.append(await c.post("/api/generate", json={**one, "prompt": f"After {i}"}))

                async with trio.open_nursery() as n:
                    for i in range(k):
                        n.start_soon(stream, i)
                    await all_started.wait()
                    victim_name = Counter(served_by).most_common(1)[0][0]
                    victim = daemons[int(victim_name.removeprefix("mlx")) - 1]
                    victim.send_signal(sig)
                    if sig == signal.SIGTERM:  # the signal is taken (readiness 503) before new work comes
                        await _until_draining(ports[daemons.index(victim)])
                    for i in range(4):  # new requests, while the victim drains or after it died
                        n.start_soon(later, i)

                assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
                assert all(a.json()["done"] for a in answers)
                on_victim = [o for o, s in zip(outcomes, served_by) if s == victim_name]
                elsewhere = [o for o, s in zip(outcomes, served_by) if s != victim_name]
                assert elsewhere == ["done"] * len(elsewhere), outcomes
                if sig == signal.SIGTERM:  # drained: nothing lost, and a clean exit
                    assert on_victim == ["done"] * len(on_victim), outcomes
                    assert await trio.to_thread.run_sync(victim.wait) == 0
                    assert all(a.headers["x-served-by"] != victim_name for a in answers)
                else:  # killed: a broken stream, never one that looks finished or hangs
                    assert all(o == "done" or o.startswith("transport error") for o in on_victim), outcomes
                    assert any(o.startswith("transport error") for o in on_victim), outcomes
    finally:
        for p in procs:
            _stop(p)
