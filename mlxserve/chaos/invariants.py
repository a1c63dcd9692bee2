"""Named invariant checks, run after every scenario against the daemon and the clients' results.

Each check returns a ``Check``; a failed one is a violation. The daemon is observed from outside:
/api/status and /metrics over HTTP, OS threads and resident memory through /proc.
"""

from __future__ import annotations

import math
from typing import Iterable

import attrs

from .clients import CLIENT_FAULTS, Result
from .daemon import TRIO_WORKER, DaemonProcess, wait_for

RSS_MARGIN_MIB = 64  # resident memory may grow this much over the baseline (MLX buffer cache, prefix KV)
RSS_MARGIN_FRACTION = 0.25  # ...or this fraction of it, whichever is larger
TRIO_WORKER_CAP = 40  # trio's default thread limiter: its cached worker threads stay under this
SETTLE_S = 15.0  # how long a daemon may take to get back to idle once every client has gone


@attrs.frozen
class Check:
    name: str
    ok: bool
    detail: str = ""


@attrs.frozen
class Baseline:
    """The daemon at rest with its models loaded and warm, to compare each scenario's end with."""

    threads: int  # OS threads other than trio's cached workers
    hosts: int  # engine host threads (each carries MLX's per-thread stream threads)
    per_host: int  # OS threads one more engine host brings (measured at start-up)
    tasks: int  # live trio tasks
    rss_kib: int  # after the warm-up round
    loaded: tuple[str, ...]
    rss_cold_kib: int = 0  # models loaded, before the warm-up round

    def as_dict(self) -> dict:
        return attrs.asdict(self)


def _metric(m: dict[str, float], name: str, **labels: str) -> float:
    if labels:
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        return m.get(f"{name}{{{want}}}", 0.0)
    return m.get(name, 0.0)


def _sum(m: dict[str, float], name: str) -> float:
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def hosts_of(m: dict[str, float]) -> int:
    return int(
        _metric(m, "mlxserve_engine_host_threads", state="busy")
        + _metric(m, "mlxserve_engine_host_threads", state="idle")
    )


async def snapshot(d: DaemonProcess) -> dict:
    status = await d.status()
    m = await d.metrics()
    threads = d.threads()
    return {
        "running": status["running"],
        "queued": status["queued"],
        "loaded": status["loaded"],
        "models": {x["name"]: x for x in status["models"]},
        "engine_sequences": _sum(m, "mlxserve_engine_sequences"),
        "tasks": int(_metric(m, "mlxserve_trio_tasks")),
        "hosts": hosts_of(m),
        "threads": sum(n for k, n in threads.items() if k != TRIO_WORKER),
        "trio_workers": threads.get(TRIO_WORKER, 0),
        "rss_kib": d.rss_kib(),
        "metrics": m,
    }


async def take_baseline(d: DaemonProcess, *, threads_before_load: int, rss_cold_kib: int = 0) -> Baseline:
    """Call with the models loaded and warm and no client connected."""
    s, _, _ = await wait_for(
        lambda: snapshot(d),
        lambda s: s["running"] == 0 and s["queued"] == 0 and s["engine_sequences"] == 0,
        timeout=SETTLE_S,
    )
    hosts = max(1, s["hosts"])
    per_host = max(1, math.ceil((s["threads"] - threads_before_load) / hosts))
    return Baseline(
        s["threads"],
        s["hosts"],
        per_host,
        s["tasks"],
        s["rss_kib"],
        tuple(sorted(n for n, x in s["models"].items() if x.get("loaded"))),
        rss_cold_kib,
    )


async def settle(d: DaemonProcess, base: Baseline) -> tuple[dict, float, bool]:
    """Bounded wait until the daemon is idle again: no running, queued or engine sequence, and
    no more trio tasks than at rest (tasks of closed connections end a moment after them)."""
    return await wait_for(
        lambda: snapshot(d),
        lambda s: s["running"] == 0 and s["queued"] == 0 and s["engine_sequences"] == 0 and s["tasks"] <= base.tasks,
        timeout=SETTLE_S,
    )


