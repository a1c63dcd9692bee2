"""Where a decode step's time goes on a GPU: host (graph building, kernel submission, the
engine's own work) vs waiting for the GPU, and how mlx-cuda's quantized products scale with rows.

    python benchmarks/step_profile.py --model PATH [--batches 1,8,32] [--tokens 64]
        [--prompt-len 300] [--no-loops] [--no-kernels] [--no-engine] [--json out.json]

Sections (one process, the model loaded once with mlxserve's loader):
- ``loops``: hand-written decode loops per batch size: ``nosync`` (async_eval every step, never
  wait: the GPU's pace when the host keeps ahead), ``pipe1`` (async_eval step n+1, then wait for
  step n's tokens: what a server must do), ``sync`` (eval every step: GPU time + host time).
  Per step: graph building (Python), submission (the async_eval call: mlx-cuda encodes and
  launches the kernels) and waiting.
- ``kernels``: one ``mx.quantized_matmul`` per shape of the model at 1..512 rows (8 weight
  copies so L2 holds none), µs and GB/s of weights read; from 64 rows also dequantize + matmul.
- ``engine``: mlxserve's Engine (no HTTP, deliver = a list) with :func:`install` timers.

:func:`install` is also what ``vs_llamacpp.py`` puts into the served daemon when
``STEP_PROFILE_OUT`` names a file: it wraps mlx-lm's GenerationBatch step and mlx calls in it
and appends one JSON line per 32 decode steps (batch size, ms per step: wall, in the step,
graph building, submission, waiting, and the rest of the engine loop).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WINDOW = 32


class _Timers(threading.local):
    def __init__(self) -> None:
        self.reset()
        self.in_step = False
        self.rows = 0

    def reset(self) -> None:
        self.steps = 0
        self.step = self.build = self.submit = self.wait = 0.0
        self.t0 = time.perf_counter()


_SINK: list = [None]


def install(out_path: str | None = None, sink: list | None = None) -> None:
    """Time mlx-lm's decode step in this process (see the module's docstring)."""
    import importlib

    import mlx.core as mx

    g = importlib.import_module("mlx_lm.generate")  # the package's ``generate`` is the function

    _SINK[0] = sink  # a later call (another engine in this process) gets the rows from then on
    if getattr(g, "_step_profiled", False):
        return
    g._step_profiled = True
    t = _Timers()
    real_eval, real_async = mx.eval, mx.async_eval

    class _Mx:  # mlx_lm.generate's ``mx`` with its two evaluation calls timed
        def __getattr__(self, name):
            return getattr(mx, name)

        @staticmethod
        def eval(*a, **k):
            s = time.perf_counter()
            real_eval(*a, **k)
            if t.in_step:
                t.wait += time.perf_counter() - s

        @staticmethod
        def async_eval(*a, **k):
            s = time.perf_counter()
            real_async(*a, **k)
            if t.in_step:
                t.submit += time.perf_counter() - s

    from mlxserve.engine import loop

    # mlx-lm's step takes new rows' first tokens; the engine's own (engine/loop.py) decodes.
    g.mx = loop.mx = _Mx()

    def timed_step(orig_step):
        return lambda self: step(self, orig_step)

    def step(self, orig_step):
        model = self.model
        if not getattr(type(model), "_profiled", False):
            call = type(model).__call__

            def timed(m, *a, **k):
                s = time.perf_counter()
                r = call(m, *a, **k)
                if t.in_step:
                    t.build += time.perf_counter() - s
                return r

            type(model).__call__ = timed
            type(model)._profiled = True
        if t.steps == 0:
            t.t0 = time.perf_counter()
        t.in_step = True
        s = time.perf_counter()
        try:
            return orig_step(self)
        finally:
            t.in_step = False
            t.step += time.perf_counter() - s
            t.steps += 1
            t.rows = len(self.uids)
            if t.steps >= WINDOW:
                wall = time.perf_counter() - t.t0
                row = {"batch": t.rows, "steps": t.steps, "wall_ms": 1e3 * wall / t.steps}
                for k in ("step", "build", "submit", "wait"):
                    row[f"{k}_ms"] = 1e3 * getattr(t, k) / t.steps
                row["outside_step_ms"] = row["wall_ms"] - row["step_ms"]
                row["other_in_step_ms"] = row["step_ms"] - row["build_ms"] - row["submit_ms"] - row["wait_ms"]
                if _SINK[0] is not None:
                    _SINK[0].append(row)
                if out_path:
                    with open(out_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                t.reset()

    g.GenerationBatch._step = timed_step(g.GenerationBatch._step)
    loop._GenerationBatch._step = timed_step(loop._GenerationBatch._step)


def summarize_windows(rows: list[dict]) -> dict[int, dict]:
    """Median of each figure per batch size (windows that span a batch change are mixed: medians
    keep them out)."""
    import statistics

    by: dict[int, list[dict]] = {}
    for r in rows:
        by.setdefault(r["batch"], []).append(r)
    return {b: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0] if k.endswith("_ms")}
            | {"windows": len(rs)} for b, rs in sorted(by.items())}


# ---------------------------------------------------------------- hand loops
def loops(lm, batches: list[int], prompt_len: int, tokens: int) -> list[dict]:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    model = lm.model
    vocab = int(lm.config["vocab_size"])
    out = []
    for b in batches:
        rng = random.Random(b)
        prompt = mx.array([[rng.randrange(100, vocab) for _ in range(prompt_len)] for _ in range(b)])

        def start():
            cache = make_prompt_cache(model)
            y = mx.argmax(model(prompt, cache=cache)[:, -1, :], axis=-1)
            mx.eval(y)
            return cache, y

        def nosync():
            cache, y = start()
            build = submit = 0.0
            t0 = time.perf_counter()
            for _ in range(tokens):
                s = time.perf_counter()
                y = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
                s2 = time.perf_counter()
                mx.async_eval(y)
                build += s2 - s
                submit += time.perf_counter() - s2
            mx.eval(y)
            return time.perf_counter() - t0, build, submit, 0.0

        def pipe1():
            cache, y = start()
            build = submit = wait = 0.0
            t0 = time.perf_counter()
            for _ in range(tokens):
                s = time.perf_counter()
                nxt = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
                s2 = time.perf_counter()
                mx.async_eval(nxt)
                s3 = time.perf_counter()
                y.tolist()
                build += s2 - s
                submit += s3 - s2
                wait += time.perf_counter() - s3
                y = nxt
            y.tolist()
            return time.perf_counter() - t0, build, submit, wait

        def sync():
            cache, y = start()
            build = wait = 0.0
            t0 = time.perf_counter()
            for _ in range(tokens):
                s = time.perf_counter()
                y = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
                s2 = time.perf_counter()
                y.tolist()
                build += s2 - s
                wait += time.perf_counter() - s2
            return time.perf_counter() - t0, build, 0.0, wait

        for name, fn in (("nosync", nosync), ("pipe1", pipe1), ("sync", sync)):
            fn()  # warm: kernels compiled, buffers cached
            best = min(fn() for _ in range(2))
            row = {"loop": name, "batch": b, "tok_s": b * tokens / best[0], "step_ms": 1e3 * best[0] / tokens,
                   "build_ms": 1e3 * best[1] / tokens, "submit_ms": 1e3 * best[2] / tokens,
                   "wait_ms": 1e3 * best[3] / tokens}
            out.append(row)
            print(f"  {name:<6} batch {b:>3}: {row['tok_s']:8.1f} tok/s  {row['step_ms']:6.2f} ms/step  build "
                  f"{row['build_ms']:5.2f}  submit {row['submit_ms']:5.2f}  wait {row['wait_ms']:5.2f}", flush=True)
    return out


# ---------------------------------------------------------------- parts of a step
def parts(lm, batches: list[int], prompt_len: int) -> list[dict]:
    """Each part of one decode step over all layers, evaluated alone (best of 3, ms; host
    submission included, so small parts show their launch cost)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    model = lm.model
    layers = model.model.layers
    vocab = int(lm.config["vocab_size"])
    h = int(lm.config["hidden_size"])
    dtype = layers[0].input_layernorm.weight.dtype
    out = []

    def best(fn) -> float:
        mx.eval(fn())
        t = float("inf")
        for _ in range(3):
            s = time.perf_counter()
            mx.eval(fn())
            t = min(t, time.perf_counter() - s)
        return round(1e3 * t, 3)

    for b in batches:
        rng = random.Random(b)
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array([[rng.randrange(100, vocab) for _ in range(prompt_len)] for _ in range(b)]),
                      cache=cache), [c.state for c in cache])
        x = (0.1 * mx.random.normal((b, 1, h))).astype(dtype)
        a = layers[0].self_attn
        heads, kvh = a.n_heads, a.n_kv_heads
        hd = getattr(model.args, "head_dim", None) or model.args.hidden_size // heads
        kv_len = cache[0].offset
        q = mx.random.normal((b, heads, 1, hd)).astype(dtype)
        k = mx.random.normal((b, kvh, kv_len, hd)).astype(dtype)
        v = mx.random.normal((b, kvh, kv_len, hd)).astype(dtype)
        kb = cache[0].keys  # the cache's own buffer, read through a slice as the model does
        mask = mx.ones((b, 1, 1, kv_len), mx.bool_)  # what mlx-lm's BatchKVCache hands every layer
        mx.eval(x, q, k, v, mask)
        row = {"batch": b, "kv_len": kv_len,
               "full_step": best(lambda: model(mx.zeros((b, 1), mx.uint32), cache=cache)),
               "attn_block": best(lambda: [l.self_attn(l.input_layernorm(x), None, c) for l, c in zip(layers, cache)]),
               "qkvo": best(lambda: [m(x if m is not l.self_attn.o_proj else mx.zeros((b, 1, heads * hd), dtype))
                                     for l in layers for m in (l.self_attn.q_proj, l.self_attn.k_proj,
                                                               l.self_attn.v_proj, l.self_attn.o_proj)]),
               "sdpa": best(lambda: [mx.fast.scaled_dot_product_attention(q, k, v, scale=a.scale) for _ in layers]),
               "sdpa_cache_slice": best(lambda: [mx.fast.scaled_dot_product_attention(
                   q, kb[..., :kv_len, :], kb[..., :kv_len, :], scale=a.scale) for _ in layers]),
               "sdpa_bool_mask": best(lambda: [mx.fast.scaled_dot_product_attention(
                   q, k, v, scale=a.scale, mask=mask) for _ in layers]),
               "rope": best(lambda: [a.rope(q, offset=kv_len) for _ in layers]),
               "mlp_block": best(lambda: [l.mlp(l.post_attention_layernorm(x)) for l in layers]),
               "gate_up_down": best(lambda: [(l.mlp.gate_proj(x), l.mlp.up_proj(x),
                                              l.mlp.down_proj(mx.zeros((b, 1, l.mlp.down_proj.weight.shape[1] * 8),
                                                                       dtype))) for l in layers]),
               "norms": best(lambda: [l.input_layernorm(x) for l in layers] + [l.post_attention_layernorm(x)
                                                                              for l in layers]),
               "lm_head": best(lambda: model.lm_head(model.model.norm(x))),
               }
        out.append(row)
        print("  parts " + ", ".join(f"{k2} {v2}" for k2, v2 in row.items()), flush=True)
        del cache
    return out


