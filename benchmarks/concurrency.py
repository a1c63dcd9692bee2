"""Aggregate decode tokens/s and TTFT at 1, 4, 8, 16 concurrent streams: mlxserve vs mlx_lm.server.

    .venv/bin/python benchmarks/concurrency.py [--levels 1,4,8,16] [--tokens 64] [--json out.json]

Both servers get the same mlx-lm model directory (written from the embedded SmolLM2 GGUF, or
--model-dir), the same prompts and the same client: streaming /v1/chat/completions, greedy, a
fixed max_tokens with EOS ignored (mlxserve: options via the same request; mlx_lm: its own
defaults). Each server runs alone in its own process; the table prints both and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
PROMPTS = [
    "Write a short story about a lighthouse keeper.", "Explain how rain forms.", "List ten fruits and their colors.",
    "Describe the city of Paris.", "Write a poem about the sea.", "How do airplanes fly?",
    "Tell me about the history of tea.", "What makes a good friend?",
]


NAN = {"agg_tok_s": float("nan"), "e2e_tok_s": float("nan"), "ttft_p50": float("nan")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_mlx_dir(gguf: Path, out: Path) -> Path:
    """The GGUF as an mlx-lm directory (same quantized weights), which both servers can load."""
    import mlx.core as mx

    from mlxserve.engine import gguf as g
    from mlxserve.engine.tokenizer import from_gguf_metadata

    config, weights, metadata = g.load_gguf_weights(gguf)
    quant = config.pop("quantization")
    if quant:
        config["quantization"] = {"group_size": quant["group_size"], "bits": quant["bits"], **quant["layers"]}
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(config))
    tok = from_gguf_metadata(metadata)
    (out / "tokenizer.json").write_text(tok.tokenizer.to_str())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": tok.chat_template,
        "eos_token": tok.eos_token, "bos_token": tok.bos_token, "add_bos_token": False,
    }))
    return out


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


async def wait_up(url: str, proc: subprocess.Popen) -> None:
    async with httpx.AsyncClient(timeout=2) as c:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if (await c.get(url)).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            await trio.sleep(0.1)  # a process outside this loop: bounded polling is all there is
    raise RuntimeError("server did not come up")


async def one_stream(c: httpx.AsyncClient, model: str, prompt: str, tokens: int, extra: dict) -> tuple[float, list[float]]:
    """(start, arrival time of each content chunk): one chunk per token on both servers."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "stream": True, **extra}
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("choices") and obj["choices"][0].get("delta", {}).get("content"):
                stamps.append(time.perf_counter())
    return t0, stamps


def decode_rate(streams: list[list[float]]) -> float:
    """Aggregate decode tokens/s in the window where every stream is decoding (after the last
    stream's first token, up to the first stream's last): prefill and ragged ends left out, as
    Ollama's eval rate leaves out prompt eval. Falls back to the whole span when there is none."""
    start = max(s[0] for s in streams)
    end = min(s[-1] for s in streams)
    if end <= start:
        start, end = min(s[0] for s in streams), max(s[-1] for s in streams)
        return sum(len(s) - 1 for s in streams) / max(end - start, 1e-9)
    return sum(1 for s in streams for t in s if start < t <= end) / (end - start)


