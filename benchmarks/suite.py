"""The benchmark suite, side by side in one run: prints tables, writes JSON, renders PNG plots.

    .venv/bin/python benchmarks/suite.py [--quick] [--out benchmarks/results/suite]

1. overhead: single-stream decode, raw engine vs served over HTTP (overhead.py)
2. concurrency: aggregate decode tok/s and TTFT at 1/4/8/16 streams, mlxserve vs mlx_lm.server
3. prefix cache: TTFT of a request sharing a ~1k-token system prompt with an earlier one vs cold
4. cancellation: client disconnect to slot free (measured inside the daemon's runtime)
5. memory and load time: RSS of an idle daemon, with the model loaded and after its unload; load time
Run by hand (never as a test); needs `pip install matplotlib` for the plots.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from mlxserve.engine.cpu.bootstrap import setup_backend  # noqa: E402

BACKEND = setup_backend()

import httpx  # noqa: E402
import trio  # noqa: E402

import concurrency  # noqa: E402
import overhead  # noqa: E402

SYSTEM = " ".join(f"Rule {i}: answer politely, briefly and truthfully about topic number {i}." for i in range(70))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def prefix_and_cancel(url: str, pid: int, model: str) -> dict:
    out: dict = {}
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        out["rss_idle_mb"] = rss_mb(pid)
        t0 = time.perf_counter()
        await c.post("/api/generate", json={"model": model})
        out["load_s"] = time.perf_counter() - t0
        out["rss_loaded_mb"] = rss_mb(pid)

        async def ttft(question: str) -> tuple[float, int]:
            body = {"model": model, "stream": True, "options": {"temperature": 0, "num_predict": 4},
                    "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]}
            t = time.perf_counter()
            first = None
            async with c.stream("POST", "/api/chat", json=body) as r:
                async for line in r.aiter_lines():
                    obj = json.loads(line) if line.strip() else {}
                    if first is None and obj.get("message", {}).get("content"):
                        first = time.perf_counter() - t
                    if obj.get("done"):
                        return first or time.perf_counter() - t, obj["prompt_eval_count"]
            return float("nan"), 0

        cold, n_prompt = await ttft("What is rule 3 about?")
        warm, _ = await ttft("What is rule 5 about?")
        out.update(prefix_prompt_tokens=n_prompt, ttft_cold_s=cold, ttft_warm_s=warm, prefix_ratio=warm / cold)

        # Cancellation: leave mid-stream, then time until /api/status shows the slot free.
        lat = []
        for _ in range(5):
            body = {"model": model, "prompt": "Count from one to a thousand.", "options": {"num_predict": 500}}
            async with c.stream("POST", "/api/generate", json=body) as r:
                async for line in r.aiter_lines():
                    if line.strip():
                        break
            t = time.perf_counter()
            while (await c.get("/api/status")).json()["running"]:
                await trio.sleep(0.002)  # another process: bounded polling is the only view
            lat.append(time.perf_counter() - t)
        out["cancel_to_free_ms_p50"] = statistics.median(lat) * 1000
        out["cancel_to_free_ms_max"] = max(lat) * 1000

        # Unload: the runner lets go of the model after /api/ps stops listing it, so wait for
        # the RSS to settle (another process: bounded polling is the only view).
        await c.post("/api/generate", json={"model": model, "keep_alive": 0})
        last, t = rss_mb(pid), time.perf_counter()
        while time.perf_counter() - t < 10:
            await trio.sleep(0.25)
            now = rss_mb(pid)
            if abs(now - last) < 1 and not (await c.get("/api/ps")).json()["models"]:
                break
            last = now
        out["rss_unloaded_mb"] = rss_mb(pid)
    return out


async def daemon_measures(model_dir: Path) -> dict:
    store = Path(tempfile.mkdtemp(prefix="mlxserve-suite-"))
    proc, url = concurrency.start_mlxserve(model_dir, store)
    try:
        await concurrency.wait_up(url + "/api/version", proc)
        return await prefix_and_cancel(url, proc.pid, "bench")
    finally:
        concurrency.stop_process(proc)


def plot(conc: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def one(key: str, ylabel: str, file: str, title: str | None = None) -> str:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, rows in conc.items():
            if rows:
                ax.plot([r["streams"] for r in rows], [r[key] for r in rows], marker="o", label=name)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / file, dpi=110)
        return file

    files = [one("agg_tok_s", "aggregate decode tokens/s", "concurrency.png", "SmolLM2-135M on 2 CPU cores"),
             one("ttft_p50", "TTFT p50 (s)", "ttft.png")]
    plt.close("all")
    return files


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer levels and tokens")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "suite")
    ap.add_argument("--skip-mlx-lm", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    levels = [1, 8] if args.quick else [1, 4, 8, 16]
    tokens = 32 if args.quick else 64
    work = Path(tempfile.mkdtemp(prefix="mlxserve-suite-"))
    from mlxserve.cli.main import default_gguf_path

    gguf = default_gguf_path()
    model_dir = concurrency.write_mlx_dir(gguf, work / "smollm2-mlx")
    results: dict = {"backend": str(BACKEND), "date": time.strftime("%Y-%m-%d %H:%M"),
                     "load_average": os.getloadavg()}
    print("== overhead", flush=True)
    served = await trio.to_thread.run_sync(overhead.served_decode, gguf, tokens * 2, 2)
    raw = await trio.to_thread.run_sync(overhead.raw_decode, gguf, tokens * 2, 2)
    results["overhead"] = {"raw_tok_s": max(raw), "served_tok_s": max(served), "ratio": max(served) / max(raw)}
    print(json.dumps(results["overhead"]), flush=True)
    print("== concurrency", flush=True)
    ours = await concurrency.bench("mlxserve", *concurrency.start_mlxserve(model_dir, work / "store"), "bench",
                                   levels, tokens, {"stop": []})
    theirs = [] if args.skip_mlx_lm else await concurrency.bench(
        "mlx_lm", *concurrency.start_mlx_lm(model_dir), str(model_dir), levels, tokens, {})
    results["concurrency"] = {"mlxserve": ours, "mlx_lm": theirs}
    print("== prefix cache, cancellation, memory", flush=True)
    results["daemon"] = await daemon_measures(model_dir)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    files = plot(results["concurrency"], args.out)

    print(f"\nbackend: {BACKEND}")
    o = results["overhead"]
    print(f"overhead: raw {o['raw_tok_s']:.2f} tok/s, served {o['served_tok_s']:.2f} tok/s, ratio {o['ratio']:.3f}")
    print("decode tok/s while every stream decodes (end to end, prefill included, in brackets)")
    print(f"{'streams':>8} {'mlxserve':>16} {'mlx_lm':>16} {'ratio':>7}")
    for i, r in enumerate(ours):
        t = theirs[i] if theirs else concurrency.NAN
        print(f"{r['streams']:>8} {r['agg_tok_s']:>7.1f} ({r['e2e_tok_s']:>6.1f}) {t['agg_tok_s']:>7.1f} "
              f"({t['e2e_tok_s']:>6.1f}) {r['agg_tok_s'] / t['agg_tok_s']:>6.1f}x")
    eight = next((r for r in ours if r["streams"] == 8), None)
    if eight:
        print(f"mlxserve 8 streams / 1 stream: {eight['agg_tok_s'] / ours[0]['agg_tok_s']:.2f}x (goal >= 5x)")
    d = results["daemon"]
    print(f"prefix cache: {d['prefix_prompt_tokens']} prompt tokens, TTFT cold {d['ttft_cold_s']:.3f}s, "
          f"warm {d['ttft_warm_s']:.3f}s, ratio {d['prefix_ratio']:.3f} (goal <= 0.1)")
    print(f"cancel to slot free: p50 {d['cancel_to_free_ms_p50']:.1f} ms, max {d['cancel_to_free_ms_max']:.1f} ms")
    print(f"memory: idle daemon {d['rss_idle_mb']:.0f} MB, loaded {d['rss_loaded_mb']:.0f} MB, "
          f"after unload {d['rss_unloaded_mb']:.0f} MB; load {d['load_s']:.2f}s")
    print(f"wrote {args.out / 'results.json'} and {', '.join(files)}")


if __name__ == "__main__":
    trio.run(main)
