"""The chaos harness's short mode against real daemons (subprocesses), as CI runs it.

One run for the module (about 40 s on the 2-core CI machine): every scenario, then one test per
scenario on its named invariant checks, and one on the report itself.
"""

from __future__ import annotations

import json

import pytest
import trio

from mlxserve.chaos import report as chaos_report
from mlxserve.chaos.harness import Config
from mlxserve.chaos.scenarios import ORDER
from mlxserve.chaos.suite import run_chaos

RUN_LIMIT_S = 170  # the whole short mode, start-up and shutdown of both daemons included


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("chaos")
    lines: list[str] = []

    async def main() -> dict:
        with trio.fail_after(RUN_LIMIT_S):
            return await run_chaos(Config.for_mode(False, workdir=workdir), out=lines.append)

    doc = trio.run(main)
    (workdir / "report.json").write_text(json.dumps(doc, indent=2))
    print("\n".join(lines))
    print(chaos_report.table(doc))
    return doc


@pytest.mark.parametrize("name", ORDER)
def test_scenario_invariants_hold(report, name):
    scenario = next(s for s in report["scenarios"] if s["name"].split("#")[0] == name)
    bad = [c for c in scenario["checks"] if not c["ok"]]
    assert not bad, "\n".join(f"{c['name']}: {c['detail']}" for c in bad)


def test_every_phase_and_fault_is_exercised(report):
    t = report["totals"]
    assert all(n > 0 for n in t["disconnects_by_phase"].values()), t["disconnects_by_phase"]
    assert set(t["faults_injected"]) == {
        "step_raise",
        "thread_die",
        "load_fail",
        "load_slow",
        "blob_corrupt",
        "create_kill",
    }
    assert t["cancel_to_slot_free_ms"]["n"] > 0 and t["disconnect_to_slot_free_ms"]["n"] > 0
    assert t["overflow_503_ms"]["n"] == 40
    assert {c["name"]: c["ok"] for c in report["checks"]} == {"clean_shutdown": True}


def test_report_table_names_the_figures(report):
    text = chaos_report.table(report)
    for needle in ("disconnects by phase", "cancel -> slot free", "503 latency", "violations:"):
        assert needle in text
    assert len(report["scenarios"]) == len(ORDER)
