"""Helpers the tests import by name (conftest modules are not importable reliably)."""

from __future__ import annotations

from pathlib import Path

import trio

TINY = "tiny:latest"


def on_gpu() -> bool:
    """Whether MLX computes on a GPU here. There float32 GEMMs run at TF32-class precision and a
    row's result depends on the rows batched with it (docs/nvidia.md, Limits); on the CPU it does not."""
    import mlx.core as mx

    return mx.default_device() != mx.cpu


def float_tol(cpu: float) -> float:
    """``cpu`` on the CPU, where float32 results do not depend on the batch; 1e-3 on a GPU."""
    return max(cpu, 1e-3) if on_gpu() else cpu


def make_settings(models_dir: Path, **overrides):
    from mlxserve.config import Settings

    base = dict(host="127.0.0.1", port=0, models_dir=models_dir, keep_alive=300.0)
    base.update(overrides)
    return Settings(**base)


class Daemon:
    def __init__(self, info, settings, shutdown: trio.Event):
        self.url = info.url
        self.runtime = info.runtime
        self.settings = settings
        self.shutdown = shutdown

    async def runner(self, name: str = TINY):
        return (await self.runtime.scheduler.runners())[name]


async def start_daemon(nursery: trio.Nursery, models_dir: Path, **overrides) -> Daemon:
    from mlxserve.http.server import run_daemon

    settings = make_settings(models_dir, **overrides)
    shutdown = trio.Event()
    info = await nursery.start(lambda task_status: run_daemon(settings, shutdown=shutdown, task_status=task_status))
    return Daemon(info, settings, shutdown)


def python_probe(code: str, env: dict[str, str]) -> dict:
    """Run ``code`` in a fresh interpreter (from the repository root, with ``env``); it prints
    one JSON line last, which is returned. For what is fixed per process (the BLAS, PATH)."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


async def leave_when(c, runner, method_body, predicate):
    """Send a request, wait (event-driven) until ``predicate`` holds on the runner, then leave."""
    path, body = method_body
    scope = trio.CancelScope()

    async def request():
        with scope:
            async with c.stream("POST", path, json=body) as r:
                async for _ in r.aiter_lines():
                    pass

    async with trio.open_nursery() as n:
        n.start_soon(request)
        await runner.wait_until(predicate)
        scope.cancel()