# ---------------------------------------------------------------- kernels
def kernels(lm, rows=(1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 24, 32, 48, 64, 128, 300, 512)) -> list[dict]:
    """Every distinct (out, in, bits, group) quantized linear of the model, timed alone."""
    import mlx.core as mx
    import mlx.nn as nn

    shapes: dict[tuple, nn.QuantizedLinear] = {}
    for _, m in lm.model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            shapes.setdefault((*m.weight.shape, m.bits, m.group_size, m.scales.dtype), m)
    out = []
    for (n, _, bits, group, sdtype), m in shapes.items():
        k = m.weight.shape[1] * 32 // bits
        copies = [(m.weight + i * 0, m.scales + 0, m.biases + 0) for i in range(8)]  # distinct buffers
        mx.eval(copies)
        nbytes = sum(a.nbytes for a in copies[0])
        for r in rows:
            x = (mx.random.normal((r, k)) * 0.1).astype(sdtype)
            fns = {"qmm": lambda c: mx.quantized_matmul(x, *c, transpose=True, group_size=group, bits=bits)}
            if r >= 64:
                fns["dequant_mm"] = lambda c: x @ mx.dequantize(*c, group_size=group, bits=bits).T
            row = {"n": n, "k": k, "bits": bits, "group": group, "rows": r, "weight_bytes": nbytes}
            for name, fn in fns.items():
                reps = 8 if r < 128 else 2
                mx.eval([fn(c) for c in copies])
                best = float("inf")
                for _ in range(3):
                    s = time.perf_counter()
                    mx.eval([fn(c) for c in copies * reps])
                    best = min(best, (time.perf_counter() - s) / (8 * reps))
                row[f"{name}_us"] = round(best * 1e6, 1)
                row[f"{name}_gb_s"] = round(nbytes / best / 1e9)
            out.append(row)
            print(f"  {n:>6}x{k:<6} q{bits} g{group} rows {r:>3}: qmm {row['qmm_us']:8.1f} us {row['qmm_gb_s']:5d} GB/s"
                  + (f" | dequant+mm {row['dequant_mm_us']:8.1f} us" if "dequant_mm_us" in row else ""), flush=True)
        del copies
    return out


