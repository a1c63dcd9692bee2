"""Decode tokens/s of one model on one rank vs two ranks (ring backend on 127.0.0.1), side by side.

Starts a one-rank daemon and a two-rank group (the environment mlx.launch sets) on the same
store, then alternates the same greedy load between them, so both see the same machine load:

    .venv/bin/python benchmarks/distributed_ranks.py --store ~/.mlxserve/models --model smol \\
        --split pipeline --streams 1 4 --tokens 64 --rounds 3

Prints a JSON line per (model, streams, ranks) with the median aggregate tokens/s.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    out = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return out


def start(store: Path, ranks: int, env_extra: dict, tmp: Path) -> tuple[str, list[subprocess.Popen]]:
    http, *ring = _ports(1 + ranks)
    env = {**os.environ, **env_extra, "MLXSERVE_MODELS": str(store), "MLXSERVE_HOST": f"127.0.0.1:{http}"}
    procs = []
    if ranks == 1:
        procs.append(subprocess.Popen([str(BIN / "mlxctl"), "serve"], env=env, stdout=subprocess.DEVNULL,
                                      stderr=(tmp / "single.log").open("w"), start_new_session=True))
    else:
        hosts = tmp / "hosts.json"
        hosts.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ring]))
        for r in range(ranks):
            procs.append(subprocess.Popen([str(BIN / "mlxctl"), "serve"],
                                          env={**env, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hosts)},
                                          stdout=subprocess.DEVNULL, stderr=(tmp / f"rank{r}.log").open("w"),
                                          start_new_session=True))
    url = f"http://127.0.0.1:{http}"
    for _ in range(1200):
        try:
            if httpx.get(url + "/api/version", timeout=1).status_code == 200:
                return url, procs
        except httpx.HTTPError:
            time.sleep(0.25)
    raise SystemExit(f"daemon with {ranks} rank(s) did not start; logs in {tmp}")


def run_load(url: str, model: str, streams: int, tokens: int) -> float:
    """Aggregate decode tokens/s of ``streams`` concurrent greedy requests."""
    def one(i: int) -> tuple[int, float]:
        r = httpx.post(url + "/api/generate", timeout=600, json={
            "model": model, "prompt": f"[{i}] {PROMPT}", "stream": False,
            "options": {"temperature": 0, "num_predict": tokens}})
        d = r.json()
        return d["eval_count"], d["eval_duration"] / 1e9

    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(one, range(streams)))
    wall = time.perf_counter() - t0
    return sum(n for n, _ in results) / wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--split", default="auto")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--weight-dtype", default="float32")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dist-bench-"))
    env = {"MLXSERVE_WEIGHT_DTYPE": args.weight_dtype, "MLXSERVE_DIST_SPLIT": args.split,
           "MLXSERVE_KEEP_ALIVE": "1h", "MLXSERVE_MAX_LOADED_MODELS": "1"}
    daemons = {n: start(args.store, n, env, tmp) for n in (1, 2)}
    try:
        for model in args.model:
            for url, _ in daemons.values():
                run_load(url, model, 1, 4)  # load and warm up
            for streams in args.streams:
                rates: dict[int, list[float]] = {1: [], 2: []}
                for _ in range(args.rounds):
                    for n, (url, _) in daemons.items():
                        rates[n].append(run_load(url, model, streams, args.tokens))
                for n in (1, 2):
                    print(json.dumps({"model": model, "streams": streams, "ranks": n,
                                      "tok_s": round(statistics.median(rates[n]), 1),
                                      "all": [round(x, 1) for x in rates[n]]}), flush=True)
                print(json.dumps({"model": model, "streams": streams,
                                  "ratio_2_over_1": round(statistics.median(rates[2]) / statistics.median(rates[1]), 2)}),
                      flush=True)
    finally:
        for _, procs in daemons.values():
            for p in procs:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            for p in procs:
                p.wait(timeout=30)


if __name__ == "__main__":
    main()