def resource_checks(s: dict, base: Baseline, settled_s: float, settled: bool) -> list[Check]:
    out = [
        Check(
            "slots_released",
            s["running"] == 0 and s["queued"] == 0,
            f"/api/status running={s['running']} queued={s['queued']} after {settled_s:.2f}s",
        ),
        Check("engine_batches_empty", s["engine_sequences"] == 0, f"engine sequences={s['engine_sequences']:.0f}"),
        Check("no_leaked_trio_tasks", s["tasks"] <= base.tasks, f"trio tasks {s['tasks']} (baseline {base.tasks})"),
    ]
    allowed = base.threads + base.per_host * max(0, s["hosts"] - base.hosts)
    out.append(
        Check(
            "no_leaked_os_threads",
            s["threads"] <= allowed and s["trio_workers"] <= TRIO_WORKER_CAP,
            f"OS threads {s['threads']} (baseline {base.threads}; engine hosts {s['hosts']} vs "
            f"{base.hosts}, {base.per_host} threads each; allowed {allowed}); trio workers "
            f"{s['trio_workers']} (cap {TRIO_WORKER_CAP})",
        )
    )
    margin = max(RSS_MARGIN_MIB * 1024, int(base.rss_kib * RSS_MARGIN_FRACTION))
    out.append(
        Check(
            "rss_within_margin",
            s["rss_kib"] <= base.rss_kib + margin,
            f"VmRSS {s['rss_kib'] / 1024:.0f} MiB (baseline {base.rss_kib / 1024:.0f} MiB, "
            f"margin {margin / 1024:.0f} MiB)",
        )
    )
    return out


def result_checks(
    results: Iterable[Result],
    refs: dict[str, str],
    *,
    allowed_5xx_models: frozenset[str] = frozenset(),
    allow_503: bool = False,
) -> list[Check]:
    """Output and error invariants over every client's result."""
    results = list(results)
    mismatched, unreferenced, bad_prefix, malformed, wrong_status, hung = [], [], [], [], [], []
    for r in results:
        t = r.plan.template
        if r.hung:
            hung.append(
                f"{r.plan.action} {t.route} {'stream' if r.plan.stream else 'plain'} "
                f"status={r.status} deadline={r.plan.deadline}s"
            )
            continue
        for p in r.problems:
            malformed.append(f"{t.route}/{r.plan.action}: {p}")
        if r.plan.action == "client_fault":
            want = CLIENT_FAULTS[r.plan.fault]
            if r.status != want:
                wrong_status.append(f"client fault {r.plan.fault}: {r.status} (want {want}) {r.error!r}")
            continue
        if (
            r.status is not None
            and r.status >= 500
            and t.model not in allowed_5xx_models
            and not (r.status == 503 and allow_503)
        ):
            wrong_status.append(f"{r.status} on {t.route} for {t.model}: {r.error!r}")
        if r.error is not None and r.status == 200 and t.model not in allowed_5xx_models:
            wrong_status.append(f"stream failed on {t.route} for {t.model}: {r.error!r}")
        ref = refs.get(t.key)
        if r.survived:
            if ref is None:
                unreferenced.append(t.key[:60])
            elif r.text != ref:
                mismatched.append(
                    f"{t.route}/{t.sampling}/{t.model} {r.plan.action}: got {r.text[:40]!r}... "
                    f"want {ref[:40]!r}... (lengths {len(r.text)} vs {len(ref)})"
                )
        elif r.disconnected and ref is not None and r.error is None and not ref.startswith(r.text):
            bad_prefix.append(
                f"{t.route}/{t.sampling} left in {r.disconnected}: {r.text[:40]!r} is not a prefix of {ref[:40]!r}"
            )
    survivors = sum(1 for r in results if r.survived)
    return [
        Check(
            "survivors_match_solo",
            not mismatched and not unreferenced,
            f"{survivors} survivors; {len(mismatched)} mismatched; {len(unreferenced)} without a reference"
            + ("; " + " | ".join((mismatched + unreferenced)[:3]) if mismatched or unreferenced else ""),
        ),
        Check(
            "partial_outputs_are_prefixes",
            not bad_prefix,
            f"{len(bad_prefix)} bad" + ("; " + " | ".join(bad_prefix[:3]) if bad_prefix else ""),
        ),
        Check(
            "errors_well_formed",
            not malformed and not wrong_status,
            f"{len(malformed)} malformed, {len(wrong_status)} wrong status"
            + ("; " + " | ".join((malformed + wrong_status)[:4]) if malformed or wrong_status else ""),
        ),
        Check(
            "nothing_hangs",
            not hung,
            f"{len(hung)} past their deadline" + ("; " + " | ".join(hung[:3]) if hung else ""),
        ),
    ]


async def liveness_check(d: DaemonProcess) -> Check:
    ok = d.alive() and await d.version_ok()
    return Check("daemon_answers_version", ok, "GET /api/version" + (" ok" if ok else " FAILED"))


async def unloaded(d: DaemonProcess, model: str, timeout: float = 10.0) -> bool:
    _, _, ok = await wait_for(
        lambda: d.status(), lambda s: not any(m["name"] == model and m["loaded"] for m in s["models"]), timeout=timeout
    )
    return ok
