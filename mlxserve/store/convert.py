"""Weight conversions done at create time, each writing an mlx-lm model directory.

* GGUF files whose tensor types ``mx.load`` cannot keep quantized (K-quants, IQ*, Q5_*, BF16):
  every tensor is dequantized with the ``gguf`` package and re-quantized with ``mx.quantize``.
  (``mx.load`` would cast them to fp16 itself, but its Q4_K path does not match llama.cpp's
  dequantization, so it is not used for these files.) The tokenizer and chat template are
  rebuilt from the GGUF metadata as tokenizer.json / tokenizer_config.json.
* ``--quantize q4|q8`` of a float safetensors directory, through mlx-lm's own quantizer.
"""

from __future__ import annotations

import contextlib
import io
import json
import mmap
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import dequantize

from ..errors import BadRequest, MlxserveError
from .ggufmeta import GGUFHeader, TensorInfo, tensor_bytes

# Tensor types mx.load keeps quantized (Q*) or reads exactly (F*): such files are stored as is.
KEPT_TYPES = frozenset({T.F32, T.F16, T.Q4_0, T.Q4_1, T.Q8_0})
EIGHT_BIT_SOURCES = frozenset({T.Q6_K, T.Q8_K, T.Q8_0, T.Q8_1})
FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16, T.F64})
GROUP_SIZE = 64


def needs_conversion(header: GGUFHeader) -> bool:
    for t in header.tensors:
        try:
            T(t.ggml_type)
        except ValueError:
            raise BadRequest(f"tensor {t.name} has an unknown GGUF type {t.ggml_type}") from None
    return any(T(t.ggml_type) not in KEPT_TYPES for t in header.tensors)


def bits_for(ggml_type: int) -> int:
    """Q6_K/Q8_* keep 8 bits, everything smaller becomes 4 bits (the mlx-lm default)."""
    return 8 if T(ggml_type) in EIGHT_BIT_SOURCES else 4


def _dequantized(buf: Any, info: TensorInfo) -> np.ndarray:
    qtype = T(info.ggml_type)
    raw = np.frombuffer(buf, dtype=np.uint8, count=tensor_bytes(info), offset=info.offset)
    if qtype == T.F32:
        return raw.view(np.float32).reshape(info.shape)
    if qtype == T.F16:
        return raw.view(np.float16).reshape(info.shape)
    if qtype == T.F64:
        return raw.view(np.float64).astype(np.float32).reshape(info.shape)
    cols = info.shape[-1]
    rows = info.n_elements // cols
    out = dequantize(raw.reshape(rows, -1), qtype)  # BF16 included: gguf widens it to f32
    return np.asarray(out, dtype=np.float32).reshape(info.shape)


def _convert_tensor(buf: Any, info: TensorInfo, target: str) -> tuple[dict[str, mx.array], dict | None]:
    """The mlx tensors for one GGUF tensor, and its per-layer quantization (None if kept)."""
    qtype = T(info.ggml_type)
    data = _dequantized(buf, info)
    if len(info.shape) < 2:
        return {target: mx.array(data)}, None  # norms stay as the file had them (F32)
    dtype = mx.bfloat16 if qtype == T.BF16 else mx.float16
    w = mx.array(data).astype(dtype)
    if qtype in FLOAT_TYPES:
        return {target: w}, None
    cols = info.shape[-1]
    group = GROUP_SIZE if cols % GROUP_SIZE == 0 else 32 if cols % 32 == 0 else 0
    if not group:
        return {target: w}, None
    bits = bits_for(qtype)
    wq, scales, biases = mx.quantize(w, group_size=group, bits=bits, stream=mx.cpu)  # the exact, reproducible result
    prefix = target[: -len(".weight")]
    mx.eval(wq, scales, biases)
    return ({f"{prefix}.weight": wq, f"{prefix}.scales": scales, f"{prefix}.biases": biases},
            {"group_size": group, "bits": bits})


def _quantization_config(layers: dict[str, dict]) -> dict | None:
    if not layers:
        return None
    counts: dict[tuple[int, int], int] = {}
    for q in layers.values():
        key = (q["group_size"], q["bits"])
        counts[key] = counts.get(key, 0) + 1
    group, bits = max(counts, key=counts.__getitem__)
    exceptions = {k: v for k, v in layers.items() if (v["group_size"], v["bits"]) != (group, bits)}
    # mlx-lm reads per-layer entries at the top level; mlxserve.engine reads them under "layers".
    return {"group_size": group, "bits": bits, **exceptions, "layers": exceptions}


def convert_gguf(path: Path, header: GGUFHeader, out_dir: Path,
                 progress: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json for the
    llama-family GGUF at ``path`` into ``out_dir``; returns the config."""
    from ..engine.gguf import config_from_metadata, rename_tensor
    from ..engine.tokenizer import from_gguf_metadata

    md = header.metadata
    try:
        config = config_from_metadata(md)
        tok = from_gguf_metadata(md)
    except MlxserveError as exc:
        raise BadRequest(f"cannot convert {path.name}: {exc}") from None
    weights: dict[str, mx.array] = {}
    quant_layers: dict[str, dict] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for i, info in enumerate(header.tensors):
            target = rename_tensor(info.name)
            if target is None:
                continue  # e.g. rope_freqs: not part of mlx-lm's llama
            if progress is not None:
                progress({"status": "converting model", "total": len(header.tensors),
                          "completed": i})
            try:
                tensors, q = _convert_tensor(mm, info, target)
            except NotImplementedError as exc:  # a type the gguf package cannot dequantize
                raise BadRequest(f"cannot convert {path.name}: {exc}") from None
            weights.update(tensors)
            if q is not None:
                quant_layers[target[: -len(".weight")]] = q
    config["tie_word_embeddings"] = "lm_head.weight" not in weights
    quant = _quantization_config(quant_layers)
    if quant is not None:
        config["quantization"] = quant
    config["bos_token_id"] = tok.bos_token_id
    config["eos_token_id"] = tok.eos_token_ids
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "tokenizer.json").write_text(tok.tokenizer.to_str())
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "add_bos_token": tok.add_bos,
        "model_max_length": config["max_position_embeddings"],
    }
    if tok.chat_template:
        tok_config["chat_template"] = tok.chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return config


def quantize_directory(src: Path, out_dir: Path, bits: int) -> dict[str, Any]:
    """Quantize a float mlx-lm / HF directory with mlx-lm (group 64); writes model.safetensors
    and config.json into ``out_dir`` and returns the new config."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model, quantize_model

    try:
        model, config = load_model(src, lazy=True)
    except Exception as exc:  # mlx-lm raises ValueError/FileNotFoundError/KeyError freely
        raise BadRequest(f"cannot quantize {src.name}: {exc}") from None
    with contextlib.redirect_stdout(io.StringIO()):  # quantize_model prints its bits per weight
        model, config = quantize_model(model, config, GROUP_SIZE, bits)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return config
