"""Weight conversions done at create time, each writing an mlx-lm model directory (the store
calls these; they are here because they need MLX).

* :func:`convert_gguf`: a GGUF file whose tensor types ``mx.load`` cannot keep quantized, or
  reads wrongly (K-quants, Q5_*, IQ*, BF16). Each tensor becomes MLX's affine quantization
  (engine/ggufquant.py says which type becomes what) under the names engine/gguf.py gives it;
  the tokenizer and chat template are rebuilt from the GGUF metadata.
* :func:`quantize_directory`: ``--quantize q4|q8`` of a float safetensors directory, through
  mlx-lm's own quantizer.
* :func:`knows_model_type`: whether mlx-lm can build a directory's model (checked at create).

The module as a whole is the store's ``Converter`` (store/convert.py): whoever opens the store
passes it in, so the store imports no MLX.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import mmap
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import mlx.core as mx
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from . import gguf, ggufquant
from .tokenizer import from_gguf_metadata


class TensorInfo(Protocol):  # read only: store/ggufmeta.py's frozen TensorInfo is one
    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...  # numpy order
    @property
    def ggml_type(self) -> int: ...
    @property
    def offset(self) -> int: ...  # absolute, in the file


def _nbytes(info: TensorInfo) -> int:
    block, size = GGML_QUANT_SIZES[T(info.ggml_type)]
    n = int(np.prod(info.shape, dtype=np.int64))
    return n // block * size


def _raw(buf: Any, info: TensorInfo) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint8, count=_nbytes(info), offset=info.offset)


def convert_gguf(
    path: Path,
    metadata: dict[str, Any],
    tensors: Sequence[TensorInfo],
    out_dir: Path,
    bits_for: Callable[[T], int],
    progress: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json for the
    GGUF at ``path`` into ``out_dir``, each quantized type at ``bits_for(type)`` bits; returns
    the config."""
    arch = gguf.architecture(metadata)
    tok = from_gguf_metadata(metadata)
    weights: dict[str, mx.array] = {}
    by_name = {t.name: t for t in tensors}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:

        def vector(name: str) -> np.ndarray:
            info = by_name[name]
            arrays = ggufquant.tensor_arrays(_raw(mm, info), T(info.ggml_type), info.shape)
            return np.array(arrays["weight"].astype(mx.float32))

        config = gguf.config_from_metadata(metadata, {t.name: t.shape for t in tensors}, vector)
        for i, info in enumerate(tensors):
            target = gguf.rename_tensor(info.name, arch)
            if target is None:
                continue
            if progress is not None:
                progress({"status": "converting model", "total": len(tensors), "completed": i})
            qtype = T(info.ggml_type)
            bits = 0 if qtype in ggufquant.FLOAT_TYPES else bits_for(qtype)
            arrays = ggufquant.tensor_arrays(_raw(mm, info), qtype, info.shape, bits)
            prefix = target.rpartition(".")[0]
            weights[target] = gguf.fix_tensor(arch, target, arrays.pop("weight"))
            weights.update({f"{prefix}.{k}": v for k, v in arrays.items()})
            mx.eval([weights[target], *arrays.values()])
    gguf.complete_weights(config, weights)
    quant = gguf.quantization_of(weights)
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


def quantize_directory(src: Path, out_dir: Path, bits: int, group_size: int) -> dict[str, Any]:
    """Quantize a float mlx-lm / HF directory with mlx-lm; writes model.safetensors and
    config.json into ``out_dir`` and returns the new config. Raises ValueError for a
    directory mlx-lm cannot load."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model, quantize_model

    try:
        model, config = load_model(src, lazy=True)
    except Exception as exc:  # mlx-lm raises ValueError/FileNotFoundError/KeyError freely
        raise ValueError(str(exc)) from exc
    with contextlib.redirect_stdout(io.StringIO()):  # quantize_model prints its bits per weight
        model, config = quantize_model(model, config, group_size, bits)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return config


def knows_model_type(config: dict[str, Any]) -> bool:
    """Whether mlx-lm has an implementation of ``config``'s model type, as engine/model.py
    builds it (with mlx-lm's renames: mistral -> llama...)."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        return False
    spec = importlib.util.find_spec("mlx_lm")  # the common case, without importing mlx-lm (seconds)
    if spec is not None and spec.submodule_search_locations and model_type.isidentifier():
        if any((Path(d) / "models" / f"{model_type}.py").is_file() for d in spec.submodule_search_locations):
            return True
    from mlx_lm.utils import _get_classes

    try:
        _get_classes(config)
    except (ValueError, ImportError, KeyError, TypeError):
        return False
    return True
