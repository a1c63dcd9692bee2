"""The chaos report: one JSON document, and the table ``mlxctl chaos`` prints from it."""

from __future__ import annotations

import math
import os
import platform
import time

from .. import __version__
from .invariants import RSS_MARGIN_FRACTION, RSS_MARGIN_MIB, Check

TARGETS = {
    "leaked_slots": 0,
    "stuck_requests": 0,
    "mismatched_survivor_outputs": 0,
    "overflow_503_p99_ms": 50,
    "violations": 0,
    "rss_margin": f"max({RSS_MARGIN_MIB} MiB, {int(RSS_MARGIN_FRACTION * 100)}% of baseline)",
}


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None without data."""
    if not values:
        return None
    v = sorted(values)
    return v[max(0, min(len(v), math.ceil(q / 100 * len(v))) - 1)]


def _ms_stats(values: list[float]) -> dict:
    ms = [1000 * v for v in values]
    return {
        "n": len(ms),
        "p50": _round(pct(ms, 50)),
        "p99": _round(pct(ms, 99)),
        "max": _round(max(ms) if ms else None),
    }


def _round(v):
    return None if v is None else round(v, 2)


def _add(into: dict[str, int], d: dict[str, int]) -> None:
    for k, v in d.items():
        into[k] = into.get(k, 0) + v


def build(ch, cfg, seconds: float, extra_checks: list[Check] = ()) -> dict:
    scenarios = []
    client: dict[str, int] = {}
    server: dict[str, int] = {}
    faults: dict[str, int] = {}
    cancel: list[float] = []
    probe: list[float] = []
    probe_by_phase: dict[str, list[float]] = {}
    overflow: list[float] = []
    requests = 0
    for r in ch.reports:
        requests += r.requests
        _add(client, r.client_disconnects)
        _add(server, r.server_cancels)
        _add(faults, r.faults)
        cancel += r.cancel_seconds
        for phase, vals in r.extra.get("disconnect_to_free_s", {}).items():
            probe_by_phase.setdefault(phase, []).extend(vals)
            probe += vals
        overflow += r.extra.get("overflow_503_s", [])
        scenarios.append(
            {
                "name": r.name,
                "seconds": round(r.seconds, 2),
                "requests": r.requests,
                "survivors": r.survivors,
                "client_disconnects": r.client_disconnects,
                "runtime_cancels": r.server_cancels,
                "faults": r.faults,
                "cancel_to_slot_free_ms": _ms_stats(r.cancel_seconds),
                "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in r.checks],
                "violations": len(r.violations),
                **(
                    {"rss_mib_every_100_disconnects": r.extra["rss_mib_every_100_disconnects"]}
                    if "rss_mib_every_100_disconnects" in r.extra
                    else {}
                ),
            }
        )
    violations = [{"scenario": r.name, "check": c.name, "detail": c.detail} for r in ch.reports for c in r.violations]
    violations += [{"scenario": "-", "check": c.name, "detail": c.detail} for c in extra_checks if not c.ok]
    by_phase = {
        "queued": server.get("queued", 0),
        "prefill": server.get("prefill", 0),
        "decode": server.get("decode", 0),
        "after_last_token": client.get("after_last", 0),
    }
    client_total = sum(client.values())
    runtime_total = sum(server.values())
    return {
        "mlxserve": __version__,
        "mode": "long" if cfg.long else "short",
        "seed": cfg.seed,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.system()} {platform.machine()}, {_cpus()} CPUs",
        # Other work on the machine shows in every latency figure: the 1/5/15-minute load.
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(seconds, 1),
        "settings": {
            "streams": cfg.streams,
            "num_parallel": cfg.num_parallel,
            "prefill_chunk": cfg.prefill_chunk,
            "overflow": {"num_parallel": 2, "max_queue": 4},
        },
        "baseline": {k: v.as_dict() for k, v in ch.baselines.items()},
        "scenarios": scenarios,
        "totals": {
            "scenarios": len(scenarios),
            "requests": requests,
            "disconnects": client_total,
            "disconnects_by_phase": by_phase,
            "client_disconnects": client,
            "runtime_cancels": server,
            # Client disconnects the runtime had nothing to cancel for: the request had already
            # finished (after the last token) or its client left before the request reached
            # a runner (before the load it waited for, counted in "queued").
            "disconnects_without_runtime_cancel": client_total - runtime_total,
            "faults_injected": faults,
            "cancel_to_slot_free_ms": _ms_stats(cancel),
            "disconnect_to_slot_free_ms": {
                **_ms_stats(probe),
                "by_phase": {k: _ms_stats(v) for k, v in probe_by_phase.items()},
            },
            "overflow_503_ms": _ms_stats(overflow),
        },
        "targets": TARGETS,
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in extra_checks],
        "violations": len(violations),
        "violation_list": violations,
    }


def _cpus() -> int:
    return os.cpu_count() or 0


def table(doc: dict) -> str:
    """The report as text: one row per scenario, then the totals."""
    rows = [("scenario", "secs", "reqs", "ok", "disconnects (client view)", "runtime cancels", "faults", "viol")]
    for s in doc["scenarios"]:
        rows.append(
            (
                s["name"],
                f"{s['seconds']:.1f}",
                str(s["requests"]),
                str(s["survivors"]),
                _kv(s["client_disconnects"]),
                _kv(s["runtime_cancels"]),
                _kv(s["faults"]),
                str(s["violations"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    t = doc["totals"]

    def ms(d: dict) -> str:
        if not d["n"]:
            return "n=0"
        return f"p50 {d['p50']:.2f} ms  p99 {d['p99']:.2f} ms  max {d['max']:.2f} ms  (n={d['n']})"

    lines += [
        "",
        f"mode {doc['mode']}, seed {doc['seed']}, {doc['seconds']:.0f} s on {doc['machine']} "
        f"(load average {' '.join(map(str, doc['load_average_at_end']))})",
        f"scenarios {t['scenarios']}   requests {t['requests']}   disconnects {t['disconnects']}",
        f"disconnects by phase: {_kv(t['disconnects_by_phase'])}",
        f"faults injected: {_kv(t['faults_injected'])}",
        f"cancel -> slot free (runtime):         {ms(t['cancel_to_slot_free_ms'])}",
        f"disconnect -> slot free (from outside): {ms(t['disconnect_to_slot_free_ms'])}",
        f"503 latency under queue overflow:       {ms(t['overflow_503_ms'])}",
        f"violations: {doc['violations']}",
    ]
    for v in doc["violation_list"]:
        lines.append(f"  VIOLATION [{v['scenario']}] {v['check']}: {v['detail']}")
    return "\n".join(lines)


def _kv(d: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items()) or "-"