# ---------------------------------------------------------------- engine
def engine(lm, batches: list[int], prompt_len: int, tokens: int) -> dict:
    from mlxserve.engine import loop as eng
    from mlxserve.engine.sampling import SamplingParams

    sink: list = []
    install(sink=sink)
    events: list = []
    cv = threading.Condition()

    def deliver(evs):
        with cv:
            events.extend(evs)
            cv.notify_all()

    e = eng.Engine(lambda: lm, deliver, num_parallel=max(batches), prefill_chunk=int(
        os.environ.get("MLXSERVE_PREFILL_CHUNK", "256")))
    th = threading.Thread(target=e.run, daemon=True)
    th.start()
    params = SamplingParams(temperature=0, repeat_penalty=1.0)
    vocab = int(lm.config["vocab_size"])
    result: dict = {"levels": {}}
    sid = 0
    with cv:
        cv.wait_for(lambda: events)
        result["ready"] = repr(events.pop(0))[:200]
    for b in batches:
        for run in range(2):
            sink.clear()
            rng = random.Random(b * 7 + run)
            ids = []
            with cv:
                events.clear()
            t0 = time.perf_counter()
            for _ in range(b):
                sid += 1
                ids.append(sid)
                e.submit(eng.Add(sid, [rng.randrange(100, vocab) for _ in range(prompt_len)], tokens, params))
            first: dict[int, float] = {}
            done: set[int] = set()
            ntok = 0
            last = t0
            while len(done) < b:
                with cv:
                    cv.wait_for(lambda: events)
                    batch, events[:] = list(events), []
                now = time.perf_counter()
                for ev in batch:
                    if isinstance(ev, eng.Chunk):
                        if ev.token_ids:
                            first.setdefault(ev.seq_id, now)
                            ntok += len(ev.token_ids)
                            last = now
                        if ev.finish:
                            done.add(ev.seq_id)
            span = last - min(first.values())
            level = {"decode_tok_s": (ntok - b) / span, "ttft_max_s": max(first.values()) - t0,
                     "steps": summarize_windows(sink)}
            if run == 1:
                result["levels"][b] = level
                print(f"  engine batch {b:>3}: {level['decode_tok_s']:8.1f} tok/s  ttft max {level['ttft_max_s']:.3f}s"
                      f"  per step {level['steps']}", flush=True)
    e.submit(eng.Shutdown())
    th.join(timeout=60)
    return result


