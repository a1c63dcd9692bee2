"""``run_chaos``: the whole chaos run, every scenario against one set of daemons, and its report."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import trio

from . import invariants as inv, report, scenarios
from .harness import Chaos, Config


async def run_chaos(cfg: Config, out: Callable[[str], None] = print) -> dict:
    """Run every scenario (or ``cfg.scenarios``) and return the report (see report.py)."""
    own_tmp = cfg.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="mlxserve-chaos-")) if own_tmp else Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ch = Chaos(cfg, workdir, out, warmup_plan=scenarios.random_plan)
    t0 = time.monotonic()
    selected = [s for s in scenarios.ORDER if not cfg.scenarios or s in cfg.scenarios]
    exit_codes: dict = {}
    try:
        out(f"chaos: {'long' if cfg.long else 'short'} mode, seed {cfg.seed}, work dir {workdir}")
        await ch.start()
        out(f"   daemons up; {len(ch.refs)} solo references; baseline {ch.baselines['main'].as_dict()}")
        for name in selected:
            rounds = cfg.fault_rounds if name.startswith("fault_") else 1
            for i in range(rounds):
                await ch.scenario(name if rounds == 1 else f"{name}#{i + 1}", scenarios.ALL[name])
    finally:
        with trio.CancelScope(shield=True):
            exit_codes = await ch.stop()
    shutdown = inv.Check("clean_shutdown", all(c == 0 for c in exit_codes.values()), f"SIGTERM exit codes {exit_codes}")
    doc = report.build(ch, cfg, time.monotonic() - t0, extra_checks=[shutdown])
    if own_tmp and doc["violations"] == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        doc["workdir"] = str(workdir)
    return doc