async def level(url: str, model: str, conc: int, tokens: int, extra: dict) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        await one_stream(c, model, "Hi", 4, extra)  # warm: load and first compile
        results = []
        t0 = time.perf_counter()

        async def run(i):
            results.append(await one_stream(c, model, PROMPTS[i % len(PROMPTS)], tokens, extra))

        async with trio.open_nursery() as n:
            for i in range(conc):
                n.start_soon(run, i)
    streams = [stamps for _, stamps in results if stamps]
    wall = max(s[-1] for s in streams) - t0
    total = sum(len(s) for s in streams)
    ttfts = sorted(stamps[0] - start for start, stamps in results if stamps)
    return {"streams": conc, "tokens": total, "agg_tok_s": decode_rate(streams), "e2e_tok_s": total / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_max": ttfts[-1]}


def start_mlxserve(model_dir: Path, store: Path, extra_env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "MLXSERVE_MODELS": str(store), "MLXSERVE_HOST": f"127.0.0.1:{port}",
           "MLXSERVE_NUM_PARALLEL": "16", **(extra_env or {})}
    mf = store / "Modelfile"
    mf.parent.mkdir(parents=True, exist_ok=True)
    mf.write_text(f"FROM {model_dir}\n")
    subprocess.run([BIN / "mlxctl", "create", "bench", "-f", mf, "--local"], env=env, check=True,
                   capture_output=True)
    proc = subprocess.Popen([BIN / "mlxctl", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def start_mlx_lm(model_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm.server", "--model", str(model_dir), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return proc, f"http://127.0.0.1:{port}"


async def bench(name: str, proc: subprocess.Popen, url: str, model: str, levels: list[int], tokens: int,
                extra: dict) -> list[dict]:
    try:
        await wait_up(url + "/v1/models", proc)
        rows = []
        for conc in levels:
            try:
                rows.append(await level(url, model, conc, tokens, extra))
            except (httpx.HTTPError, ExceptionGroup) as exc:  # the other server failing a level
                print(f"  {name:<9} {conc:>3} streams: failed ({exc!r:.120})", flush=True)
                rows.append({"streams": conc, **NAN})
                continue
            print(f"  {name:<9} {conc:>3} streams: decode {rows[-1]['agg_tok_s']:7.1f} tok/s, "
                  f"end to end {rows[-1]['e2e_tok_s']:7.1f} tok/s", flush=True)
        return rows
    finally:
        stop_process(proc)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="1,4,8,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--skip-mlx-lm", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--ab", action="append", default=[], metavar="NAME:VAR=VALUE[,VAR=VALUE]|NAME:VAR=A,B;[VAR=VALUE;]",
                    help="another mlxserve run in the same session with these environment settings "
                         "(e.g. openblas:MLXSERVE_SMALL_GEMM=off); its decode rate is printed beside")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    work = Path(tempfile.mkdtemp(prefix="mlxserve-conc-"))
    try:
        model_dir = args.model_dir
        if model_dir is None:
            from mlxserve.cli.main import default_gguf_path

            model_dir = write_mlx_dir(default_gguf_path(), work / "smollm2-mlx")
        # Same greedy requests on both servers; stop [] so only EOS or max_tokens ends a stream.
        ours = await bench("mlxserve", *start_mlxserve(model_dir, work / "store"), "bench", levels, args.tokens,
                           {"stop": []})
        theirs = [] if args.skip_mlx_lm else await bench("mlx_lm", *start_mlx_lm(model_dir), str(model_dir),
                                                         levels, args.tokens, {})
        variants = {}
        for i, spec in enumerate(args.ab):
            name, _, settings = spec.partition(":")
            # VAR=VALUE pairs split on ',', or on ';' when a value holds commas (A=3,25;B=1)
            env = dict(kv.split("=", 1) for kv in settings.split(";" if ";" in settings else ",") if kv)
            variants[name] = await bench(name, *start_mlxserve(model_dir, work / f"store{i}", env), "bench",
                                         levels, args.tokens, {"stop": []})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\ndecode = aggregate decode tok/s while every stream decodes; e2e = all tokens / wall clock "
          "(prefill and TTFT included)")
    print(f"{'':>8} {'mlxserve':>26} {'mlx_lm':>26}")
    print(f"{'streams':>8} {'decode':>8} {'e2e':>8} {'ttft p50':>8} {'decode':>8} {'e2e':>8} {'ttft p50':>8} "
          f"{'ratio':>7}")
    for i, r in enumerate(ours):
        t = theirs[i] if theirs else NAN
        ratio = f"{r['agg_tok_s'] / t['agg_tok_s']:.2f}x" if theirs else "-"
        print(f"{r['streams']:>8} {r['agg_tok_s']:>8.1f} {r['e2e_tok_s']:>8.1f} {r['ttft_p50']:>7.2f}s "
              f"{t['agg_tok_s']:>8.1f} {t['e2e_tok_s']:>8.1f} {t['ttft_p50']:>7.2f}s {ratio:>7}")
    for name, rows in variants.items():
        print(f"{name}: decode " + ", ".join(
            f"{r['streams']} streams {r['agg_tok_s']:.1f} (mlxserve {o['agg_tok_s'] / r['agg_tok_s']:.2f}x)"
            for r, o in zip(rows, ours)))
    one = ours[0]
    for r in ours:
        if r["streams"] == 8:
            print(f"mlxserve 8-stream / 1-stream: decode {r['agg_tok_s'] / one['agg_tok_s']:.2f}x (goal >= 5x), "
                  f"end to end {r['e2e_tok_s'] / one['e2e_tok_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"mlxserve": ours, "mlx_lm": theirs, "variants": variants}, indent=2))


if __name__ == "__main__":
    trio.run(main)
