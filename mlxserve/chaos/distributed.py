"""The distributed scenario: a two-rank group (ring backend on 127.0.0.1) under the storm, then
one rank killed mid-stream.

The group serves the reference store's tiny model, rank 0 a daemon and rank 1 its follower,
started with the environment mlx.launch sets (mlx.launch itself stops every rank when one dies,
which would hide what rank 0 does). Survivors of the storm must equal the solo references byte
for byte, as on one rank; after the SIGKILL, every open stream must end with the group's error
within the watchdog's bound, rank 0 must keep answering and say the group is down.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import trio

from . import clients, wire
from .clients import Plan, Result, Template
from .daemon import BIN, DaemonProcess, free_port
from .harness import LONG_TEXT, TINY, Chaos, Outcome
from .invariants import Check

DIST_TIMEOUT_S = 3.0  # the group's watchdog bound (MLXSERVE_DIST_TIMEOUT)


async def distributed(ch: Chaos) -> Outcome:
    cfg = ch.cfg
    hosts = ch.workdir / "dist-hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{free_port()}"], [f"127.0.0.1:{free_port()}"]]))
    common = {
        "MLX_HOSTFILE": str(hosts),
        "MLXSERVE_DIST_TIMEOUT": str(DIST_TIMEOUT_S),
        "MLXSERVE_NUM_PARALLEL": str(cfg.num_parallel),
        "MLXSERVE_PREFILL_CHUNK": str(cfg.prefill_chunk),
        "MLXSERVE_KEEP_ALIVE": "-1",
        "MLXSERVE_DEVICE": cfg.device,
    }
    rank0 = DaemonProcess("dist-rank0", ch.workdir, ch.ref.models_dir, MLX_RANK="0", **common)
    rank0.port = free_port()
    log1 = open(ch.workdir / "dist-rank1.stderr", "wb")
    follower = await trio.lowlevel.open_process(
        [str(BIN / "mlxctl"), "serve"], env=rank0.env(MLX_RANK="1"), stdout=subprocess.DEVNULL, stderr=log1
    )
    log1.close()
    checks: list[Check] = []
    results: list[Result] = []
    try:
        await rank0.start(timeout=180)
        rng = random.Random(ch.rng.random())
        plans = []
        while len(plans) < max(cfg.storm_requests // 2, 16):
            plan = ch.warmup_plan(ch, rng)  # the storm's own draw (scenarios.random_plan)
            if plan.template.model == TINY:  # the group holds one model at a time
                plans.append(plan)
        ch.out(f"   two ranks up; storm of {len(plans)} requests")
        results = await ch.run_plans(rank0, plans, concurrency=cfg.streams)
        status = await rank0.status()
        group = status.get("group") or {}
        checks.append(
            Check(
                "group_up_after_storm",
                group.get("state") == "up" and group.get("ranks") == 2,
                f"/api/status group {group}",
            )
        )
        checks += await _fault_on_every_rank(ch, rank0)
        checks += await _kill_follower(rank0, follower)
    finally:
        with trio.CancelScope(shield=True):
            if follower.poll() is None:
                follower.kill()
            await follower.wait()
            code = await rank0.stop()
    checks.append(Check("rank0_clean_shutdown", code == 0, f"rank 0 exit code {code} on SIGTERM"))
    return Outcome(results, checks=checks, extra={"ranks": 2})


async def _fault_on_every_rank(ch: Chaos, rank0: DaemonProcess) -> list[Check]:
    """A step fault armed on rank 0 fails that step on every rank; unseeded sampling after it must
    keep the ranks in step (each reseeds alike), so the group stays up and serves."""
    await rank0.arm({"fault": "step_raise", "model": TINY})

    def body(i: int, options: dict) -> dict:
        return {"model": TINY, "prompt": f"[{i}] Once upon a time", "stream": False, "options": options}

    code, _, doc = await wire.request_json(
        rank0.host, rank0.port, "POST", "/api/generate", body(0, {"temperature": 0, "num_predict": 16}), timeout=60
    )
    hit = [(code, str(doc.get("error", "")))]
    statuses: list[int] = []

    async def unseeded(i: int) -> None:  # no seed: drawn from the generator every rank reseeded
        c, _, _ = await wire.request_json(
            rank0.host,
            rank0.port,
            "POST",
            "/api/generate",
            body(i, {"temperature": 0.9, "num_predict": 24}),
            timeout=60,
        )
        statuses.append(c)

    async with trio.open_nursery() as n:
        for i in range(1, 5):
            n.start_soon(unseeded, i)
    group = (await rank0.status()).get("group") or {}
    return [
        Check("step_fault_fails_cleanly", hit[0][0] == 500 and "injected fault" in hit[0][1], f"answer {hit[0]}"),
        Check(
            "ranks_in_step_after_fault",
            statuses == [200] * 4 and group.get("state") == "up",
            f"statuses {statuses}, group {group}",
        ),
    ]


async def _kill_follower(rank0: DaemonProcess, follower) -> list[Check]:
    """Four long streams; SIGKILL rank 1 once all four have text; each must end with an error."""
    long = Template("generate", TINY, LONG_TEXT, "greedy", 100_000)
    started = trio.Event()
    with_text: set[int] = set()

    def on_piece(res: Result) -> None:
        with_text.add(id(res))
        if len(with_text) == 4:
            started.set()

    ended: list[Result] = []
    t_kill = 0.0
    async with trio.open_nursery() as n:

        async def one() -> None:
            ended.append(await clients.run(rank0.host, rank0.port, Plan(long, deadline=60), on_piece))

        for _ in range(4):
            n.start_soon(one)
        with trio.move_on_after(60):
            await started.wait()
        t_kill = time.monotonic()
        os.kill(follower.pid, signal.SIGKILL)
    worst = max((r.t_end or time.monotonic()) - t_kill for r in ended)
    errors = [r.error or "" for r in ended]
    status = await rank0.status()
    group = status.get("group") or {}
    return [
        Check(
            "killed_rank_streams_fail_cleanly",
            all("distributed group failed" in e for e in errors) and not any(r.hung for r in ended),
            f"errors {sorted(set(errors))}",
        ),
        Check("killed_rank_bounded", worst < DIST_TIMEOUT_S + 5.0, f"last stream ended {worst:.2f}s after the kill"),
        Check(
            "rank0_up_after_kill",
            await rank0.version_ok() and group.get("state") == "down",
            f"/api/status group {group}",
        ),
    ]
