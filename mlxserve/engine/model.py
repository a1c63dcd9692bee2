"""Build an mlx-lm model from a GGUF file or an mlx-lm / Hugging Face directory.

Must be called on the thread that will run the model (MLX streams are per thread).
"""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import _get_classes

from ..config import CpuSettings
from ..errors import LoadError, UnsupportedModel
from . import gguf, patches, sharding, tokenizer as tok
from .cuda import linear as cuda_linear
from .fuse import fuse_projections
from .submit import submit_in_parts

log = logging.getLogger(__name__)


@attrs.define
class LoadedModel:
    model: nn.Module
    tokenizer: tok.TokenizerInfo
    config: dict[str, Any]
    weight_bytes: int
    context_length: int
    weight_dtype: str = "keep"
    vision: Any = None  # engine/vision.py's VisionParts for a model that takes images

    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers", 0))


def _quantize_like(model: nn.Module, quant: dict[str, Any] | None, weights: dict[str, mx.array]):
    if not quant:
        return
    # Per-layer exceptions: ours under "layers"; mlx-lm's own format puts them at the top level.
    layers = {
        **{k: v for k, v in quant.items() if isinstance(v, dict) and k != "layers"},
        **(quant.get("layers") or {}),
    }

    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in weights:
            return False
        if layers and path in layers:
            return layers[path]
        return {"group_size": quant["group_size"], "bits": quant["bits"]}

    nn.quantize(model, group_size=quant["group_size"], bits=quant["bits"], class_predicate=predicate)


class _FlatQuantizedLinear(nn.QuantizedLinear):
    """mlx-cuda 0.32 runs quantized_matmul on a (B, 1, D) input (every decode step) about 20x
    slower than on (B, D) (benchmarks/results/history-gpu.md): hand it 2-D inputs."""

    def __call__(self, x):
        if x.ndim > 2:
            lead = x.shape[:-1]
            return super().__call__(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)
        return super().__call__(x)


class _CudaQuantizedLinear(_FlatQuantizedLinear):
    """On CUDA: products routed by row count around mlx-cuda's slow spots (engine/cuda/linear.py)."""

    def __call__(self, x):
        if x.ndim != 2:
            lead = x.shape[:-1]
            return self(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)
        y = cuda_linear.quantized_linear(
            x, self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits, self.mode
        )
        return y + self["bias"] if "bias" in self else y


def _flatten_quantized_inputs(model: nn.Module) -> None:
    # Swapping the class keeps the parameter tree (and load_weights) exactly as it was.
    on_cuda = mx.default_device().type == mx.DeviceType.gpu and mx.cuda.is_available()
    for _, m in model.named_modules():
        if type(m) is nn.QuantizedLinear:
            m.__class__ = _CudaQuantizedLinear if on_cuda else _FlatQuantizedLinear


def _build(config: dict[str, Any], weights: dict[str, mx.array]) -> nn.Module:
    try:
        model_class, args_class = _get_classes(config)
    except Exception as exc:
        raise UnsupportedModel(f"unsupported model type '{config.get('model_type')}'") from exc
    model = model_class(args_class.from_dict(config))
    patches.apply(model, config)  # where mlx-lm's classes differ from the models as trained
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    _quantize_like(model, config.get("quantization"), weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise LoadError(f"weights do not match the model: {exc}") from exc
    sharding.shard(model, config)  # on a group: this rank's part only, before the weights are read
    mx.eval(model.parameters())
    _flatten_quantized_inputs(model)
    model.eval()
    return model


def _nbytes(weights: dict[str, mx.array]) -> int:
    return sum(w.nbytes for w in weights.values())


def load_gguf(path: str | Path) -> LoadedModel:
    config, weights, metadata = gguf.load_gguf_weights(path)
    tokenizer = tok.from_gguf_metadata(metadata)
    model = _build(config, weights)
    return LoadedModel(model, tokenizer, config, _nbytes(weights), config["max_position_embeddings"])


def load_directory(path: str | Path) -> LoadedModel:
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(f"cannot read config.json in {path.name}: {exc}") from exc
    files = sorted(glob.glob(str(path / "*.safetensors")))
    if not files:
        raise LoadError(f"no *.safetensors weights in {path.name}")
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(mx.load(f))
    if (
        mx.default_device().type == mx.DeviceType.gpu
        and config.get("quantization")
        and all(w.ndim == 1 or gguf.is_router(name) for name, w in weights.items() if w.dtype == mx.float32)
    ):
        # A K-quant GGUF converted at import (store/convert.py) keeps the file's float32 norm
        # vectors, which would make every activation float32 on a GPU (see gguf.half_floats).
        weights = gguf.half_floats(weights)
    tokenizer = tok.from_directory(path)
    model = _build(config, weights)
    ctx = int(config.get("max_position_embeddings") or 4096)
    return LoadedModel(model, tokenizer, config, _nbytes(weights), ctx)


def load_path(path: str | Path, *, weight_dtype: str | None = None, fuse: bool = True) -> LoadedModel:
    """``fuse``: one product for each layer's q/k/v and gate/up projections (engine/fuse.py)."""
    path = Path(path)
    sharding.announce(path, weight_dtype)  # rank 0 of a group: the followers load it too
    from . import vision  # imports mlx-vlm only for a vision model

    if path.is_dir() and vision.is_vision_dir(path):
        *fields, parts = vision.load_directory(path)
        lm = LoadedModel(*fields, vision=parts)
    else:
        lm = load_directory(path) if path.is_dir() else load_gguf(path)
    _apply_weight_dtype(lm, weight_dtype, fuse)
    if mx.default_device() == mx.cpu:
        log.debug("layers submitted early: %d", submit_in_parts(lm.model, CpuSettings.from_env().submit_layers))
    return lm


def _apply_weight_dtype(lm: LoadedModel, setting: str | None, fuse: bool = True) -> None:
    """MLX's quantized CPU kernels are slow: on the CPU products go through engine/cpu's
    kernels where they build, else the weights are dequantized to f32 (BLAS) when that fits."""
    from . import cpu, dtype as dtypes

    device = mx.default_device().type.name  # "cpu" or "gpu"
    kernels = None
    if device == "cpu" and dtypes.parse_setting(setting) in (None, dtypes.QKERNELS):
        kernels, why = cpu.load()
        if kernels is None:
            log.info("quantized CPU kernels unavailable (%s): dequantizing to float32", why)
    choice = dtypes.choose_weight_dtype(
        device, lm.weight_bytes, setting, None, float32_bytes=dtypes.float_bytes(lm.model), kernels=kernels is not None
    )
    if choice == dtypes.QKERNELS and kernels is None:
        choice = "float32"  # asked for explicitly, but they cannot be built here
    if fuse:
        # Before the swaps below, so the fused linears are what they swap. The CPU kernels
        # compute gate/up with the SiLU as one op of their own: those stay apart there.
        fused = fuse_projections(lm.model, gate_up=choice != dtypes.QKERNELS)
        log.debug("fused %d projection groups", fused)
    if choice == dtypes.QKERNELS:
        dtypes.use_cpu_kernels(lm.model, kernels)
        lm.weight_bytes = dtypes.parameter_bytes(lm.model)
    elif choice != "keep":
        dtypes.dequantize_model(lm.model, getattr(mx, choice))
        lm.weight_bytes = dtypes.parameter_bytes(lm.model)
    lm.weight_dtype = choice
