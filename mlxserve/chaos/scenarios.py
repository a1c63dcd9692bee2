"""The scenarios. Each drives clients (and faults) against a daemon and returns an Outcome;
the harness then settles the daemon and runs every invariant check (harness.Chaos.scenario).

Waiting is event-driven where the harness has an event (a client's first token, a client
returning); where only the daemon knows (its queue, its slots), it is bounded polling of
/api/status or /metrics (``daemon.wait_for``: at most a few seconds, every 1-2 ms).
"""

from __future__ import annotations

import functools
import json
import os
import random
import time
from pathlib import Path

import trio

from . import clients, wire
from .clients import CLIENT_FAULTS, Plan, Result, Template
from .daemon import BIN, DaemonProcess, mlxctl, wait_for
from .distributed import distributed
from .harness import LONG_TEXT, OTHER, SHORT_TEXTS, TINY, Chaos, Outcome
from .invariants import Check, snapshot, unloaded
from .report import pct

DEADLINE = 30.0  # no request in these scenarios needs more than a few seconds; 30 s is a hang


def _nonce(rng: random.Random) -> str:
    return f"[{rng.randrange(16**6):06x}] "


# ---------------------------------------------------------------------------- the storm


def random_plan(ch: Chaos, rng: random.Random) -> Plan:
    """One client of the storm: route, stream, sampling and fate all drawn at random."""
    if rng.random() < 0.06:
        return Plan(
            rng.choice(ch.templates),
            stream=False,
            action="client_fault",
            fault=rng.choice(sorted(CLIENT_FAULTS)),
            deadline=DEADLINE,
        )
    pool = [t for t in ch.templates if t.model == (TINY if rng.random() < 0.8 else OTHER)]
    t = rng.choice(pool)
    stream = rng.random() < 0.75
    reset = rng.random() < 0.5
    if not stream:
        if rng.random() < 0.5:
            return Plan(t, stream=False, deadline=DEADLINE)
        return Plan(t, stream=False, action="early", delay=rng.uniform(0.0, 0.4), reset=reset, deadline=DEADLINE)
    action = rng.choices(("complete", "early", "decode", "after_last", "slow"), (25, 20, 30, 10, 15))[0]
    match action:
        case "early":
            if rng.random() < 0.4:  # a long, never-seen prompt: its prefill takes many steps
                t = Template(t.route, TINY, _nonce(rng) + LONG_TEXT, "greedy", 24)
            return Plan(t, action="early", delay=rng.uniform(0.0, 0.3), reset=reset, deadline=DEADLINE)
        case "decode":
            return Plan(
                t,
                action="decode",
                after_tokens=rng.randint(1, max(1, t.num_predict * 3 // 4)),
                reset=reset,
                deadline=DEADLINE,
            )
        case "after_last":
            return Plan(t, action="after_last", reset=reset, deadline=DEADLINE)
        case "slow":
            return Plan(
                t, action="slow", stall_after=rng.randint(1, 4), stall_s=rng.uniform(0.1, 0.8), deadline=DEADLINE
            )
    return Plan(t, deadline=DEADLINE)


async def storm(ch: Chaos) -> Outcome:
    """``streams`` concurrent clients, each request with a random route, sampling and fate:
    complete, vanish (queued, prefilling, decoding, right after the last token), read slowly,
    or send something malformed. Short mode: a fixed number of requests; long mode: until the
    clients have vanished ``storm_disconnects`` times."""
    cfg = ch.cfg
    d = ch.main
    rng = random.Random(ch.rng.random())
    results: list[Result] = []
    issued = 0
    disconnects = 0
    rss = [round(d.rss_kib() / 1024, 1)]  # resident memory every 100 disconnects: a leak climbs

    def more() -> bool:
        return disconnects < cfg.storm_disconnects if cfg.long else issued < cfg.storm_requests

    async def worker() -> None:
        nonlocal issued, disconnects
        while more():
            issued += 1
            res = await clients.run(d.host, d.port, random_plan(ch, rng))
            results.append(res)
            if res.disconnected:
                disconnects += 1
                if disconnects % 100 == 0:
                    rss.append(round(d.rss_kib() / 1024, 1))
                    if cfg.long:
                        ch.out(f"   {disconnects} disconnects, {len(results)} requests, VmRSS {rss[-1]} MiB")

    async with trio.open_nursery() as n:
        for _ in range(cfg.streams):
            n.start_soon(worker)
    return Outcome(results, extra={"streams": cfg.streams, "rss_mib_every_100_disconnects": rss})


# ---------------------------------------------------------------------------- phase probes


async def _engine_state(d: DaemonProcess) -> tuple[float, float, float]:
    m = await d.metrics()

    def total(name: str) -> float:
        return sum(v for k, v in m.items() if k.startswith(name + "{"))

    return (total("mlxserve_running_sequences"), total("mlxserve_queue_depth"), total("mlxserve_engine_sequences"))


async def _time_to_free(d: DaemonProcess, res: Result, want: tuple[float, float, float]) -> float | None:
    """From the client's disconnect to the first /metrics poll that shows the slot free."""
    if res.t_disconnect is None:
        return None
    _, _, ok = await wait_for(lambda: _engine_state(d), lambda s: s == want, timeout=5.0, interval=0.001)
    return time.monotonic() - res.t_disconnect if ok else float("inf")


async def phases(ch: Chaos) -> Outcome:
    """One disconnect at a time, in each phase on purpose, timed from outside: from the
    client's close to /metrics showing the scheduler slot and the engine sequence gone."""
    d = ch.main
    rng = random.Random(ch.rng.random())
    results: list[Result] = []
    timings: dict[str, list[float]] = {"queued": [], "prefill": [], "decode": [], "after_last": []}
    checks: list[Check] = []
    npar = ch.cfg.num_parallel
    rounds = ch.cfg.probe_rounds
    short = [t for t in ch.templates if t.model == TINY and t.sampling == "greedy"]

    async def probe(phase: str, plan: Plan, want: tuple[float, float, float]) -> None:
        res = await clients.run(d.host, d.port, plan)
        results.append(res)
        lat = await _time_to_free(d, res, want)
        if lat is not None:
            timings[phase].append(lat)

    for _ in range(rounds):
        t = rng.choice(short)
        await probe(
            "decode",
            Plan(
                Template(t.route, TINY, t.text, "greedy", 1500),
                action="decode",
                after_tokens=rng.randint(1, 5),
                reset=rng.random() < 0.5,
                deadline=DEADLINE,
            ),
            (0, 0, 0),
        )
        await probe(
            "prefill",
            Plan(
                Template(rng.choice(clients.ROUTES), TINY, _nonce(rng) + LONG_TEXT * 2, "greedy", 64),
                action="at_head",
                deadline=DEADLINE,
            ),
            (0, 0, 0),
        )
        await probe("after_last", Plan(rng.choice(short), action="after_last", deadline=DEADLINE), (0, 0, 0))

    # Queued: every slot busy with a long stream, then a newcomer that leaves while it waits.
    hold = trio.Event()
    first = trio.Event()
    started: set[int] = set()

    def on_piece(res: Result) -> None:
        started.add(id(res))
        if len(started) == npar:
            first.set()

    blockers: list[Result] = []
    async with trio.open_nursery() as n:
        for i in range(npar):
            t = short[i % len(short)]
            plan = Plan(
                Template(t.route, TINY, t.text, "greedy", 1500),
                action="decode",
                after_tokens=1,
                hold=hold,
                deadline=DEADLINE * 2,
            )

            async def blocker(plan=plan) -> None:
                blockers.append(await clients.run(d.host, d.port, plan, on_piece))

            n.start_soon(blocker)
        with trio.fail_after(DEADLINE):
            await first.wait()
        for _ in range(rounds):
            await probe("queued", Plan(rng.choice(short), action="at_head", deadline=DEADLINE), (npar, 0, npar))
        hold.set()
    results += blockers
    checks.append(
        Check(
            "probes_measured",
            all(len(v) == rounds for v in timings.values())
            and all(x != float("inf") for v in timings.values() for x in v),
            "every probe saw its slot freed within 5 s: " + ", ".join(f"{k}={len(v)}" for k, v in timings.items()),
        )
    )
    return Outcome(results, checks, extra={"disconnect_to_free_s": timings})


# ---------------------------------------------------------------------------- injected faults


def _victims(ch: Chaos, n: int, num_predict: int = 600) -> list[Plan]:
    """Long greedy streams on the model a fault will hit."""
    return [
        Plan(
            Template(clients.ROUTES[i % 3], TINY, SHORT_TEXTS[i % len(SHORT_TEXTS)], "greedy", num_predict),
            deadline=DEADLINE,
        )
        for i in range(n)
    ]


def _others(ch: Chaos, n: int) -> list[Plan]:
    pool = [t for t in ch.templates if t.model == OTHER]
    return [Plan(pool[i % len(pool)], stream=i % 2 == 0, deadline=DEADLINE) for i in range(n)]


def _serve_again(ch: Chaos) -> list[Plan]:
    pool = [t for t in ch.templates if t.model == TINY and t.text != LONG_TEXT]
    return [Plan(pool[i % len(pool)], stream=i % 2 == 1, deadline=DEADLINE, tag="after") for i in range(3)]


def _clean_errors(victims: list[Result], needle: str) -> Check:
    bad = [r for r in victims if not (r.error and needle in r.error) and not r.survived]
    failed = [r for r in victims if r.error]
    return Check(
        "fault_fails_cleanly",
        not bad and bool(failed),
        f"{len(failed)}/{len(victims)} affected requests failed with an error naming "
        f"'{needle}'"
        + (
            f"; {len(bad)} did not: " + "; ".join(f"{r.status} {r.error!r} {r.problems[:1]}" for r in bad[:3])
            if bad
            else ""
        ),
    )


def _unaffected(others: list[Result], label: str = "the other model") -> Check:
    bad = [r for r in others if not r.survived]
    return Check(
        "others_unaffected",
        not bad,
        f"{len(others) - len(bad)}/{len(others)} requests to "
        f"{label} completed" + ("; " + "; ".join(f"{r.status} {r.error!r}" for r in bad[:3]) if bad else ""),
    )


def _served_again(after: list[Result]) -> Check:
    bad = [r for r in after if not r.survived]
    return Check(
        "serves_again",
        not bad,
        f"{len(after) - len(bad)}/{len(after)} requests after the fault "
        "completed" + ("; " + "; ".join(f"{r.status} {r.error!r}" for r in bad[:3]) if bad else ""),
    )


async def _engine_fault(ch: Chaos, fault: str, needle: str) -> Outcome:
    d = ch.main
    victims_plans = _victims(ch, 4)
    started: set[int] = set()
    all_started = trio.Event()

    def on_piece(res: Result) -> None:  # also called when a victim ends without a token
        started.add(id(res.plan))
        if len(started) == len(victims_plans):
            all_started.set()

    victims: list[Result] = []
    others: list[Result] = []
    crashed_before = (await d.metrics()).get('mlxserve_scheduler_events_total{event="runner_crashed"}', 0.0)
    async with trio.open_nursery() as n:
        for p in victims_plans:

            async def v(p=p) -> None:
                victims.append(await clients.run(d.host, d.port, p, on_piece))
                on_piece(victims[-1])

            n.start_soon(v)
        with trio.fail_after(DEADLINE):
            await all_started.wait()  # every victim is decoding (or already failed)
        for p in _others(ch, 4):

            async def o(p=p) -> None:
                others.append(await clients.run(d.host, d.port, p))

            n.start_soon(o)
        await d.arm({"fault": fault, "model": TINY})
    after = await ch.run_plans(d, _serve_again(ch), concurrency=3)
    checks = [_clean_errors(victims, needle), _unaffected(others), _served_again(after)]
    if fault == "thread_die":
        crashed = (await d.metrics()).get('mlxserve_scheduler_events_total{event="runner_crashed"}', 0.0)
        checks.append(
            Check(
                "crash_seen_by_scheduler",
                crashed == crashed_before + 1,
                f"runner_crashed events {crashed_before:.0f} -> {crashed:.0f}",
            )
        )
    return Outcome(victims + others + after, checks, faults={fault: 1}, allowed_5xx=frozenset({TINY}))


async def fault_step_raise(ch: Chaos) -> Outcome:
    """A runner step raises mid-decode: that batch's requests end with an error line, the other
    model's requests go on, and the same runner serves the next requests."""
    return await _engine_fault(ch, "step_raise", "injected fault")


async def fault_thread_die(ch: Chaos) -> Outcome:
    """The engine thread of one model dies mid-decode: its requests fail cleanly, the other
    model is untouched, and the Scheduler loads it again for the next request."""
    return await _engine_fault(ch, "thread_die", "injected fault")


async def fault_load_fail(ch: Chaos) -> Outcome:
    """A load fails: requests waiting for it get a clean error; the next load succeeds."""
    d = ch.main
    await ch.unload(d, TINY)
    await d.arm({"fault": "load_fail", "model": TINY})
    plans = [Plan(t.template, stream=i != 1, deadline=DEADLINE) for i, t in enumerate(_serve_again(ch))]
    victims, others = await _victims_and_others(d, plans, _others(ch, 3))
    after = await ch.run_plans(d, _serve_again(ch), concurrency=3)
    checks = [_clean_errors(victims, "injected fault"), _unaffected(others), _served_again(after)]
    return Outcome(victims + others + after, checks, faults={"load_fail": 1}, allowed_5xx=frozenset({TINY}))


async def _victims_and_others(d, victim_plans, other_plans) -> tuple[list[Result], list[Result]]:
    """Run the requests a fault should hit and the bystanders it must not, all at once."""
    victims: list[Result] = []
    others: list[Result] = []

    async def one(plan, into: list[Result]) -> None:
        into.append(await clients.run(d.host, d.port, plan))

    async with trio.open_nursery() as n:
        for p in victim_plans:
            n.start_soon(one, p, victims)
        for p in other_plans:
            n.start_soon(one, p, others)
    return victims, others


async def fault_load_slow(ch: Chaos) -> Outcome:
    """A slow load: requests that leave while waiting for it are dropped from the queue, the
    ones that wait get their answer, and the other (loaded) model is served meanwhile."""
    d = ch.main
    seconds = 1.5
    await ch.unload(d, TINY)
    await d.arm({"fault": "load_slow", "model": TINY, "seconds": seconds})
    waiting = _serve_again(ch)[:2]
    leaving = [
        Plan(p.template, action="early", delay=0.3, reset=i == 0, deadline=DEADLINE)
        for i, p in enumerate(_serve_again(ch)[:2])
    ]
    t0 = time.monotonic()
    victims, others = await _victims_and_others(d, waiting + leaving, _others(ch, 3))
    waited = [r for r in victims if r.plan.action == "complete"]
    left = [r for r in victims if r.plan.action == "early"]
    checks = [
        Check(
            "waiters_answered",
            all(r.survived for r in waited),
            f"{sum(r.survived for r in waited)}/{len(waited)} requests that waited for the slow load completed",
        ),
        Check(
            "leavers_left_while_loading",
            all(r.disconnected == "before_response" for r in left),
            f"{sum(r.disconnected == 'before_response' for r in left)}/{len(left)} left before the load ended",
        ),
        _unaffected(others),
        Check(
            "others_not_blocked_by_load",
            all(r.t_end - t0 < seconds for r in others),
            "the other model answered during the slow load: " + ", ".join(f"{r.t_end - t0:.2f}s" for r in others),
        ),
    ]
    return Outcome(victims + others, checks, faults={"load_slow": 1})


def _gguf_blob(store: Path, model: str = "tiny") -> Path:
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / model / "latest"
    doc = json.loads(manifest.read_bytes())
    layer = next(l for l in doc["layers"] if "gguf" in l["mediaType"] or l["mediaType"].endswith(".model"))
    return store / "blobs" / layer["digest"].replace(":", "-")


async def blob_corrupt(ch: Chaos) -> Outcome:
    """One byte of a model's weights flipped on disk before a load: the load is refused with a
    409 naming the blob, other models are served, ``mlxctl verify`` reports it; once the byte is
    back, the model loads and answers again."""
    d = ch.main
    await ch.unload(d, TINY)
    blob = _gguf_blob(d.models_dir)
    digest = blob.name.replace("-", ":", 1)
    with open(blob, "r+b") as f:
        f.seek(os.path.getsize(blob) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    try:
        victims, others = await _victims_and_others(d, _serve_again(ch), _others(ch, 3))
        env = {**d.env(), "MLXSERVE_MODELS": str(d.models_dir)}
        bad = await trio.to_thread.run_sync(lambda: mlxctl("verify", env=env))
    finally:
        with open(blob, "r+b") as f:
            f.seek(os.path.getsize(blob) // 2)
            f.write(byte)
    after = await ch.run_plans(d, _serve_again(ch), concurrency=3)
    good = await trio.to_thread.run_sync(lambda: mlxctl("verify", env=env))
    refused = [r for r in victims if r.status == 409 and r.error and digest in r.error]
    checks = [
        Check(
            "integrity_409_names_blob",
            len(refused) == len(victims),
            f"{len(refused)}/{len(victims)} got 409 naming {digest[:19]}…"
            + (
                ""
                if len(refused) == len(victims)
                else "; got " + "; ".join(f"{r.status} {r.error!r}" for r in victims if r not in refused)[:300]
            ),
        ),
        Check(
            "verify_reports_damage",
            bad.returncode == 1 and digest[:19] in bad.stdout,
            f"mlxctl verify exit {bad.returncode}: {bad.stdout.strip().splitlines()[-1] if bad.stdout else bad.stderr[-200:]}",
        ),
        Check(
            "store_verifies_clean",
            good.returncode == 0,
            f"mlxctl verify after repair: exit {good.returncode} {good.stdout.strip().splitlines()[-1:]}",
        ),
        _unaffected(others),
        _served_again(after),
    ]
    return Outcome(victims + others + after, checks, faults={"blob_corrupt": 1})


# ---------------------------------------------------------------------------- queue overflow


async def overflow(ch: Chaos) -> Outcome:
    """NUM_PARALLEL 2, MAX_QUEUE 4: with both slots and the whole queue taken, every further
    request is answered 503 with Retry-After at once; the queued ones are then served.

    In waves of ``OVERFLOW_WAVE`` rejected requests, each against a freshly filled queue, checked
    full before and after the wave: a blocker's whole answer fits in the kernel's socket buffers,
    so even a client that never reads frees its slot once the engine has generated it all."""
    d = ch.ref
    rng = random.Random(ch.rng.random())
    short = [t for t in ch.templates if t.model == TINY and t.text != LONG_TEXT]
    held: list[Result] = []
    burst: list[Result] = []
    not_full: list[str] = []
    waves = max(1, ch.cfg.overflow_requests // OVERFLOW_WAVE)
    async with ch.ref_lock:
        for wave in range(waves):
            n_wave = min(OVERFLOW_WAVE, ch.cfg.overflow_requests - wave * OVERFLOW_WAVE)
            await _overflow_wave(ch, d, rng, short, n_wave, held, burst, not_full)
    lat = [r.latency for r in burst if r.status == 503 and r.latency is not None]
    rejected = [r for r in burst if r.status == 503 and "retry-after" in r.headers and r.error]
    p99 = pct(lat, 99)
    completed = [r for r in held if r.plan.action == "complete"]
    checks = [
        Check(
            "queue_full_during_burst",
            not not_full,
            f"{waves - len(not_full)}/{waves} waves ran against a full queue (running 2, queued 4)"
            + (f"; not: {'; '.join(not_full[:3])}" if not_full else ""),
        ),
        Check(
            "overflow_all_503",
            len(rejected) == len(burst),
            f"{len(rejected)}/{len(burst)} answered 503 with Retry-After and an error body",
        ),
        Check(
            "overflow_503_p99",
            p99 is not None and p99 * 1000 < ch.cfg.overflow_p99_ms,
            f"p50 {1000 * (pct(lat, 50) or 0):.1f} ms, p99 {1000 * (p99 or 0):.1f} ms over {len(lat)} "
            f"({ch.cfg.overflow_concurrency} at a time; target p99 < {ch.cfg.overflow_p99_ms:.0f} ms)",
        ),
        Check(
            "queued_served_after_overflow",
            all(r.survived for r in completed),
            f"{sum(r.survived for r in completed)}/{len(completed)} queued requests completed",
        ),
    ]
    return Outcome(
        held + burst,
        checks,
        daemon="ref",
        allow_503=True,
        extra={"overflow_503_s": lat, "overflow_requests": len(burst)},
    )


OVERFLOW_WAVE = 40


async def _overflow_wave(
    ch: Chaos,
    d: DaemonProcess,
    rng: random.Random,
    short: list[Template],
    n_wave: int,
    held: list[Result],
    burst: list[Result],
    not_full: list[str],
) -> None:
    hold = trio.Event()
    started = trio.Event()
    firsts: set[int] = set()

    def on_piece(res: Result) -> None:
        firsts.add(id(res))
        if len(firsts) == 2:
            started.set()

    async with trio.open_nursery() as n:
        for i in range(2):  # both slots: long streams that leave once the wave is over
            plan = Plan(
                Template(clients.ROUTES[i], TINY, short[i].text, "greedy", 1900),
                action="decode",
                after_tokens=1,
                hold=hold,
                deadline=DEADLINE * 2,
            )

            async def blocker(plan=plan) -> None:
                held.append(await clients.run(d.host, d.port, plan, on_piece))

            n.start_soon(blocker)
        with trio.fail_after(DEADLINE):
            await started.wait()
        for i in range(4):  # the whole queue: two leave while queued, two wait and complete
            if i < 2:
                plan = Plan(rng.choice(short), action="at_head", hold=hold, deadline=DEADLINE * 2)
            else:
                plan = Plan(short[(i + 2) % len(short)], deadline=DEADLINE * 2)

            async def queued(plan=plan) -> None:
                held.append(await clients.run(d.host, d.port, plan))

            n.start_soon(queued)
        _, _, full = await wait_for(d.status, lambda s: s["running"] == 2 and s["queued"] == 4, timeout=10)
        plans = [Plan(rng.choice(short), stream=rng.random() < 0.5, deadline=DEADLINE) for _ in range(n_wave)]
        burst += await ch.run_plans(d, plans, concurrency=ch.cfg.overflow_concurrency)
        after = await d.status()
        if not full or after["running"] != 2 or after["queued"] != 4:
            not_full.append(
                f"before: {'full' if full else 'NOT full'}, after: running={after['running']} queued={after['queued']}"
            )
        hold.set()


# ---------------------------------------------------------------------------- crash during create


async def kill_during_create(ch: Chaos) -> Outcome:
    """The daemon is SIGKILLed in the middle of ``mlxctl create`` (store fault seam
    MLXSERVE_FAULT_CREATE_KILL_AFTER): restarted, the store verifies clean with no orphan blob,
    the half-created model does not exist, creating it again works and everything answers."""
    d = ch.main
    store = d.models_dir
    stages = ["blob", "before_manifest"] if ch.cfg.long else ["blob"]
    mf = ch.modelfile_dir / "Modelfile.chaos"
    checks: list[Check] = []
    for i, stage in enumerate(stages):
        mf.write_text(f"FROM tiny\nSYSTEM chaos run {ch.rng.randrange(10**9)}\n")
        env = d.env()
        proc = await trio.run_process(
            [str(BIN / "mlxctl"), "create", "chaos-new", "-f", str(mf)],
            env=env,
            check=False,
            capture_stdout=True,
            capture_stderr=True,
        )
        code = await d.wait_exit(30)
        offline = {**env, "MLXSERVE_MODELS": str(store)}
        verify = await trio.to_thread.run_sync(functools.partial(mlxctl, "verify", env=offline))
        absent = not (store / "manifests" / "registry.ollama.ai" / "library" / "chaos-new").exists()
        checks += [
            Check(
                f"killed_during_create[{stage}]",
                code == -9 and proc.returncode != 0,
                f"daemon exit {code}, mlxctl create exit {proc.returncode}",
            ),
            Check(
                f"store_verifies_after_kill[{stage}]",
                verify.returncode == 0,
                f"mlxctl verify: exit {verify.returncode} {verify.stdout.strip().splitlines()[-1:]}",
            ),
            Check(f"half_created_model_absent[{stage}]", absent, "no manifest for chaos-new"),
        ]
        nxt = {"MLXSERVE_FAULT_CREATE_KILL_AFTER": stages[i + 1]} if i + 1 < len(stages) else {}
        await d.start(**nxt)
        ch.threads_at_start["main"] = (await snapshot(d))["threads"]
        refs = _referenced(store)
        blobs = {p.name.replace("-", ":", 1) for p in (store / "blobs").iterdir()}
        leftovers = list((store / "tmp").iterdir())
        checks.append(
            Check(
                f"no_orphans_after_restart[{stage}]",
                blobs == refs and not leftovers,
                f"{len(blobs - refs)} orphan blob(s), {len(refs - blobs)} missing, {len(leftovers)} temp file(s)",
            )
        )
        await ch.warm(d)  # a new process: a new baseline
    proc = await trio.run_process(
        [str(BIN / "mlxctl"), "create", "chaos-new", "-f", str(mf)],
        env=d.env(),
        check=False,
        capture_stdout=True,
        capture_stderr=True,
    )
    answer = await clients.run(
        d.host, d.port, Plan(Template("generate", "chaos-new", "Hi", "greedy", 8), stream=False, deadline=DEADLINE)
    )
    code, _, _ = await wire.request_json(
        d.host, d.port, "POST", "/api/generate", {"model": "chaos-new", "keep_alive": 0}
    )
    await unloaded(d, "chaos-new:latest")
    verify = await trio.to_thread.run_sync(lambda: mlxctl("verify", env={**d.env(), "MLXSERVE_MODELS": str(store)}))
    after = await ch.run_plans(d, _serve_again(ch) + _others(ch, 2), concurrency=3)
    checks += [
        Check(
            "create_again_succeeds",
            proc.returncode == 0 and answer.survived,
            f"mlxctl create exit {proc.returncode}; chaos-new answered {answer.status}",
        ),
        Check(
            "store_verifies_clean",
            verify.returncode == 0,
            f"mlxctl verify: exit {verify.returncode} {verify.stdout.strip().splitlines()[-1:]}",
        ),
        _served_again(after),
    ]
    return Outcome(after, checks, faults={"create_kill": len(stages)})


def _referenced(store: Path) -> set[str]:
    refs: set[str] = set()
    for path in (store / "manifests").glob("*/*/*/*"):
        doc = json.loads(path.read_bytes())
        refs.add(doc["config"]["digest"])
        refs.update(l["digest"] for l in doc["layers"])
    return refs


ALL = {
    "storm": storm,
    "phases": phases,
    "fault_step_raise": fault_step_raise,
    "fault_thread_die": fault_thread_die,
    "fault_load_fail": fault_load_fail,
    "fault_load_slow": fault_load_slow,
    "blob_corrupt": blob_corrupt,
    "overflow": overflow,
    "kill_during_create": kill_during_create,
    "distributed": distributed,
}
ORDER = tuple(ALL)
