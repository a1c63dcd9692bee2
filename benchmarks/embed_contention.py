"""Generation latency while a long embedding runs, and how fast a long embedding lets go.

    .venv/bin/python benchmarks/embed_contention.py [--chars 100000] [--gen 3] [--tokens 16]
                                                    [--cap 300] [--json out.json]

One `mlxctl serve` process (a temporary store: the embedded SmolLM2 as 'smol', the tiny test
model as 'tiny'), then, in order:
1. baseline: ``--gen`` sequential non-streaming /api/generate requests (``--tokens`` tokens,
   greedy) on smol (the model that embeds) and on tiny (another model), each timed;
2. during: the same while a ``--chars``-character /api/embed on smol runs;
3. freed: once that client has left (after the timings of 2), how long a short /api/embed on smol takes (it waits for
   the model thread), then the generation timings again;
4. the daemon's peak RSS (VmHWM), and how long it takes to exit on SIGTERM sent while a second
   long embedding runs.
Waits are capped at ``--cap`` seconds (reported as the cap). Run it on an otherwise idle machine;
to compare two trees, run each (PYTHONPATH=tree) back to back.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps. "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_store(root: Path) -> Path:
    from mlxserve.cli.main import default_gguf_path
    from mlxserve.store.store import Store
    from mlxserve.testing import tinymodel

    tiny = tinymodel.write_gguf(root / "tiny.gguf")
    store = Store(root / "models")
    store.create("smol", f"FROM {default_gguf_path()}\nPARAMETER temperature 0\n", base_dir=root)
    store.create("tiny", f"FROM {tiny}\nPARAMETER temperature 0\n", base_dir=root)
    return root / "models"


def vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


async def generate_times(c: httpx.AsyncClient, model: str, n: int, tokens: int, cap: float) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        with trio.move_on_after(cap):
            r = await c.post("/api/generate", json={
                "model": model, "prompt": f"Count from {i} to twenty:", "stream": False,
                "options": {"num_predict": tokens, "temperature": 0}}, timeout=cap + 5)
            assert r.status_code == 200, r.text
        out.append(time.perf_counter() - t0)
    return out


def summary(xs: list[float]) -> dict:
    return {"median_s": round(statistics.median(xs), 3), "max_s": round(max(xs), 3), "n": len(xs)}


async def long_embed(url: str, chars: int, scope: trio.CancelScope) -> None:
    """A client that waits for a long embedding until ``scope`` is cancelled (it leaves)."""
    with scope:
        async with httpx.AsyncClient(base_url=url, timeout=None) as c:
            await c.post("/api/embed", json={"model": "smol", "input": (TEXT * (chars // len(TEXT) + 1))[:chars]})


class _Results(dict):
    """Prints each figure as it comes, so a run cut short still says what it measured."""

    def __setitem__(self, key, value):
        print(f"{key}: {value}", file=sys.stderr, flush=True)
        super().__setitem__(key, value)


async def main(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="embed-bench-"))
    models = make_store(tmp)
    host = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "MLXSERVE_MODELS": str(models), "MLXSERVE_HOST": host}
    proc = subprocess.Popen([BIN / "mlxctl", "serve"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    url = f"http://{host}"
    res = _Results(chars=args.chars, tokens=args.tokens)
    try:
        assert "listening on" in await trio.to_thread.run_sync(proc.stdout.readline)
        async with httpx.AsyncClient(base_url=url, timeout=None) as c:
            for model in ("smol", "tiny"):
                await generate_times(c, model, 1, args.tokens, args.cap)
            await c.post("/api/embed", json={"model": "smol", "input": "warm up"})
            res["rss_idle"] = vm(proc.pid, "VmRSS")
            for model in ("smol", "tiny"):
                res[f"baseline_{model}"] = summary(await generate_times(c, model, args.gen, args.tokens, args.cap))
            leave = trio.CancelScope()
            async with trio.open_nursery() as n:
                n.start_soon(long_embed, url, args.chars, leave)
                await trio.sleep(2)  # let the embedding start
                for model in ("smol", "tiny"):
                    res[f"during_{model}"] = summary(await generate_times(c, model, args.gen, args.tokens, args.cap))
                leave.cancel()
            t0 = time.perf_counter()
            with trio.move_on_after(args.cap):
                await c.post("/api/embed", json={"model": "smol", "input": "short"}, timeout=args.cap + 5)
            res["short_embed_after_leave_s"] = round(time.perf_counter() - t0, 3)
            for model in ("smol", "tiny"):
                res[f"after_{model}"] = summary(await generate_times(c, model, args.gen, args.tokens, args.cap))
            res["rss_peak"] = vm(proc.pid, "VmHWM")
        # Closed first: an idle keep-alive connection holds Hypercorn's graceful stop.
        async with trio.open_nursery() as n:
            n.start_soon(long_embed, url, args.chars, trio.CancelScope())
            await trio.sleep(3)
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            try:
                await trio.to_thread.run_sync(lambda: proc.wait(timeout=args.cap))
            except subprocess.TimeoutExpired:
                pass
            res["sigterm_exit_s"] = round(time.perf_counter() - t0, 3)
            n.cancel_scope.cancel()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chars", type=int, default=100_000)
    ap.add_argument("--gen", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--cap", type=float, default=300.0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    out = trio.run(main, a)
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