def step_ops(lm, batch: int, generator, logprobs: bool = False) -> dict[str, int]:
    """Graph ops of one decode step of ``batch`` greedy rows (what the step hands async_eval),
    by primitive; ``logprobs``: the first row reports log-probabilities."""
    import collections
    import importlib
    import io
    import re

    import mlx.core as mx

    from mlxserve.engine import loop as eng
    from mlxserve.engine.sampling import SamplingParams, make_sampler

    g = importlib.import_module("mlx_lm.generate")
    counts: collections.Counter = collections.Counter()
    real = mx.async_eval

    class _Capture:
        def __getattr__(self, name):
            return getattr(mx, name)

        @staticmethod
        def async_eval(*a):
            if capture[0]:
                f = io.StringIO()
                mx.export_to_dot(f, *[x for x in a if isinstance(x, mx.array) or x])
                counts.update(re.findall(r'label ="([^"]+)", shape=rectangle', f.getvalue()))
                capture[0] = False
            real(*a)

    capture = [False]
    saved = g.mx, eng.mx
    g.mx = eng.mx = _Capture()
    samplers = [make_sampler(SamplingParams(temperature=0)) for _ in range(batch)]
    if logprobs:
        samplers[0] = eng._WithLogprobs(samplers[0])
    gen = generator(lm.model, stop_tokens=[], completion_batch_size=batch, prefill_batch_size=batch)
    try:
        gen.insert([[100 + i, 200 + i, 300 + i] for i in range(batch)], max_tokens=[8] * batch, samplers=samplers)
        while len(gen.next()[1]) < batch:  # until every row decodes
            pass
        capture[0] = True
        gen.next()
    finally:
        gen.close()
        g.mx, eng.mx = saved
    return dict(counts)


