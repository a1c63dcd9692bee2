"""Decode speed of every GGUF architecture mlxserve imports, next to llama.cpp's.

    python benchmarks/families.py [--shape smol|1b|8b|tiny] [--quant Q4_0|Q8_0|Q4_K]
        [--families llama,qwen2,...] [--streams 1,8] [--tokens 128] [--prompt-len 300] [--runs 2]
        [--cuda auto|on|off] [--only llama|mlxserve] [--llama-server BIN] [--gguf-dir DIR]
        [--vocab-from GGUF] [--write-only] [--log-dir DIR] [--json out.json]

For each family a random-weight GGUF of a realistic shape is written (tensor names, layouts and
metadata as llama.cpp's converter writes them; SmolLM2's 49k vocabulary and tokenizer metadata
for all), then served by llama-server and by mlxserve one after the other, alone, through
benchmarks/vs_llamacpp.py (same build of llama-server, same streaming ``/v1/completions``
client, same warm-up and best-of-``--runs``). Per family and stream count: decode tok/s of
each, mlxserve / llama-server, TTFT p50 and max of each (vs_llamacpp's table), and a line
where any stream got fewer than ``--tokens``.

Shapes (``--shape``): ``smol`` (the CPU default) is SmolLM2-135M's (hidden 576, 30 layers, ffn
1536, 9 heads, 3 KV heads) with each family's own parts: qwen2's Q/K/V biases, qwen3's q/k
norms, qwen3moe's 8 experts (top 2, expert ffn 768), gemma's 256-wide heads (4 heads, 1 KV
head as Gemma 3 270M/1B), soft-caps (gemma2) and sliding windows (gemma2 every other layer,
gemma3 five of six), phi3's fused QKV and gate/up. ``1b`` (a short GPU run) is the 1B-class
model of each family: Llama 3.2 1B, Qwen2.5 1.5B, Qwen3 1.7B, Qwen3-30B-A3B's layer with 6
layers, Gemma 2 2B, Gemma 3 1B, and Llama 3.2 1B's dimensions with phi3's layout. ``8b`` (the GPU default) is the 8B-class
model of each family: Llama 3 8B, Qwen2.5 7B, Qwen3 8B, Qwen3-30B-A3B with 24 of its 48 layers
(128 experts, top 8), Gemma 2 9B, Gemma 3 12B, and Llama 3 8B's dimensions with phi3's fused
layout. ``tiny`` (2 layers, hidden 256) only checks that the path works.

Weights are random quantized blocks drawn directly (no float model is made: an 8B file takes
seconds), scaled so activations stay near unit size. Norms are float32 ones, the MoE router
float32, as llama.cpp's quantizer leaves them. The output rows of control tokens (the embedding
rows where the head is tied) are exactly zero: their logit is 0 while the largest of 49k random
logits is positive, so greedy decoding never ends a stream early. With ``--quant Q4_K`` a matrix
whose rows are not a whole number of 256-value super-blocks is Q5_0, as llama-quantize does.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vs_llamacpp as vs  # noqa: E402

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3")
TIED = ("qwen3", "gemma2", "gemma3")  # as tests' ggufmodels: these tie the head to the embedding
FILE_TYPES = {"Q4_0": 2, "Q8_0": 7, "Q4_K": 15}  # llama_ftype: MOSTLY_Q4_0, MOSTLY_Q8_0, MOSTLY_Q4_K_M

_BASE = {
    "tiny": {"layers": 2, "hidden": 256, "ffn": 512, "heads": 4, "kv_heads": 2, "head_dim": 64},
    "smol": {"layers": 30, "hidden": 576, "ffn": 1536, "heads": 9, "kv_heads": 3, "head_dim": 64},
    "1b": {"layers": 16, "hidden": 2048, "ffn": 8192, "heads": 32, "kv_heads": 8, "head_dim": 64},
    "8b": {"layers": 32, "hidden": 4096, "ffn": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128},
}
_FAMILY = {
    "tiny": {"qwen3moe": {"experts": 4, "experts_used": 2, "expert_ffn": 256},
             "gemma2": {"heads": 2, "kv_heads": 1, "head_dim": 128, "window": 4096},
             # mlx-lm's gemma3_text reads the cache of layer pattern - 1: fewer layers than 6 need a shorter pattern
             "gemma3": {"heads": 2, "kv_heads": 1, "head_dim": 128, "window": 8, "swa_pattern": 2}},
    "smol": {"llama": {"rope_theta": 100000.0},
             "qwen2": {"rope_theta": 1e6}, "qwen3": {"rope_theta": 1e6},
             "qwen3moe": {"rope_theta": 1e6, "experts": 8, "experts_used": 2, "expert_ffn": 768},
             "gemma2": {"heads": 4, "kv_heads": 1, "head_dim": 256, "window": 4096},
             "gemma3": {"heads": 4, "kv_heads": 1, "head_dim": 256, "window": 512, "rope_theta": 1e6}},
    "1b": {"llama": {"rope_theta": 500000.0},
           "qwen2": {"layers": 28, "hidden": 1536, "ffn": 8960, "heads": 12, "kv_heads": 2, "head_dim": 128,
                     "rope_theta": 1e6},
           "qwen3": {"layers": 28, "ffn": 6144, "heads": 16, "head_dim": 128, "rope_theta": 1e6},
           "qwen3moe": {"layers": 6, "ffn": 6144, "kv_heads": 4, "head_dim": 128, "rope_theta": 1e6,
                        "experts": 128, "experts_used": 8, "expert_ffn": 768},
           "gemma2": {"layers": 26, "hidden": 2304, "ffn": 9216, "heads": 8, "kv_heads": 4, "head_dim": 256,
                      "window": 4096},
           "gemma3": {"layers": 26, "hidden": 1152, "ffn": 6912, "heads": 4, "kv_heads": 1, "head_dim": 256,
                      "window": 512, "rope_theta": 1e6},
           "phi3": {"rope_theta": 500000.0}},
    "8b": {"llama": {"rope_theta": 500000.0},
           "qwen2": {"layers": 28, "hidden": 3584, "ffn": 18944, "heads": 28, "kv_heads": 4, "rope_theta": 1e6},
           "qwen3": {"layers": 36, "ffn": 12288, "rope_theta": 1e6},
           "qwen3moe": {"layers": 24, "hidden": 2048, "ffn": 6144, "heads": 32, "kv_heads": 4, "rope_theta": 1e6,
                        "experts": 128, "experts_used": 8, "expert_ffn": 768},
           "gemma2": {"layers": 42, "hidden": 3584, "heads": 16, "kv_heads": 8, "head_dim": 256, "window": 4096},
           "gemma3": {"layers": 48, "hidden": 3840, "ffn": 15360, "heads": 16, "kv_heads": 8, "head_dim": 256,
                      "window": 1024, "rope_theta": 1e6},
           "phi3": {"rope_theta": 500000.0}},
}


def shape_of(family: str, shape: str) -> dict:
    return {"rope_theta": 10000.0, **_BASE[shape], **_FAMILY[shape].get(family, {})}


# ---------------------------------------------------------------- random quantized blocks
# (values per block, bytes per block, standard deviation of a block's values at scale 1)
_BLOCKS = {"Q4_0": (32, 18, 4.61), "Q8_0": (32, 34, 73.9), "Q5_0": (32, 22, 9.23), "Q4_K": (256, 144, 9.22)}


def matrix_type(quant: str, cols: int) -> str:
    return "Q5_0" if quant == "Q4_K" and cols % 256 else quant


def random_blocks(rng, qtype: str, rows: int, cols: int, gain: float = 0.5, zero_rows=()) -> np.ndarray:
    """(rows, cols) of uniformly random quants whose values have std ``gain / sqrt(cols)``, as
    ``qtype``'s raw bytes; ``zero_rows`` are exactly zero (every byte 0: scales and minimums 0)."""
    per, size, std = _BLOCKS[qtype]
    blocks = cols // per
    n = rows * blocks * size
    # random_raw: 64 random bits at a time, ~2.5x rng.bytes (an 8B file is ~4 GB of these)
    raw = rng.bit_generator.random_raw(-(-n // 8)).view(np.uint8)[:n].reshape(rows, blocks, size)
    scale = np.array([gain / (std * math.sqrt(cols))], np.float16).view(np.uint8)
    raw[:, :, 0:2] = scale
    if qtype == "Q4_K":
        # dmin = d, 6-bit sub-block scales 2 and minimums 15 packed as llama.cpp's get_scale_min_k4:
        # value = 2 d q - 15 d = d (2q - 15), centred on zero
        raw[:, :, 2:4] = scale
        raw[:, :, 4:8] = 2
        raw[:, :, 8:12] = 15
        raw[:, :, 12:16] = 2 | (15 << 4)
    raw[list(zero_rows)] = 0
    return raw.reshape(rows, blocks * size)


# ---------------------------------------------------------------- the GGUF
def tensor_plan(family: str, s: dict, vocab: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape in numpy order, kind) for every tensor, in llama.cpp's layout; kind is
    "matrix", "norm" (F32 ones), "bias" / "router" (F32)."""
    hidden, hd = s["hidden"], s["head_dim"]
    q_out, kv_out = s["heads"] * hd, s["kv_heads"] * hd
    plan = [("token_embd.weight", (vocab, hidden), "matrix")]
    for i in range(s["layers"]):
        p = f"blk.{i}."
        plan.append((p + "attn_norm.weight", (hidden,), "norm"))
        if family == "phi3":
            plan.append((p + "attn_qkv.weight", (q_out + 2 * kv_out, hidden), "matrix"))
        else:
            plan += [(p + "attn_q.weight", (q_out, hidden), "matrix"), (p + "attn_k.weight", (kv_out, hidden), "matrix"),
                     (p + "attn_v.weight", (kv_out, hidden), "matrix")]
        if family == "qwen2":
            plan += [(p + "attn_q.bias", (q_out,), "bias"), (p + "attn_k.bias", (kv_out,), "bias"),
                     (p + "attn_v.bias", (kv_out,), "bias")]
        if family in ("qwen3", "qwen3moe", "gemma3"):
            plan += [(p + "attn_q_norm.weight", (hd,), "norm"), (p + "attn_k_norm.weight", (hd,), "norm")]
        plan.append((p + "attn_output.weight", (hidden, q_out), "matrix"))
        if family in ("gemma2", "gemma3"):
            plan.append((p + "post_attention_norm.weight", (hidden,), "norm"))
        plan.append((p + "ffn_norm.weight", (hidden,), "norm"))
        if family == "qwen3moe":
            e, f = s["experts"], s["expert_ffn"]
            plan += [(p + "ffn_gate_inp.weight", (e, hidden), "router"),
                     (p + "ffn_gate_exps.weight", (e, f, hidden), "matrix"),
                     (p + "ffn_up_exps.weight", (e, f, hidden), "matrix"),
                     (p + "ffn_down_exps.weight", (e, hidden, f), "matrix")]
        elif family == "phi3":
            plan += [(p + "ffn_up.weight", (2 * s["ffn"], hidden), "matrix"),
                     (p + "ffn_down.weight", (hidden, s["ffn"]), "matrix")]
        else:
            plan += [(p + "ffn_gate.weight", (s["ffn"], hidden), "matrix"),
                     (p + "ffn_up.weight", (s["ffn"], hidden), "matrix"),
                     (p + "ffn_down.weight", (hidden, s["ffn"]), "matrix")]
        if family in ("gemma2", "gemma3"):
            plan.append((p + "post_ffw_norm.weight", (hidden,), "norm"))
    plan.append(("output_norm.weight", (hidden,), "norm"))
    if family not in TIED:
        plan.append(("output.weight", (vocab, hidden), "matrix"))
    return plan


@functools.cache
def tokenizer_of(vocab_from: Path | None = None) -> tuple[list[tuple], list[int]]:
    """The tokenizer.* metadata of ``vocab_from`` (default: the embedded SmolLM2) as (key, value,
    type, array item type), and its token types (parsing a GGUF is slow: once per run)."""
    from gguf import GGUFReader, GGUFValueType as V

    reader = GGUFReader(str(vocab_from or vs.smollm2_gguf()))
    fields = [(name, f.contents(), f.types[0], f.types[1] if f.types[0] == V.ARRAY else None)
              for name, f in reader.fields.items() if name.startswith("tokenizer.")]
    return fields, list(reader.fields["tokenizer.ggml.token_type"].contents())


def write_family_gguf(out: Path, family: str, shape: str, quant: str, vocab_from: Path | None = None,
                      seed: int = 0) -> Path:
    """Streams the tensors to ``out`` one at a time (an 8B file never sits in memory)."""
    from gguf import GGMLQuantizationType as T, GGUFWriter

    s = shape_of(family, shape)
    fields, token_types = tokenizer_of(vocab_from)
    vocab = len(token_types)
    control = [i for i, t in enumerate(token_types) if t == 3]
    head = "token_embd.weight" if family in TIED else "output.weight"
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(out), family)
    w.add_name(f"random-{shape}")  # not the family's name: llama.cpp keys vocabulary rules on "phi3" in it
    w.add_file_type(FILE_TYPES[quant])
    w.add_context_length(8192)
    w.add_embedding_length(s["hidden"])
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_key_length(s["head_dim"])
    w.add_value_length(s["head_dim"])
    w.add_rope_dimension_count(s["head_dim"])
    w.add_rope_freq_base(s["rope_theta"])
    w.add_layer_norm_rms_eps(1e-5 if family == "llama" else 1e-6)
    w.add_vocab_size(vocab)
    if family == "gemma2":
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
        w.add_sliding_window(s["window"])
    elif family == "gemma3":
        w.add_sliding_window(s["window"])
        w.add_uint32(f"{family}.attention.sliding_window_pattern", s.get("swa_pattern", 6))
        w.add_float32(f"{family}.rope.freq_base_swa", 10000.0)
    elif family == "qwen3moe":
        w.add_expert_count(s["experts"])
        w.add_expert_used_count(s["experts_used"])
        w.add_expert_feed_forward_length(s["expert_ffn"])
    elif family == "phi3":
        w.add_rope_scaling_orig_ctx_len(4096)
    for key, value, vtype, sub in fields:
        w.add_key_value(key, value, vtype, sub)

    plan = tensor_plan(family, s, vocab)
    for name, shp, kind in plan:
        if kind == "matrix":
            qtype = matrix_type(quant, shp[-1])
            per, size, _ = _BLOCKS[qtype]
            nbytes = math.prod(shp[:-1]) * shp[-1] // per * size
            w.add_tensor_info(name, (*shp[:-1], shp[-1] // per * size), np.dtype(np.uint8), nbytes,
                              raw_dtype=T[qtype])
        else:
            w.add_tensor_info(name, shp, np.dtype(np.float32), 4 * math.prod(shp))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shp, kind in plan:
        if kind == "matrix":
            rows = math.prod(shp[:-1])
            data = random_blocks(rng, matrix_type(quant, shp[-1]), rows, shp[-1],
                                 zero_rows=control if name == head else ())
        elif kind == "norm":
            data = np.ones(shp, np.float32)
        elif kind == "router":
            data = (rng.standard_normal(shp) / math.sqrt(shp[-1])).astype(np.float32)
        else:
            data = (0.1 * rng.standard_normal(shp)).astype(np.float32)
        w.write_tensor_data(data.reshape(-1))
    w.close()
    return out


# ---------------------------------------------------------------- the runs
def run_family(result: dict, family: str, args, binary: Path | None, cuda: bool, gguf_dir: Path, logs: Path) -> None:
    """Fills ``result`` as it goes: a server that fails leaves the other's rows."""
    result |= {"shape": shape_of(family, args.shape), "quant": args.quant}
    gguf = gguf_dir / f"{family}-{args.shape}-{args.quant}.gguf"
    if gguf.exists():
        result["write_s"] = 0.0
    else:
        t = time.perf_counter()
        write_family_gguf(gguf, family, args.shape, args.quant, args.vocab_from)
        result["write_s"] = round(time.perf_counter() - t, 1)
    result["gguf_gb"] = round(gguf.stat().st_size / 1e9, 3)
    print(f"== {family}: {gguf.name} ({result['gguf_gb']:.2f} GB, written in {result['write_s']}s)", flush=True)
    if args.write_only:
        return
    levels = [int(x) for x in args.streams.split(",")]
    vocab = len(tokenizer_of(args.vocab_from)[1])
    ctx = args.prompt_len + args.tokens + 64
    work = Path(tempfile.mkdtemp(prefix=f"families-{family}-"))
    try:
        if args.only != "mlxserve":
            with open(logs / f"{family}-llama-server.log", "w") as log:
                result["llama"] = vs.run_server("llama-server", *vs.start_llama(binary, gguf, max(levels), ctx, cuda, log),
                                                levels, args, vocab, "/health")
        if args.only != "llama":
            with open(logs / f"{family}-mlxserve.log", "w") as log:
                result["mlxserve"] = vs.run_server("mlxserve", *vs.start_mlxserve(gguf, work, max(levels), log),
                                                   levels, args, vocab, "/api/version")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_table(report: dict, tokens: int) -> None:
    """vs_llamacpp's table for each family, and any stream that got fewer than ``tokens``."""
    for family, res in report["families"].items():
        print(f"\n== {family} ({res.get('quant', '')}, {res.get('gguf_gb', '?')} GB)")
        if "error" in res:
            print(f"FAILED: {res['error']}")
        vs.print_table(res)
        short = [f"{name} {r['streams']} streams: {r['min_count']}" for name in ("llama", "mlxserve")
                 for r in res.get(name, {}).get("rows", []) if r["min_count"] < tokens]
        if short:
            print(f"streams ended early (fewest tokens): {'; '.join(short)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(_BASE), help="default: 8b with CUDA, smol on the CPU")
    ap.add_argument("--quant", choices=sorted(FILE_TYPES), default="Q4_0")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--streams", default="1,8")
    vs.add_common_args(ap)
    ap.add_argument("--gguf-dir", type=Path, help="write the GGUFs here and keep them (reused when present); "
                    "default: a temporary directory, each file deleted after its family")
    ap.add_argument("--write-only", action="store_true", help="write the GGUFs (into --gguf-dir) and exit")
    args = ap.parse_args()
    families = [f for f in args.families.split(",") if f]
    if unknown := set(families) - set(FAMILIES):
        ap.error(f"unknown families {sorted(unknown)} (known: {', '.join(FAMILIES)})")
    cuda = vs.use_cuda(args)
    args.shape = args.shape or ("8b" if cuda else "smol")
    if args.write_only and not args.gguf_dir:
        ap.error("--write-only needs --gguf-dir")
    binary = args.llama_server
    if binary is None and args.only != "mlxserve" and not args.write_only:
        binary = vs.build_llama_server(args.llama_cache, cuda, args.jobs)
    work = Path(tempfile.mkdtemp(prefix="families-"))
    gguf_dir = args.gguf_dir or work
    gguf_dir.mkdir(parents=True, exist_ok=True)
    logs = args.log_dir or work
    logs.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": vs.machine(), "args": {k: str(v) for k, v in vars(args).items()}, "cuda": cuda,
                    "families": {}}
    print(f"shape {args.shape}, {args.quant}, families {families}, streams {args.streams}, {args.prompt_len}-token "
          f"prompts, {args.tokens} new tokens, {'CUDA' if cuda else 'CPU'}", flush=True)
    t0 = time.perf_counter()
    try:
        for family in families:
            t = time.perf_counter()
            result = report["families"][family] = {}
            try:
                run_family(result, family, args, binary, cuda, gguf_dir, logs)
            except Exception as exc:  # one family failing must not lose the others' rows
                traceback.print_exc()
                while isinstance(exc, BaseExceptionGroup):
                    exc = exc.exceptions[0]  # trio's nursery wraps the streams' errors
                result["error"] = f"{type(exc).__name__}: {exc}"[:500]
            result["total_s"] = round(time.perf_counter() - t, 1)
            if not args.gguf_dir:
                for f in gguf_dir.glob(f"{family}-*.gguf"):
                    f.unlink()
    finally:
        if not args.log_dir:
            print(f"(logs in {logs})" if any(r.get("error") for r in report["families"].values()) else "", flush=True)
        if args.log_dir or not any(r.get("error") for r in report["families"].values()):
            shutil.rmtree(work, ignore_errors=True)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    if not args.write_only:
        print_table(report, args.tokens)
    print(f"total {report['total_s']:.0f}s", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
