"""Decode tokens/s on an NVIDIA GPU (mlx-cuda): raw mlx-lm vs mlxserve's engine vs mlxserve over HTTP.

    python benchmarks/gpu.py [--tiny] [--streams 1,32] [--prompt-len 128] [--tokens 128] [--runs 2]
                             [--engine] [--rounds N] [--diag] [--scaling 1,2,4,8,16,32]
                             [--sweep VAR=v1,v2 [--sweep-served]] [--keep-model DIR | --model DIR]
                             [--json out.json] [--log-dir DIR]

Builds a Llama-3-8B-shaped model with random weights (hidden 4096, 32 layers, 32 heads, 8 KV
heads, intermediate 14336, vocab 128256, rope_theta 500000), quantized with
``nn.quantize(group_size=64, bits=4)``, and writes it as an mlx-lm directory (config.json,
model.safetensors, a WordLevel tokenizer.json "t0".."t128255" whose EOS id lies outside the
model's vocabulary, so no stream ever stops early). ``--tiny`` builds a toy of the same family
for a CPU dry run. Results: docs/nvidia.md; earlier runs: benchmarks/results/history-gpu.md.

Then, in one run on one machine, side by side (each path in its own process):
- raw: mlx-lm's BatchGenerator driven on its own thread exactly as mlxserve's engine drives it
  (same batch sizes and prefill chunk);
- engine (``--engine``): mlxserve's Engine thread (engine/loop.py) with a queue as ``deliver``:
  no trio, no HTTP;
- served: ``mlxctl serve`` as a subprocess (MLXSERVE_NUM_PARALLEL = the largest stream count,
  a Modelfile with temperature 0 and repeat_penalty 1) and N concurrent streaming clients on
  ``/v1/completions`` whose prompts are token ids.
Every stream gets a distinct random prompt of ``--prompt-len`` tokens and decodes exactly
``--tokens`` tokens, greedy. Figures per row: ``decode`` = sum over streams of (tokens - 1)
over (last token of any stream - first token of any stream); ``steady`` = tokens that arrived
while every stream was decoding, over that window (excludes staggered admission and the tail);
``e2e`` = all tokens over the wall time from submission to the last token (includes prefill).
The best of ``--runs`` timed runs (by ``decode``) is kept after one untimed warm-up run.

``--sweep VAR=a,b`` adds rows with an environment variable set in the child processes (and the
server with ``--sweep-served``), e.g. MLX_MAX_OPS_PER_BUFFER or MLX_CUDA_USE_CUDNN_SDPA.
``GPU_BENCH_FLATTEN_QMM=1`` is this script's own experiment: it makes nn.QuantizedLinear feed
``mx.quantized_matmul`` a 2-D input (see ``flatten_qmm_patch``). ``--diag`` adds, in the raw
child, a breakdown of one decode step (graph-build time, synchronous vs pipelined vs sync-free
steps, each block's share over all layers, and the 4-bit matmul alone on 2-D and 3-D inputs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported as benchmarks.gpu

from concurrency import free_port, stop_process  # noqa: E402

LLAMA3_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
    "rope_traditional": False,
}
TINY = {**LLAMA3_8B, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 1024}
GROUP, BITS = 64, 4
FLATTEN_ENV = "GPU_BENCH_FLATTEN_QMM"
CLI = ("import os\nif os.environ.get('GPU_BENCH_FLATTEN_QMM'):\n"
       "    from benchmarks.gpu import flatten_qmm_patch; flatten_qmm_patch()\n"
       "from mlxserve.cli.main import main; main()")


def flatten_qmm_patch() -> None:
    """Experiment: feed quantized matmuls 2-D inputs. Decode hands every Linear a (B, 1, D) input;
    mlx-cuda 0.32 runs that as B batched mat-vecs (weights re-read per row) instead of one
    (B, D) x W^T product. Set GPU_BENCH_FLATTEN_QMM=1 to patch nn.QuantizedLinear in this process."""
    import mlx.nn as nn

    if getattr(nn.QuantizedLinear, "_flattened", False):
        return
    orig = nn.QuantizedLinear.__call__

    def call(self, x):
        if x.ndim > 2:
            lead = x.shape[:-1]
            return orig(self, x.reshape(-1, x.shape[-1])).reshape(*lead, -1)
        return orig(self, x)

    nn.QuantizedLinear.__call__ = call
    nn.QuantizedLinear._flattened = True


# ---------------------------------------------------------------- the model directory
def build_model(out: Path, config: dict, seed: int = 0) -> Path:
    """Random Llama weights, 4-bit quantized, written as an mlx-lm directory."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    t0 = time.perf_counter()
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=GROUP, bits=BITS)
    # Evaluate one block at a time so the float weights never all exist at once.
    for layer in model.model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    vocab = config["vocab_size"]
    cfg = {**config, "quantization": {"group_size": GROUP, "bits": BITS}, "eos_token_id": vocab,
           "bos_token_id": None, "torch_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    write_tokenizer(out, vocab)
    nbytes = sum(v.nbytes for v in weights.values())
    print(f"built {out} ({nbytes / 1e9:.2f} GB of weights) in {time.perf_counter() - t0:.1f}s", flush=True)
    del model, weights
    mx.clear_cache()
    return out


def write_tokenizer(out: Path, vocab: int) -> None:
    """A WordLevel tokenizer "t0".."t{vocab-1}" plus "<eos>" = vocab (never produced by the model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"t{i}": i for i in range(vocab)}
    words["<eos>"] = vocab
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}",
    }))


def prompts_for(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def summarize(streams: int, t0: float, first: list[float], last: list[float], counts: list[int],
              times: list[float] | None = None) -> dict:
    """``times``: every token's arrival time (any order). ``steady_tok_s`` counts only the window
    in which every stream had started and none had finished, so staggered admission (served) and
    the tail do not count against the decode rate."""
    span = max(last) - min(first)
    decoded = sum(c - 1 for c in counts)
    out = {
        "streams": streams,
        "tokens": sum(counts),
        "decode_tok_s": decoded / span if span > 0 else float("nan"),
        "e2e_tok_s": sum(counts) / (max(last) - t0),
        "ttft_mean_s": statistics.mean(f - t0 for f in first),
        "ttft_max_s": max(first) - t0,
        "min_count": min(counts),
    }
    if times:
        lo, hi = max(first), min(last)
        inside = sum(1 for t in times if lo < t <= hi)
        out["steady_tok_s"] = inside / (hi - lo) if hi - lo > 0.05 and inside else float("nan")
    return out


# ---------------------------------------------------------------- raw mlx-lm
def keep_best(result: dict, label: str, n: int, runs: list[dict], min_count: bool = False) -> None:
    """Keep the best run by decode rate (with every run's rate beside it) and print its row."""
    best = max(runs, key=lambda r: r["decode_tok_s"])
    best["runs_decode_tok_s"] = [round(r["decode_tok_s"], 2) for r in runs]
    result["rows"].append(best)
    print(f"  {label} {n:>3} streams: decode {best['decode_tok_s']:8.1f} tok/s  "
          f"e2e {best['e2e_tok_s']:8.1f}  steady {best.get('steady_tok_s', float('nan')):8.1f}  "
          f"ttft max {best['ttft_max_s']:.2f}s  runs {best['runs_decode_tok_s']}"
          + (f"  (min tokens/stream {best['min_count']})" if min_count else ""), flush=True)


def raw_child(args) -> None:
    """Runs in its own process: loads the model as mlxserve does, then times BatchGenerator."""
    from mlxserve.engine.cpu.bootstrap import setup_backend

    setup_backend()
    if os.environ.get(FLATTEN_ENV):
        flatten_qmm_patch()
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    from mlxserve.engine.model import load_path

    levels = [int(x) for x in args.streams.split(",")]
    parallel = max(max(levels), 1)
    result: dict = {"device": str(mx.default_device()), "rows": [], "diag": None,
                    "env": {k: v for k, v in os.environ.items() if k.startswith(("MLX_", "GPU_BENCH_"))}}

    def work() -> None:
        stream = mx.new_thread_local_stream(mx.default_device())
        with mx.stream(stream):
            t = time.perf_counter()
            lm = load_path(args.model)
            result["load_s"] = time.perf_counter() - t
            result["weight_dtype"] = lm.weight_dtype
        vocab = int(lm.config["vocab_size"])

        def one(n: int, tokens: int, seed: int) -> dict:
            gen = BatchGenerator(lm.model, stop_tokens=[], completion_batch_size=parallel,
                                 prefill_batch_size=parallel, prefill_step_size=args.prefill_chunk,
                                 stream=stream)
            prompts = prompts_for(n, args.prompt_len, vocab, seed)
            t0 = time.perf_counter()
            uids = gen.insert(prompts, max_tokens=[tokens] * n)
            index = {u: i for i, u in enumerate(uids)}
            first, last, counts = [0.0] * n, [0.0] * n, [0] * n
            times: list[float] = []
            done = 0
            while done < n:
                _, resp = gen.next()
                now = time.perf_counter()
                for r in resp:
                    i = index[r.uid]
                    if counts[i] == 0:
                        first[i] = now
                    counts[i] += 1
                    last[i] = now
                    times.append(now)
                    if r.finish_reason is not None:
                        done += 1
            gen.close()
            return summarize(n, t0, first, last, counts, times)

        for n in levels:
            one(n, args.tokens, seed=1000 + n)  # warm-up: JIT compilation, allocator
            keep_best(result, "raw", n, [one(n, args.tokens, seed=2000 + 17 * n + k) for k in range(args.runs)])
        if args.diag:
            with mx.stream(stream):
                result["diag"] = diagnose(lm, levels, args, vocab)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    Path(args.child_out).write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # skip MLX's static destructors (see mlxctl serve)


def engine_child(args) -> None:
    """Runs in its own process: mlxserve's Engine thread (no trio, no HTTP), deliver = a queue."""
    from mlxserve.engine.cpu.bootstrap import setup_backend

    setup_backend()
    if os.environ.get(FLATTEN_ENV):
        flatten_qmm_patch()
    import queue as q

    import mlx.core as mx

    from mlxserve.config import Settings
    from mlxserve.engine import loop as eng
    from mlxserve.engine import sampling
    from mlxserve.engine.model import load_path

    levels = [int(x) for x in args.streams.split(",")]
    parallel = max(levels)
    settings = Settings()
    events: q.SimpleQueue = q.SimpleQueue()

    def deliver(evs: list) -> None:
        now = time.perf_counter()
        for e in evs:
            events.put((now, e))

    engine = eng.Engine(lambda: load_path(args.model, weight_dtype=settings.weight_dtype), deliver,
                        num_parallel=parallel, prefill_chunk=args.prefill_chunk, device=settings.device,
                        prompt_cache_bytes=settings.prompt_cache_bytes)
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    _, ready = events.get()
    if not isinstance(ready, eng.Ready):
        raise RuntimeError(f"engine did not load: {ready}")
    vocab = int(json.loads((Path(args.model) / "config.json").read_text())["vocab_size"])
    params = sampling.SamplingParams(temperature=0.0, repeat_penalty=1.0)
    seq_ids = iter(range(1, 1 << 30))
    result: dict = {"device": str(mx.default_device()), "rows": [], "prompt_cache_bytes": settings.prompt_cache_bytes}

    def one(n: int, tokens: int, seed: int) -> dict:
        prompts = prompts_for(n, args.prompt_len, vocab, seed)
        ids = [next(seq_ids) for _ in range(n)]
        index = {sid: i for i, sid in enumerate(ids)}
        first, last, counts = [0.0] * n, [0.0] * n, [0] * n
        times: list[float] = []
        t0 = time.perf_counter()
        for sid, p in zip(ids, prompts):
            engine.submit(eng.Add(sid, p, tokens, params))
        done = 0
        while done < n:
            at, e = events.get()
            if not isinstance(e, eng.Chunk):
                raise RuntimeError(f"unexpected event {e}")
            i = index[e.seq_id]
            if e.token_ids:
                if counts[i] == 0:
                    first[i] = at
                counts[i] += len(e.token_ids)
                last[i] = at
                times.extend([at] * len(e.token_ids))
            if e.finish is not None:
                if e.finish not in ("length", "stop"):
                    raise RuntimeError(f"sequence ended with {e.finish}: {e.error}")
                done += 1
        return summarize(n, t0, first, last, counts, times)

    for n in levels:
        one(n, args.tokens, seed=1000 + n)
        keep_best(result, "engine", n, [one(n, args.tokens, seed=4000 + 17 * n + k) for k in range(args.runs)])
    engine.submit(eng.Shutdown())
    thread.join(timeout=60)
    Path(args.child_out).write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)


def diagnose(lm, levels: list[int], args, vocab: int) -> dict:
    """Where a decode step's time goes (run on the engine thread, inside its stream)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import make_prompt_cache

    model = lm.model
    out: dict = {}
    steps = 32
    for n in levels:
        prompts = mx.array(prompts_for(n, args.prompt_len, vocab, 7 + n))
        d: dict = {}

        def prefill():
            cache = make_prompt_cache(model)
            logits = model(prompts, cache=cache)
            y = mx.argmax(logits[:, -1, :], axis=-1)
            mx.eval(y, [c.state for c in cache])
            return cache, y

        # 1) synchronous steps: build + launch + wait, and the host share of it
        cache, y = prefill()
        build, total = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            logits = model(y[:, None], cache=cache)
            y = mx.argmax(logits[:, -1, :], axis=-1)
            t1 = time.perf_counter()
            mx.eval(y)
            t2 = time.perf_counter()
            build.append(t1 - t0)
            total.append(t2 - t0)
        d["sync_step_ms"] = 1e3 * statistics.median(total)
        d["graph_build_ms"] = 1e3 * statistics.median(build)
        d["sync_tok_s"] = n / statistics.median(total)

        # 2) pipelined greedy loop (mlx-lm's generate_step pattern) without BatchGenerator
        cache, y = prefill()
        mx.eval(y)
        nxt = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
        mx.async_eval(nxt)
        t0 = time.perf_counter()
        for _ in range(steps):
            cur = nxt
            nxt = mx.argmax(model(cur[:, None], cache=cache)[:, -1, :], axis=-1)
            mx.async_eval(nxt)
            cur.tolist()
        mx.eval(nxt)
        dt = time.perf_counter() - t0
        d["pipelined_tok_s"] = n * steps / dt
        d["pipelined_step_ms"] = 1e3 * dt / steps

        # 3) the same steps without any host sync: one eval at the end (GPU + launch bound)
        cache, y = prefill()
        t0 = time.perf_counter()
        for _ in range(steps):
            y = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
            mx.async_eval(y)
        mx.eval(y)
        dt = time.perf_counter() - t0
        d["nosync_step_ms"] = 1e3 * dt / steps
        out[str(n)] = d
        print(f"  diag {n:>3} streams: sync step {d['sync_step_ms']:.2f} ms (graph build "
              f"{d['graph_build_ms']:.2f}), pipelined {d['pipelined_step_ms']:.2f} ms "
              f"= {d['pipelined_tok_s']:.1f} tok/s, no-sync {d['nosync_step_ms']:.2f} ms", flush=True)

    # 5) one decode step's parts, each over all layers, for every stream count
    layers = model.model.layers
    nl = len(layers)
    h = int(lm.config["hidden_size"])
    heads = int(lm.config["num_attention_heads"])
    kvh = int(lm.config.get("num_key_value_heads") or heads)
    hd = h // heads

    def best_of(fn, reps: int = 3) -> float:
        mx.eval(fn())  # warm: JIT
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            mx.eval(fn())
            best = min(best, time.perf_counter() - t0)
        return 1e3 * best

    parts: dict = {}
    for n in levels:
        x = (0.1 * mx.random.normal((n, 1, h))).astype(mx.bfloat16)
        prompts = mx.array(prompts_for(n, args.prompt_len, vocab, 11 + n))
        cache = make_prompt_cache(model)
        mx.eval(model(prompts, cache=cache), [c.state for c in cache])
        q = mx.random.normal((n, heads, 1, hd)).astype(mx.bfloat16)
        k = mx.random.normal((n, kvh, args.prompt_len + 64, hd)).astype(mx.bfloat16)
        v = mx.random.normal((n, kvh, args.prompt_len + 64, hd)).astype(mx.bfloat16)
        mx.eval(x, q, k, v)
        a = layers[0].self_attn
        row = {
            "attention_block": best_of(lambda: [l.self_attn(l.input_layernorm(x), None, c) for l, c in zip(layers, cache)]),
            "qkvo_proj": best_of(lambda: [m(x if m is not l.self_attn.o_proj else mx.zeros((n, 1, heads * hd), mx.bfloat16))
                                          for l in layers for m in (l.self_attn.q_proj, l.self_attn.k_proj,
                                                                    l.self_attn.v_proj, l.self_attn.o_proj)]),
            "sdpa_only": best_of(lambda: [mx.fast.scaled_dot_product_attention(q, k, v, scale=a.scale)
                                          for _ in range(nl)]),
            "mlp_block": best_of(lambda: [l.mlp(l.post_attention_layernorm(x)) for l in layers]),
            "norms": best_of(lambda: [l.input_layernorm(x) for l in layers] + [l.post_attention_layernorm(x) for l in layers]),
            "lm_head": best_of(lambda: [model.lm_head(model.model.norm(x))]),
            "full_step": best_of(lambda: [model(mx.zeros((n, 1), mx.uint32), cache=cache)]),
        }
        parts[str(n)] = row
        print(f"  parts {n:>3} streams (ms, all {nl} layers): " +
              ", ".join(f"{k2} {v2:.2f}" for k2, v2 in row.items()), flush=True)
    out["parts"] = parts

    # 4) the 4-bit matmuls of one block alone, rotating over copies so L2 does not hold them
    h, inter = int(lm.config["hidden_size"]), int(lm.config["intermediate_size"])
    shapes = {"gate/up": (inter, h), "down": (h, inter)}
    mm: dict = {}
    copies = 8
    for name, (o, i) in shapes.items():
        ws = []
        for _ in range(copies):
            lin = nn.QuantizedLinear(i, o, bias=False, group_size=GROUP, bits=BITS)
            mx.eval(lin.parameters())
            ws.append(lin)
        wbytes = sum(v.nbytes for _, v in tree_flatten(ws[0].parameters()))
        for n in sorted({1, *levels}):
            for shape in ((n, i), (n, 1, i)):
                x = mx.random.normal(shape).astype(mx.bfloat16)
                mx.eval(x)
                reps = 64
                for _ in range(2):
                    t0 = time.perf_counter()
                    ys = [mx.quantized_matmul(x, ws[k % copies]["weight"], scales=ws[k % copies]["scales"],
                                              biases=ws[k % copies]["biases"], transpose=True,
                                              group_size=GROUP, bits=BITS) for k in range(reps)]
                    mx.eval(ys)
                    dt = time.perf_counter() - t0
                label = "x".join(map(str, shape))
                mm[f"{name} {o}x{i} x[{label}]"] = {"us": 1e6 * dt / reps, "GB_s": wbytes * reps / dt / 1e9}
    out["qmm"] = mm
    for k, v in mm.items():
        print(f"  qmm {k}: {v['us']:.1f} us, {v['GB_s']:.0f} GB/s of weights", flush=True)
    total_w = lm.weight_bytes
    out["weight_bytes"] = total_w
    return out


def run_raw(model_dir: Path, args, env_extra: dict, diag: bool, streams: str | None = None,
            tokens: int | None = None, kind: str = "--child-raw") -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        child_out = f.name
    cmd = [sys.executable, str(Path(__file__).resolve()), kind, "--model", str(model_dir),
           "--streams", streams or args.streams, "--prompt-len", str(args.prompt_len), "--tokens", str(tokens or args.tokens),
           "--runs", str(args.runs), "--prefill-chunk", str(args.prefill_chunk), "--child-out", child_out]
    if diag:
        cmd.append("--diag")
    env = {**os.environ, **env_extra, "PYTHONPATH": _pythonpath()}
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)
    result = json.loads(Path(child_out).read_text())
    os.unlink(child_out)
    return result


def _pythonpath() -> str:
    parts = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return os.pathsep.join(dict.fromkeys(parts))


# ---------------------------------------------------------------- served
def run_served(model_dir: Path, args, work: Path, env_extra: dict, log_path: Path | None) -> dict:
    import httpx
    import trio

    levels = [int(x) for x in args.streams.split(",")]
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    store = work / "store"
    store.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "MLXSERVE_MODELS": str(store), "MLXSERVE_HOST": f"127.0.0.1:{port}",
           "MLXSERVE_NUM_PARALLEL": str(max(levels)), "MLXSERVE_KEEP_ALIVE": "-1",
           "MLXSERVE_PREFILL_CHUNK": str(args.prefill_chunk), "PYTHONPATH": _pythonpath(), **env_extra}
    mf = work / "Modelfile"
    # Greedy, no repeat penalty: the same work per token as the raw BatchGenerator.
    mf.write_text(f"FROM {model_dir}\nPARAMETER temperature 0\nPARAMETER repeat_penalty 1.0\n")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", CLI, "create", "bench", "-f", str(mf), "--local"], env=env,
                   check=True, capture_output=True, cwd=ROOT)
    create_s = time.perf_counter() - t
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", "--preload", "bench", "--log-level", args.serve_log_level],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    result: dict = {"create_s": create_s, "rows": []}

    async def stream_one(c, prompt: list[int], t0: float) -> tuple[float, float, int]:
        body = {"model": "bench", "prompt": prompt, "max_tokens": args.tokens, "temperature": 0,
                "stream": True}
        first = last = 0.0
        text = []
        times: list[float] = []
        async with c.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    raise RuntimeError(obj["error"])
                piece = obj["choices"][0].get("text") if obj.get("choices") else ""
                if piece:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    text.append(piece)
                    times.extend([now] * len(piece.split()))
        return first, last, len("".join(text).split()), times

    async def one(c, n: int, seed: int) -> dict:
        prompts = prompts_for(n, args.prompt_len, vocab, seed)
        out: list = [None] * n
        t0 = time.perf_counter()

        async def go(i):
            out[i] = await stream_one(c, prompts[i], t0)

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(go, i)
        return summarize(n, t0, [o[0] for o in out], [o[1] for o in out], [o[2] for o in out],
                         [t for o in out for t in o[3]])

    async def main() -> None:
        limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
        async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as c:
            t = time.perf_counter()
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}")
                try:
                    if (await c.get("/api/version")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() - t > 600:
                    raise RuntimeError("server did not come up")
                await trio.sleep(0.2)
            result["ready_s"] = time.perf_counter() - t
            for n in levels:
                await one(c, n, seed=1000 + n)  # warm-up
                runs = [await one(c, n, seed=3000 + 17 * n + k) for k in range(args.runs)]
                keep_best(result, "served", n, runs, min_count=True)

    try:
        trio.run(main)
    finally:
        stop_process(proc, timeout=60)
        if log_path:
            log.close()
    return result


# ---------------------------------------------------------------- main
def kernel_bench(shapes=((4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)), rows=(1, 2, 4, 8),
                 quants=((4, 32), (4, 64), (8, 32))) -> list[dict]:
    """Microseconds and effective GB/s (weights + scales + biases read once) of engine/cuda's qmv
    and of mx.quantized_matmul on the same 2-D input, over 8 weight copies so L2 holds none."""
    import mlx.core as mx

    from mlxserve.engine.cuda import qmv

    out = []
    for bits, group in quants:
        for n, k in shapes:
            copies = []
            for i in range(8):
                w = mx.random.normal((n, k), key=mx.random.key(i)).astype(mx.float16)
                copies.append(mx.quantize(w, group_size=group, bits=bits))
            mx.eval(copies)
            nbytes = sum(a.nbytes for a in copies[0])
            for m in rows:
                x = mx.random.normal((m, k)).astype(mx.float16)
                fns = {"qmv": lambda c: qmv.qmv(x, *c, group, bits),
                       "mx.quantized_matmul": lambda c: mx.quantized_matmul(
                           x, *c, transpose=True, group_size=group, bits=bits)}
                row = {"bits": bits, "group": group, "n": n, "k": k, "rows": m, "weight_bytes": nbytes}
                for name, fn in fns.items():
                    for _ in range(3):
                        mx.eval([fn(c) for c in copies])
                    best = float("inf")
                    for _ in range(5):
                        t = time.perf_counter()
                        mx.eval([fn(c) for c in copies * 8])
                        best = min(best, (time.perf_counter() - t) / 64)
                    row[f"{name}_us"] = best * 1e6
                    row[f"{name}_gb_s"] = nbytes / best / 1e9
                out.append(row)
                print(f"  {bits}-bit g{group} {n:>5}x{k:<5} rows {m}: qmv {row['qmv_us']:7.1f} us "
                      f"{row['qmv_gb_s']:6.0f} GB/s | mx.quantized_matmul {row['mx.quantized_matmul_us']:7.1f} us "
                      f"{row['mx.quantized_matmul_gb_s']:6.0f} GB/s", flush=True)
            del copies
    return out


def parse_sweep(specs: list[str]) -> list[tuple[str, dict]]:
    """``VAR=a,b,c``; values that hold commas are separated by ``;`` instead, and one such value
    ends with it: ``MLXSERVE_ADMIT_WINDOW=3,25;10,150`` or ``MLXSERVE_ADMIT_WINDOW=3,25;``."""
    variants = []
    for spec in specs:
        var, _, values = spec.partition("=")
        for v in [v for v in values.split(";") if v] if ";" in values else values.split(","):
            variants.append((f"{var}={v}", {var: v}))
    return variants


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a toy model (CPU dry run)")
    ap.add_argument("--model", type=Path, help="reuse a model directory this script wrote")
    ap.add_argument("--keep-model", type=Path, help="write the model here and keep it")
    ap.add_argument("--streams", default="1,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--prefill-chunk", type=int, default=256, help="as MLXSERVE_PREFILL_CHUNK")
    ap.add_argument("--skip-raw", action="store_true")
    ap.add_argument("--skip-served", action="store_true")
    ap.add_argument("--diag", action="store_true")
    ap.add_argument("--sweep", action="append", default=[],
                    help="extra raw (and served) rows with an environment variable set, e.g. MLX_MAX_OPS_PER_BUFFER=50,200")
    ap.add_argument("--sweep-served", action="store_true", help="also run the served path for each sweep value")
    ap.add_argument("--sweep-no-raw", action="store_true", help="sweep values run the served path only")
    ap.add_argument("--serve-log-level", default="warning", help="the served daemon's --log-level")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the default raw/served pair (spread)")
    ap.add_argument("--engine", action="store_true", help="add mlxserve's Engine without HTTP (deliver = queue)")
    ap.add_argument("--scaling", default="", help="raw only, these stream counts, --scaling-tokens each")
    ap.add_argument("--scaling-tokens", type=int, default=64)
    ap.add_argument("--kernels", action="store_true",
                    help="only time engine/cuda's few-row quantized matmul against mx.quantized_matmul (GB/s)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--log-dir", type=Path)
    # internal: the raw child
    ap.add_argument("--child-raw", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-engine", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_raw:
        raw_child(args)
        return
    if args.child_engine:
        engine_child(args)
        return
    if args.kernels:
        rows = kernel_bench()
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return

    work = Path(tempfile.mkdtemp(prefix="mlxserve-gpu-"))
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "variants": {}}
    try:
        model_dir = args.model
        if model_dir is None:
            model_dir = args.keep_model or work / "model"
            # build in a child so this process never holds MLX memory
            code = ("import sys, json; sys.path.insert(0, %r); from benchmarks.gpu import build_model; "
                    "build_model(__import__('pathlib').Path(%r), json.loads(%r))") % (
                str(ROOT), str(model_dir), json.dumps(TINY if args.tiny else LLAMA3_8B))
            subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": _pythonpath()})
        import platform

        report["host"] = platform.node()
        variants = [("default" if k == 0 else f"default#{k + 1}", {}) for k in range(args.rounds)]
        variants += parse_sweep(args.sweep)
        for name, env_extra in variants:
            print(f"== {name}", flush=True)
            row: dict = {}
            base = name.startswith("default")
            if not args.skip_raw and (base or not args.sweep_no_raw):
                row["raw"] = run_raw(model_dir, args, env_extra, diag=args.diag and name == "default")
            if args.engine and base:
                row["engine"] = run_raw(model_dir, args, env_extra, diag=False, kind="--child-engine")
            if not args.skip_served and (base or args.sweep_served or args.sweep_no_raw):
                log = args.log_dir / ("serve-" + "".join(ch if ch.isalnum() else "_" for ch in name) + ".log") \
                    if args.log_dir else None
                row["served"] = run_served(model_dir, args, work / f"served-{len(report['variants'])}", env_extra, log)
            report["variants"][name] = row
            if args.json:
                args.json.write_text(json.dumps(report, indent=1))
        if args.scaling:
            print("== scaling", flush=True)
            report["variants"]["scaling"] = {"raw": run_raw(model_dir, args, {}, diag=False, streams=args.scaling,
                                                            tokens=args.scaling_tokens)}
    finally:
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        if args.model is None and args.keep_model is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(work / "store", ignore_errors=True)
    print_table(report, args)


def print_table(report: dict, args) -> None:
    print(f"\nprompt {args.prompt_len} tokens, {args.tokens} new tokens per stream ({args.scaling_tokens} for "
          f"'scaling'), greedy, best of {args.runs}; tok/s as decode/steady (e2e)")
    print(f"{'variant':<28}{'streams':>8}{'raw':>24}{'engine':>24}{'served':>24}{'srv/raw':>9}")

    def cell(r):
        if not r:
            return "-"
        return f"{r['decode_tok_s']:.1f}/{r.get('steady_tok_s', float('nan')):.1f} ({r['e2e_tok_s']:.1f})"

    for name, row in report["variants"].items():
        cols = {k: {r["streams"]: r for r in row.get(k, {}).get("rows", [])} for k in ("raw", "engine", "served")}
        for n in sorted(set().union(*[set(c) for c in cols.values()])):
            a, e, b = (cols[k].get(n) for k in ("raw", "engine", "served"))
            ratio = f"{b['decode_tok_s'] / a['decode_tok_s']:.3f}" if a and b else "-"
            print(f"{name:<28}{n:>8}{cell(a):>24}{cell(e):>24}{cell(b):>24}{ratio:>9}")
    print("earlier, same H100 shape: raw mlx-lm 80 tok/s single / 292 at 32 streams; "
          "llama.cpp (Q4_0) 300 / 3539; goal served >= 0.97x raw")


if __name__ == "__main__":
    main()
