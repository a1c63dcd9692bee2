"""The chaos harness: builds a store, starts daemons, runs scenarios, checks invariants.

Two daemons run side by side, each a real ``mlxctl serve`` subprocess on its own port and its own
copy of the store:

- ``main``: the daemon under test (NUM_PARALLEL 8, small prefill chunks so prefill lasts long
  enough to be interrupted). Every scenario but ``overflow`` runs against it.
- ``ref``: computes solo reference answers (one request at a time, nothing else running there),
  and is the small-queue daemon of the ``overflow`` scenario (NUM_PARALLEL 2, MAX_QUEUE 4).
  A separate process, so its answers share no cache or batch with the daemon under test.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path
from typing import Awaitable, Callable

import attrs
import trio

from . import clients, invariants as inv
from .clients import Plan, Result, Template
from .daemon import DaemonProcess, mlxctl

MODELS = ("tiny:latest", "tiny-mlx:latest")
TINY, OTHER = MODELS
SHORT_TEXTS = (
    "Hello world",
    "The capital of France is",
    "Once upon a time",
    "def add(a, b):",
    'JSON: {"name":',
    "How are you today?",
    "Tell me a story about a small model.",
)
LONG_TEXT = "Once upon a time there was a small model that answered questions. " * 24
WARMUP_REQUESTS = 96


@attrs.frozen
class Config:
    long: bool = False
    seed: int = 7
    streams: int = 16  # concurrent clients in the disconnect storm
    storm_requests: int = 160  # short mode: requests in the storm
    storm_disconnects: int = 1000  # long mode: the storm runs until this many disconnects
    probe_rounds: int = 3  # per phase, in the phase probe
    fault_rounds: int = 1  # each fault_* scenario runs this many times (the runner must recover each time)
    overflow_requests: int = 40
    overflow_concurrency: int = 4  # rejected clients in flight at once during the burst
    # The target (p99 < 50 ms) is for the long mode; the short mode (CI, on a machine
    # that may be busy with other work) bounds it loosely, as a guard against stalls.
    overflow_p99_ms: float = 250.0
    num_parallel: int = 8
    prefill_chunk: int = 32
    # survivors_match_solo compares batched outputs with solo ones byte for byte. That holds on
    # the CPU; on a GPU a row's float32 result depends on the rows batched with it (TF32-class
    # GEMMs), so greedy text can differ. The daemons therefore run on the CPU unless asked.
    device: str = "cpu"
    scenarios: tuple[str, ...] = ()  # empty: all
    workdir: Path | None = None  # keep artefacts here (default: a temporary directory)

    @classmethod
    def for_mode(cls, long: bool, **kw) -> Config:
        if long:
            kw = {
                "storm_requests": 0,
                "probe_rounds": 10,
                "overflow_requests": 400,
                "overflow_p99_ms": 50.0,
                "fault_rounds": 5,
                **kw,
            }
        return cls(long=long, **kw)


@attrs.define
class Outcome:
    """What a scenario hands back for checking and reporting."""

    results: list[Result] = attrs.Factory(list)
    checks: list[inv.Check] = attrs.Factory(list)  # scenario-specific expectations
    faults: dict[str, int] = attrs.Factory(dict)
    allowed_5xx: frozenset[str] = frozenset()  # models whose requests may fail (a fault hit them)
    allow_503: bool = False
    daemon: str = "main"
    extra: dict = attrs.Factory(dict)


@attrs.define
class ScenarioReport:
    name: str
    seconds: float
    requests: int
    survivors: int
    client_disconnects: dict[str, int]
    server_cancels: dict[str, int]
    faults: dict[str, int]
    checks: list[inv.Check]
    cancel_seconds: list[float]
    extra: dict

    @property
    def violations(self) -> list[inv.Check]:
        return [c for c in self.checks if not c.ok]


class Chaos:
    def __init__(
        self,
        cfg: Config,
        workdir: Path,
        out: Callable[[str], None] = print,
        warmup_plan: Callable[[Chaos, random.Random], Plan] | None = None,
    ):
        self.cfg = cfg
        self.warmup_plan = warmup_plan  # the storm's client draw (scenarios.random_plan)
        self.workdir = workdir
        self.out = out
        self.rng = random.Random(cfg.seed)
        self.refs: dict[str, str] = {}
        self.ref_lock = trio.Lock()
        self.reports: list[ScenarioReport] = []
        self.baselines: dict[str, inv.Baseline] = {}
        self.threads_at_start: dict[str, int] = {}
        self.warmup_log: dict[str, list[range]] = {}  # request-log lines written by warm-ups
        self.main: DaemonProcess
        self.ref: DaemonProcess
        self.templates: list[Template] = []
        self.modelfile_dir = workdir / "src"

    # ------------------------------------------------------------------ setup

    def build_store(self) -> Path:
        """The tiny model as GGUF ('tiny') and as an mlx directory ('tiny-mlx'), created with
        ``mlxctl create --local`` as a user would."""
        from ..testing import tinymodel

        src = self.modelfile_dir
        src.mkdir(parents=True, exist_ok=True)
        gguf = tinymodel.write_gguf(src / "tiny.gguf")
        mlx_dir = tinymodel.write_mlx_dir(src / "tiny-mlx")
        store = self.workdir / "store-main"
        for old in (store, self.workdir / "store-ref"):  # a reused --workdir starts afresh
            shutil.rmtree(old, ignore_errors=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLXSERVE_")}
        env["MLXSERVE_MODELS"] = str(store)
        for name, source in (("tiny", gguf), ("tiny-mlx", mlx_dir)):
            mf = src / f"Modelfile.{name}"
            mf.write_text(f"FROM {source}\n")
            proc = mlxctl("create", name, "-f", str(mf), "--local", env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"mlxctl create {name} failed: {proc.stderr}")
        # The reference daemon gets a real copy, not hard links: a blob corrupted on purpose in
        # the main store must not corrupt the references.
        shutil.copytree(store, self.workdir / "store-ref", symlinks=True)
        return store

    def make_templates(self) -> None:
        rng = self.rng
        ts: list[Template] = []
        for route in clients.ROUTES:
            for sampling in ("greedy", "seeded"):
                for _ in range(2):
                    ts.append(
                        Template(
                            route,
                            TINY,
                            rng.choice(SHORT_TEXTS),
                            sampling,
                            rng.choice((24, 40, 64)),
                            seed=rng.randrange(1000),
                        )
                    )
            ts.append(Template(route, OTHER, rng.choice(SHORT_TEXTS), "greedy", rng.choice((24, 40))))
        for route in clients.ROUTES:  # structured outputs (a grammar constrains every token)
            ts.append(
                Template(
                    route,
                    TINY,
                    "Describe a thing as JSON.",
                    rng.choice(("greedy", "seeded")),
                    48,
                    seed=rng.randrange(1000),
                    schema=True,
                )
            )
        ts.append(Template("generate", TINY, LONG_TEXT, "greedy", 32))
        ts.append(Template("chat", TINY, LONG_TEXT, "seeded", 32, seed=11))
        ts.append(Template("openai", OTHER, "Hello world", "seeded", 32, seed=5))
        # Same key, same template: deduplicate.
        seen: dict[str, Template] = {}
        for t in ts:
            seen.setdefault(t.key, t)
        self.templates = list(seen.values())

    async def start(self) -> None:
        store = self.build_store()
        self.make_templates()
        cfg = self.cfg
        common = {
            "MLXSERVE_PREFILL_CHUNK": str(cfg.prefill_chunk),
            "MLXSERVE_KEEP_ALIVE": "-1",
            "MLXSERVE_DEVICE": cfg.device,
        }
        self.main = DaemonProcess("main", self.workdir, store, MLXSERVE_NUM_PARALLEL=str(cfg.num_parallel), **common)
        self.ref = DaemonProcess(
            "ref", self.workdir, self.workdir / "store-ref", MLXSERVE_NUM_PARALLEL="2", MLXSERVE_MAX_QUEUE="4", **common
        )
        async with trio.open_nursery() as n:
            # The create-kill fault seam is read by the store at each create; armed on the main
            # daemon from its start (nothing else creates models through it).
            n.start_soon(lambda: self.main.start(MLXSERVE_FAULT_CREATE_KILL_AFTER="blob"))
            n.start_soon(self.ref.start)
        for d in (self.main, self.ref):
            self.threads_at_start[d.name] = (await inv.snapshot(d))["threads"]
        async with trio.open_nursery() as n:
            n.start_soon(self.warm, self.main)
            n.start_soon(self.references, self.templates)
        await self.warm(self.ref)

    async def warm(self, d: DaemonProcess) -> None:
        """Load both models and run a warm-up round, then record the baseline at rest.

        The warm-up (``WARMUP_REQUESTS`` storm-like requests, disconnects included) fills what
        is bounded but starts empty: MLX's buffer cache, the prefix KV cache, the allocator's
        per-thread arenas. Resident memory grows by a one-off step there (about 75 MiB with the
        tiny model) and then stays flat; measured from a cold baseline, that step would hide
        a real leak of the same size, so the baseline is the warm daemon (the cold RSS is
        reported too)."""
        first_line = len(d.request_log())
        for model in MODELS:
            await self.load(d, model)
            res = await clients.run(
                d.host, d.port, Plan(Template("generate", model, "warm", "greedy", 8), stream=False, deadline=60)
            )
            if not res.survived:
                raise RuntimeError(f"warm-up on {d.name} failed: {res}")
        cold = d.rss_kib()
        rng = random.Random(self.cfg.seed + 1)
        if self.warmup_plan is not None:
            await self.run_plans(d, [self.warmup_plan(self, rng) for _ in range(WARMUP_REQUESTS)], concurrency=16)
        for model in MODELS:  # a warm-up client may have loaded something else; both must be in
            await self.load(d, model)
        self.baselines[d.name] = await inv.take_baseline(
            d, threads_before_load=self.threads_at_start[d.name], rss_cold_kib=cold
        )
        self.warmup_log.setdefault(d.name, []).append(range(first_line, len(d.request_log())))

    async def load(self, d: DaemonProcess, model: str) -> None:
        code, _, doc = await _post(d, "/api/generate", {"model": model})
        if code != 200:
            raise RuntimeError(f"preload of {model} on {d.name}: {code} {doc}")

    async def unload(self, d: DaemonProcess, model: str) -> None:
        code, _, doc = await _post(d, "/api/generate", {"model": model, "keep_alive": 0})
        if code != 200 or not await inv.unloaded(d, model):
            raise RuntimeError(f"unload of {model} on {d.name}: {code} {doc}")

    async def references(self, templates) -> None:
        """Solo answers on the reference daemon, one request at a time."""
        for t in templates:
            if t.key in self.refs:
                continue
            async with self.ref_lock:
                res = await clients.run(self.ref.host, self.ref.port, Plan(t, stream=False, deadline=120))
            if not res.survived:
                raise RuntimeError(f"reference run failed for {t.key[:60]}: {res.status} {res.error} {res.problems}")
            self.refs[t.key] = res.text

    async def stop(self) -> dict[str, int | None]:
        codes = {}
        for d in (getattr(self, "main", None), getattr(self, "ref", None)):
            if d is not None and d.proc is not None:
                codes[d.name] = await d.stop()
        return codes

    # ------------------------------------------------------------------ running scenarios

    def daemon(self, name: str) -> DaemonProcess:
        return self.main if name == "main" else self.ref

    async def run_plans(self, d: DaemonProcess, plans: list[Plan], *, concurrency: int) -> list[Result]:
        results: list[Result] = []
        limiter = trio.CapacityLimiter(concurrency)

        async def one(plan: Plan) -> None:
            async with limiter:
                results.append(await clients.run(d.host, d.port, plan))

        async with trio.open_nursery() as n:
            for plan in plans:
                n.start_soon(one, plan)
        return results

    async def scenario(self, name: str, fn: Callable[[Chaos], Awaitable[Outcome]]) -> ScenarioReport:
        self.out(f"-- {name}")
        marks = {d.name: len(d.request_log()) for d in (self.main, self.ref)}
        t0 = time.monotonic()
        try:
            outcome = await fn(self)
        except Exception as exc:  # a scenario that cannot finish is a violation, not the end of the run
            outcome = Outcome(
                checks=[inv.Check("scenario_completed", False, _describe(exc))],
                daemon="ref" if name.startswith("overflow") else "main",
            )
        d = self.daemon(outcome.daemon)
        # Survivors of requests without a precomputed reference get one now, solo, elsewhere.
        missing = {
            r.plan.template.key: r.plan.template
            for r in outcome.results
            if r.survived and r.plan.template.key not in self.refs and r.plan.action != "client_fault"
        }
        await self.references(list(missing.values()))
        if set(self.baselines[d.name].loaded) != set(MODELS):
            raise RuntimeError("baseline without both models loaded")
        refused = []
        for model in MODELS:  # the baseline had both models loaded: compare like with like
            try:
                await self.load(d, model)
            except (RuntimeError, OSError, trio.TooSlowError) as exc:
                refused.append(str(exc))
        snap, waited, _ = await inv.settle(d, self.baselines[d.name])
        checks = list(outcome.checks)
        checks.append(
            inv.Check("models_load_again", not refused, "both models load" if not refused else "; ".join(refused))
        )
        checks += inv.result_checks(
            outcome.results, self.refs, allowed_5xx_models=outcome.allowed_5xx, allow_503=outcome.allow_503
        )
        checks += inv.resource_checks(snap, self.baselines[d.name], waited, True)
        checks.append(await inv.liveness_check(d))
        log = [
            e
            for i, e in enumerate(d.request_log())
            if i >= marks.get(d.name, 0) and not any(i in r for r in self.warmup_log.get(d.name, ()))
        ]
        cancels = [e for e in log if e.get("event") == "cancel"]
        server: dict[str, int] = {}
        for e in cancels:
            phase = e.get("phase", "?")
            server[phase] = server.get(phase, 0) + 1
        client: dict[str, int] = {}
        for r in outcome.results:
            if r.disconnected:
                client[r.disconnected] = client.get(r.disconnected, 0) + 1
        fired = sum(1 for e in log if e.get("event") == "fault")
        if outcome.faults:
            want = sum(
                v for k, v in outcome.faults.items() if k in ("step_raise", "thread_die", "load_fail", "load_slow")
            )
            checks.append(
                inv.Check(
                    "faults_fired", fired == want, f"daemon reports {fired} fault(s) armed, harness injected {want}"
                )
            )
        rep = ScenarioReport(
            name=name,
            seconds=time.monotonic() - t0,
            requests=len(outcome.results),
            survivors=sum(1 for r in outcome.results if r.survived),
            client_disconnects=client,
            server_cancels=server,
            faults=dict(outcome.faults),
            checks=checks,
            cancel_seconds=[float(e["seconds"]) for e in cancels if e.get("waiting_for") != "load"],
            extra=outcome.extra,
        )
        for c in checks:
            if not c.ok:
                self.out(f"   VIOLATION {c.name}: {c.detail}")
        self.out(
            f"   {rep.requests} requests, {rep.survivors} survivors, disconnects {client}, "
            f"runtime cancels {server}, {len(rep.violations)} violation(s), {rep.seconds:.1f}s"
        )
        self.reports.append(rep)
        return rep


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{exc.__class__.__name__}: {exc}"


async def _post(d: DaemonProcess, path: str, body: dict, timeout: float = 60):
    from . import wire

    return await wire.request_json(d.host, d.port, "POST", path, body, timeout=timeout)