def ops(fused, plain, batches: list[int]) -> dict:
    """step_ops for the variants of ab(), and 'now' with one row asking for log-probabilities."""
    from mlx_lm.generate import BatchGenerator

    from mlxserve.engine import loop as eng

    variants = {"before": (plain, BatchGenerator, False), "unfused": (plain, eng._BatchGenerator, False),
                "now": (fused, eng._BatchGenerator, False), "now_logprobs": (fused, eng._BatchGenerator, True)}
    out: dict = {}
    for b in batches:
        out[b] = {name: step_ops(lm, b, gen, lp) for name, (lm, gen, lp) in variants.items()}
        print(f"batch {b:>3} graph ops per decode step: " + ", ".join(
            f"{name} {sum(c.values())}" for name, c in out[b].items()), flush=True)
    return out


class _TimedModel:
    """The model, with the time of each call (building a step's graph) appended to ``sink``."""

    def __init__(self, model, sink: list) -> None:
        self._model, self._sink = model, sink

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *a, **k):
        t = time.perf_counter()
        out = self._model(*a, **k)
        self._sink.append(time.perf_counter() - t)
        return out


def ab(fused, plain, batches: list[int], prompt_len: int, rounds: int = 30, steps: int = 8) -> dict:
    """Decode steps of the three variants side by side: one generator each, greedy rows, taking
    turns ``steps`` steps at a time in a shuffled order, ``rounds`` times (a busy machine's drift
    falls on all three alike); median ms per step of each and its ratio to 'before'."""
    import statistics

    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    from mlxserve.engine import loop as eng
    from mlxserve.engine.sampling import SamplingParams, make_sampler

    variants = {"before": (plain, BatchGenerator), "unfused": (plain, eng._BatchGenerator),
                "now": (fused, eng._BatchGenerator)}
    out: dict = {}
    for b in batches:
        rng = random.Random(b)
        vocab = int(fused.config["vocab_size"])
        prompts = [[rng.randrange(100, vocab) for _ in range(prompt_len)] for _ in range(b)]
        gens = {}
        builds: dict = {n: [] for n in variants}
        for name, (lm, cls) in variants.items():
            model = _TimedModel(lm.model, builds[name])
            gen = gens[name] = cls(model, stop_tokens=[], completion_batch_size=b, prefill_batch_size=b)
            gen.insert(prompts, max_tokens=[1 << 20] * b,
                       samplers=[make_sampler(SamplingParams(temperature=0)) for _ in range(b)])
            while len(gen.next()[1]) < b:
                pass
        times: dict = {n: [] for n in variants}
        tokens: dict = {n: [] for n in variants}
        for _ in range(rounds):
            order = list(variants)
            rng.shuffle(order)
            for name in order:
                for _ in range(steps):
                    t = time.perf_counter()
                    responses = gens[name].next()[1]
                    times[name].append(time.perf_counter() - t)
                    tokens[name].append([r.token for r in responses])
        for gen in gens.values():
            gen.close()
        mx.clear_cache()
        ms = {n: 1e3 * statistics.median(v) for n, v in times.items()}
        build = {n: 1e3 * statistics.median(v[-len(times[n]):]) for n, v in builds.items()}
        out[b] = {n: {"ms_per_step": ms[n], "ratio_to_before": ms["before"] / ms[n], "build_ms": build[n],
                      "same_tokens_as_before": tokens[n] == tokens["before"]} for n in variants}
        print(f"batch {b:>3} ms per decode step (median of {rounds * steps}), and of it building the graph: "
              + "  ".join(f"{n} {ms[n]:.2f} ({ms['before'] / ms[n]:.3f}x), build {build[n]:.2f} "
                          f"({build['before'] / build[n]:.3f}x)" for n in variants), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=300)
    ap.add_argument("--no-loops", action="store_true")
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--no-engine", action="store_true")
    ap.add_argument("--no-parts", action="store_true")
    ap.add_argument("--masked-decode", action="store_true",
                    help="engine: mlx-lm's attention mask on every decode step, as before engine/loop.py dropped it")
    ap.add_argument("--ab", action="store_true",
                    help="decode steps side by side, taking turns: 'before' (separate q/k/v and gate/up "
                         "products, mlx-lm's step normalizing every row), 'unfused' (separate products), 'now'")
    ap.add_argument("--ops", action="store_true",
                    help="graph ops of one decode step per batch size for ab's variants (no timing)")
    ap.add_argument("--weight-dtype", help="with --ab / --ops: MLXSERVE_WEIGHT_DTYPE's choices (on the CPU 'keep' "
                                           "builds the GPU's graph: quantized products as stored)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import mlx.core as mx

    from mlxserve.engine.model import load_path

    batches = [int(x) for x in args.batches.split(",")]
    report: dict = {"device": str(mx.default_device()), "args": vars(args) | {"model": str(args.model),
                                                                              "json": str(args.json)}}

    def save():
        if args.json:
            args.json.write_text(json.dumps(report, indent=1, default=str))

    if args.ab or args.ops:
        fused, plain = (load_path(args.model, weight_dtype=args.weight_dtype, fuse=f) for f in (True, False))
        if args.ops:
            report["ops"] = ops(fused, plain, batches)
            save()
        if args.ab:
            report["ab"] = ab(fused, plain, batches, args.prompt_len)
            save()
        return
    t = time.perf_counter()
    lm = load_path(args.model)
    report["load_s"] = time.perf_counter() - t
    print(f"loaded {args.model.name} in {report['load_s']:.1f}s", flush=True)
    if not args.no_loops:
        report["loops"] = loops(lm, batches, args.prompt_len, args.tokens)
        save()
    if not args.no_parts:
        report["parts"] = parts(lm, batches, args.prompt_len)
        save()
    if not args.no_engine:
        if args.masked_decode:
            from mlx_lm.models.cache import BatchKVCache

            import mlxserve.engine.loop  # noqa: F401  (its wrapper first, then undone)
            BatchKVCache.make_mask = BatchKVCache.make_mask.__wrapped__
        report["engine"] = engine(lm, batches, args.prompt_len, args.tokens)
        save()
    if not args.no_kernels:
        report["kernels"] = kernels(lm)
        save()


if __name__ == "__main__":
    main()
