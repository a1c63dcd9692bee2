"""Single-stream decode tokens/s: the raw engine vs the daemon over HTTP, same model, same run.

    .venv/bin/python benchmarks/overhead.py [--model-file X.gguf] [--tokens 128] [--runs 3]

The raw figure drives mlx-lm's BatchGenerator on a thread exactly as the Runner does, with the same
BLAS and weight-dtype choices as the daemon; the served figure streams /api/generate from a
`mlxctl serve` subprocess and times first token to last token on the client. Prints a table and
the ratio (goal >= 0.97).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlxserve.engine.cpu.bootstrap import setup_backend  # noqa: E402

BACKEND = setup_backend()  # before mlx is imported, as the daemon does

import httpx  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper."


def raw_decode(model_file: Path, tokens: int, runs: int) -> list[float]:
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    from mlxserve.engine.model import load_path
    from mlxserve.specs.templates import render_chat

    rates: list[float] = []

    def work() -> None:
        stream = mx.new_thread_local_stream(mx.default_device())
        with mx.stream(stream):
            lm = load_path(model_file)
        prompt = render_chat(lm.tokenizer.chat_template, [{"role": "user", "content": PROMPT}],
                             add_generation_prompt=True)
        ids = lm.tokenizer.encode(prompt, add_bos=False)
        for _ in range(runs + 1):  # the first run warms up
            gen = BatchGenerator(lm.model, stop_tokens=[], prefill_step_size=256, stream=stream)
            gen.insert([ids], max_tokens=[tokens])
            n, t_first = 0, None
            while True:
                _, resp = gen.next()
                for r in resp:
                    n += 1
                    if t_first is None:
                        t_first = time.perf_counter()
                if resp and resp[0].finish_reason:
                    break
            rates.append((n - 1) / (time.perf_counter() - t_first))
            gen.close()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    return rates[1:]


def served_decode(model_file: Path, tokens: int, runs: int) -> list[float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = tempfile.mkdtemp(prefix="mlxserve-bench-")
    env = {**os.environ, "MLXSERVE_MODELS": store, "MLXSERVE_HOST": f"127.0.0.1:{port}"}
    mf = Path(store) / "Modelfile"
    mf.write_text(f"FROM {model_file}\n")
    mlxctl = Path(sys.executable).parent / "mlxctl"
    subprocess.run([mlxctl, "create", "bench", "-f", mf, "--local"], env=env, check=True, capture_output=True)
    proc = subprocess.Popen([mlxctl, "serve", "--preload", "bench"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        proc.stdout.readline()
        rates = []
        body = {"model": "bench", "messages": [{"role": "user", "content": PROMPT}],
                "options": {"temperature": 0, "num_predict": tokens, "repeat_penalty": 1.0, "stop": []}}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as c:
            for _ in range(runs + 1):
                n, t_first = 0, None
                with c.stream("POST", "/api/chat", json=body) as r:
                    for line in r.iter_lines():
                        if not line.strip():
                            continue
                        obj = json.loads(line)
                        if obj.get("done"):
                            n = obj["eval_count"]
                            break
                        if t_first is None:
                            t_first = time.perf_counter()
                rates.append((n - 1) / (time.perf_counter() - t_first))
        return rates[1:]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-file", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    model_file = args.model_file
    if model_file is None:
        from mlxserve.cli.main import default_gguf_path

        model_file = default_gguf_path()
    served = served_decode(model_file, args.tokens, args.runs)
    raw = raw_decode(model_file, args.tokens, args.runs)
    best_raw, best_served = max(raw), max(served)
    print(f"backend: {BACKEND}")
    print(f"model: {model_file.name}, {args.tokens} tokens, best of {args.runs}")
    print(f"{'path':<10}{'decode tok/s':>14}")
    print(f"{'raw':<10}{best_raw:>14.2f}")
    print(f"{'served':<10}{best_served:>14.2f}")
    print(f"ratio served/raw: {best_served / best_raw:.3f} (goal >= 0.97)")


if __name__ == "__main__":
    main()
