"""Choose the dtype model weights run in, and dequantize a loaded model to it.

On Linux CPUs MLX's quantized matmul kernels are slow next to a float32 product through BLAS
(benchmarks/results/history-cpu.md), and f16/bf16 matmuls do not go through BLAS at all. So on
the CPU a quantized model runs on this project's own kernels (engine/cpu: integer dot products
straight from the packed weights) where they build, and is otherwise dequantized to float32 if
the 4-8x larger weights fit in memory. On a GPU quantized kernels are fast and weights stay as
loaded.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from .cpu import KernelModule, backend, pack as cpu_pack

KEEP = "keep"
QKERNELS = "quantized-cpu"  # stay quantized, products through engine/cpu's kernels
_ALIASES = {
    "quantized-cpu": QKERNELS,
    "qkernels": QKERNELS,
    "keep": KEEP,
    "quantized": KEEP,
    "native": KEEP,
    "float32": "float32",
    "f32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "f16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
# Upper bound on how much larger float32 weights are than quantized ones when only the
# quantized size is known: 2-bit weights grow 16x (4-bit with f16 scale and bias per 32: 6.4x).
# Over-estimating only errs towards staying quantized; pass float32_bytes to be exact.
_F32_EXPANSION_BOUND = 16


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def parse_setting(setting: str | None) -> str | None:
    """Normalise a user's dtype setting; None means automatic. Raises ValueError if unknown."""
    if setting is None or setting.strip().lower() in ("", "auto"):
        return None
    try:
        return _ALIASES[setting.strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown weight dtype '{setting}' (auto, quantized-cpu, keep, float32, float16, bfloat16)"
        ) from None


def choose_weight_dtype(
    device: str,
    quantized_bytes: int,
    setting: str | None,
    memory_budget: int | None,
    *,
    float32_bytes: int | None = None,
    kernels: bool = False,
) -> str:
    """ "keep" (run as loaded), "quantized-cpu" or the float dtype name to dequantize to.

    ``setting`` (auto/None, quantized-cpu, keep, float32, float16, bfloat16) wins when given.
    Automatic: on a GPU keep; on the CPU quantized-cpu when ``kernels`` (engine/cpu built),
    else float32 when the float32 weights fit ``memory_budget`` (default half the physical
    memory), else keep. ``float32_bytes`` is the exact float32 size if known
    (:func:`float_bytes`); otherwise it is bounded from ``quantized_bytes``.

    float32 beats MLX's quantized CPU kernels with either BLAS, the reference one because
    :func:`dequantize_model` stores weights in the order BLAS reads fastest.
    """
    explicit = parse_setting(setting)
    if explicit is not None:
        return explicit
    if device != "cpu":
        return KEEP
    if kernels:
        return QKERNELS
    if memory_budget is None:
        total = physical_memory()
        memory_budget = total // 2 if total else None
    needed = float32_bytes if float32_bytes is not None else quantized_bytes * _F32_EXPANSION_BOUND
    if memory_budget is not None and needed > memory_budget:
        return KEEP
    return "float32"


_QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def _is_quantized(module) -> bool:
    return isinstance(module, _QUANTIZED) and not isinstance(module, _KernelModule)


# --- the CPU kernels (engine/cpu) --------------------------------------------------------------


class _KernelModule(KernelModule):
    """Marks modules whose products go through engine/cpu's kernels (they stay quantized)."""


# Prefill too goes through the int8 kernels: on the packed tiles they beat dequantizing the
# weight for BLAS at every row count tried (benchmarks/results/history-cpu.md).
_INT8 = 0  # qmm_rows' tiles argument


class CpuQuantizedLinear(_KernelModule, nn.QuantizedLinear):
    """weight, scales and biases hold the kernels' packed tiles (cpu.pack), not MLX's layout."""

    out_features = 0  # the weight's rows before packing

    def __call__(self, x):
        if x.dtype != mx.float32:
            x = x.astype(mx.float32)
        y = self.kernels.qmm_rows(
            x,
            self["weight"],
            self["scales"],
            self["biases"],
            self.group_size,
            self.bits,
            tiles=_INT8,
            n=self.out_features,
        )
        return y + self["bias"] if "bias" in self else y


class CpuQuantizedEmbedding(_KernelModule, nn.QuantizedEmbedding):
    """Looks rows up in MLX's layout until it is first used as the tied output head; then its
    weight, scales and biases become the kernels' packed tiles (cpu.pack) for both uses, so
    one copy is kept (most embeddings are never used as a head and are never packed)."""

    out_features = 0  # rows before packing; 0: not packed

    def __call__(self, x):
        if self.out_features:
            return self.kernels.packed_rows(
                x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits
            )
        # Rows come out in the scales' dtype (f16 for GGUF); the model runs in float32.
        return super().__call__(x).astype(mx.float32)

    def pack(self):
        w, s, b, n = cpu_pack(self["weight"], self["scales"], self["biases"], self.bits)
        mx.eval(w, s, b)
        self["weight"], self["scales"], self["biases"], self.out_features = w, s, b, n

    def as_linear(self, x):  # tied output head
        if x.dtype != mx.float32:
            x = x.astype(mx.float32)
        if not self.out_features:  # a model that ties without saying so in its args
            self.pack()  # a lookup already in this step's graph keeps the arrays it read
            mx.clear_cache()  # the packing's temporaries
        return self.kernels.qmm_rows(
            x,
            self["weight"],
            self["scales"],
            self["biases"],
            self.group_size,
            self.bits,
            tiles=_INT8,
            n=self.out_features,
        )


class CpuRMSNorm(_KernelModule, nn.RMSNorm):
    def __call__(self, x):
        if x.dtype != mx.float32 or self.weight.dtype != mx.float32:
            return super().__call__(x)
        return self.kernels.rms_norm(x, self.weight, self.eps)


class CpuRoPE(_KernelModule, nn.RoPE):
    def __call__(self, x, offset=0):
        if x.dtype != mx.float32 or x.ndim not in (3, 4):
            return super().__call__(x, offset)
        return self.kernels.rope(x, self.dims, self.traditional, self.base, self.scale, offset)


# On the CPU mx.fast.rms_norm and mx.fast.rope run as chains of 7 and ~20 graph ops; the
# extension has each as one op.
_STEP_OPS = {nn.RMSNorm: CpuRMSNorm, nn.RoPE: CpuRoPE}


def _offset_norm_call(self, x):
    # self.weight holds 1 + the stored weight (shifted when the class was swapped in).
    if x.dtype != mx.float32 or self.weight.dtype != mx.float32:
        return mx.fast.rms_norm(x, self.weight, self.eps)
    return self.kernels.rms_norm(x, self.weight, self.eps)


def _calls_like(cls, ref, *, consts: bool = False) -> bool:
    """Whether ``cls.__call__`` is ``ref``'s code (same bytecode and names; with ``consts``, the
    same constants too): how a model class's step is recognised for a one-op replacement."""
    fn = getattr(cls.__call__, "__code__", None)  # every nn.Module has a __call__

    def key(code) -> tuple:
        return (code.co_code, code.co_names) + ((code.co_consts,) if consts else ())

    return fn is not None and key(fn) == key(ref.__code__)


_OFFSET_NORMS: dict[type, type] = {}


def _offset_norm_class(cls) -> type | None:
    """Gemma's RMSNorm (``mx.fast.rms_norm(x, 1.0 + self.weight, eps)``, same bytecode) as the
    extension's one op; the add and the norm's fallback were ~9 graph ops a call, 4-6 calls a layer."""
    if cls not in _OFFSET_NORMS:
        from mlx_lm.models import gemma2

        same = _calls_like(cls, gemma2.RMSNorm.__call__, consts=True)
        _OFFSET_NORMS[cls] = (
            type(f"CpuOffset{cls.__name__}", (_KernelModule, cls), {"__call__": _offset_norm_call}) if same else None
        )
    return _OFFSET_NORMS[cls]


def _swiglu_call(self, x):
    gate, up = self.gate_proj, self.up_proj
    if (
        isinstance(gate, CpuQuantizedLinear)
        and isinstance(up, CpuQuantizedLinear)
        and "bias" not in gate
        and "bias" not in up
        and (gate.group_size, gate.bits) == (up.group_size, up.bits)
    ):
        if x.dtype != mx.float32:
            x = x.astype(mx.float32)
        h = self.kernels.qmm_swiglu(
            x,
            gate["weight"],
            gate["scales"],
            gate["biases"],
            up["weight"],
            up["scales"],
            up["biases"],
            gate.group_size,
            gate.bits,
            gate.out_features,
            gelu=self.gelu,
        )
        return self.down_proj(h)
    return super(type(self), self).__call__(x)


_SWIGLU_CLASSES: dict[type, type] = {}


def _swiglu_class(cls) -> type | None:
    """A subclass computing silu(gate(x)) * up(x) as one op, for MLP classes whose __call__ is
    mlx-lm llama's ``down_proj(swiglu(gate_proj(x), up_proj(x)))`` (same bytecode, same swiglu);
    or gelu_approx(gate(x)) * up(x), for gemma's ``down_proj(nn.gelu_approx(gate_proj(x)) * up_proj(x))``."""
    if cls not in _SWIGLU_CLASSES:
        from mlx_lm.models import activations, gemma2, llama

        kind = None
        if _calls_like(cls, llama.MLP.__call__) and cls.__call__.__globals__.get("swiglu") is activations.swiglu:
            kind = "SwiGLU"
        elif _calls_like(cls, gemma2.MLP.__call__):
            gelu = getattr(cls.__call__.__globals__.get("nn"), "gelu_approx", None)
            kind = "GeGLU" if gelu is nn.gelu_approx else None
        _SWIGLU_CLASSES[cls] = (
            type(f"Cpu{kind}{cls.__name__}", (_KernelModule, cls), {"__call__": _swiglu_call, "gelu": kind == "GeGLU"})
            if kind
            else None
        )
    return _SWIGLU_CLASSES[cls]


def _decode_attention(original, kernels):
    """mlx-lm's scaled_dot_product_attention, with one query token a sequence on the CPU in
    float32 (decode) as the extension's one op instead of the ~7 of MLX's CPU fallback."""

    def sdpa(queries, keys, values, cache, scale, mask, sinks=None):
        if (
            queries.ndim == 4
            and queries.shape[2] == 1
            and sinks is None
            and not hasattr(cache, "bits")
            and queries.dtype == keys.dtype == values.dtype == mx.float32
            and (
                mask is None or (isinstance(mask, mx.array) and mask.ndim == 4 and mask.dtype in (mx.bool_, mx.float32))
            )
            and mx.default_device() == mx.cpu
        ):
            return kernels.decode_attention(queries, keys, values, scale, mask)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    sdpa.cpu_original = original
    return sdpa


def _softcap_attention_call(self, x, mask=None, cache=None):
    B, L, _ = x.shape
    if (
        L != 1
        or cache is None
        or hasattr(cache, "bits")
        or x.dtype != mx.float32
        or not (mask is None or (isinstance(mask, mx.array) and mask.ndim == 4))
        or (mask is not None and mask.dtype not in (mx.bool_, mx.float32))
        or mx.default_device() != mx.cpu
    ):
        return super(type(self), self).__call__(x, mask, cache)
    queries, keys, values = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    queries = self.rope(queries.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3), offset=cache.offset)
    keys = self.rope(keys.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3), offset=cache.offset)
    values = values.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
    keys, values = cache.update_and_fetch(keys, values)
    out = self.kernels.decode_attention(
        queries, keys, values, self.scale, mask, softcap=float(self.attn_logit_softcapping)
    )
    return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def _softcap_model_call(self, inputs, cache=None):
    out = self.model.embed_tokens.as_linear(self.model(inputs, cache))
    cap = self.final_logit_softcapping
    if out.dtype != mx.float32 or mx.default_device() != mx.cpu:
        return mx.tanh(out / cap) * cap
    return self.kernels.softcap(out, float(cap))


_SOFTCAP_CLASSES: dict[type, type] = {}


def _softcap_attention_class(cls) -> type | None:
    """mlx-lm gemma2's attention (its own score soft-capping, no scaled_dot_product_attention:
    ~20 graph ops a layer) with a decode step's scores, capping, mask and softmax as one op;
    gemma2's model with the logits' soft-capping as one op (MLX's scalar tanh over the vocabulary)."""
    from mlx_lm.models import gemma2

    calls = {gemma2.Attention: _softcap_attention_call, gemma2.Model: _softcap_model_call}
    if cls not in calls:
        return None
    if cls not in _SOFTCAP_CLASSES:
        _SOFTCAP_CLASSES[cls] = type(f"CpuSoftcap{cls.__name__}", (_KernelModule, cls), {"__call__": calls[cls]})
    return _SOFTCAP_CLASSES[cls]


def _route_attention(model, kernels) -> None:
    """mlx-lm's model modules call ``scaled_dot_product_attention`` by their own global name:
    the ones this model's layers come from get the wrapper above (it falls back to the original
    for anything else, GPU models included)."""
    import sys

    for _, module in model.named_modules():
        source = sys.modules.get(type(module).__module__)
        fn = getattr(source, "scaled_dot_product_attention", None)
        if fn is not None and not hasattr(fn, "cpu_original"):
            source.scaled_dot_product_attention = _decode_attention(fn, kernels)


def kernels_fit(module) -> bool:
    """Whether engine/cpu's kernels compute this quantized module's products."""
    if getattr(module, "mode", "affine") != "affine" or "biases" not in module:
        return False
    if module.bits not in (4, 8) or module.group_size not in (32, 64):
        return False
    return module["weight"].ndim == 2 and module["scales"].dtype in (mx.float16, mx.bfloat16, mx.float32)


def use_cpu_kernels(model: nn.Module, kernels) -> int:
    """Route the products of every quantized module the kernels fit through them, in place.

    The linears' weight, scales and biases are replaced by the kernels' packed tiles (shapes
    change; ``out_features`` keeps the rows); so are mixture-of-experts layers' (cpu/experts.py).
    Modules they do not fit (other bits or modes) are dequantized to float32; every other
    floating-point parameter (norms, float linears) becomes float32 too, so activations are
    float32 throughout. Returns how many modules now use the kernels.
    """
    from .cpu.experts import use_expert_kernels

    KernelModule.kernels = kernels
    count = use_expert_kernels(model, kernels)  # before the float32 casts: scales stay as stored
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedEmbedding or (
            isinstance(module, nn.QuantizedLinear) and not isinstance(module, _KernelModule)
        ):
            if not kernels_fit(module):
                continue
            if isinstance(module, nn.QuantizedEmbedding):
                module.__class__ = CpuQuantizedEmbedding
                if getattr(getattr(model, "args", None), "tie_word_embeddings", False):
                    module.pack()  # the output head too: one packed copy for both
            else:
                module.__class__ = CpuQuantizedLinear
                w, s, b, module.out_features = cpu_pack(
                    module["weight"], module["scales"], module["biases"], module.bits
                )
                module["weight"], module["scales"], module["biases"] = w, s, b
                mx.eval(w, s, b)  # one module's copy at a time; the unpacked arrays go
            count += 1
    dequantize_model(model, mx.float32)
    for _, module in model.named_modules():
        if type(module) in _STEP_OPS:
            module.__class__ = _STEP_OPS[type(module)]
        elif not isinstance(module, _KernelModule) and (norm := _offset_norm_class(type(module))) is not None:
            module.weight = 1.0 + module.weight  # as the norm reads it; float32 by now
            mx.eval(module.weight)
            module.__class__ = norm
    for _, module in model.named_modules():
        fused = (
            None
            if isinstance(module, _KernelModule)
            else (_swiglu_class(type(module)) or _softcap_attention_class(type(module)))
        )
        if fused is not None:
            module.__class__ = fused
    _route_attention(model, kernels)
    mx.clear_cache()  # the packing's temporaries, held by MLX's buffer cache otherwise
    return count


def _dequantized_weight(module, dtype: mx.Dtype) -> mx.array:
    # Scales and biases are cast first so the arithmetic happens in the target precision.
    scales = module["scales"].astype(dtype)
    biases = module.get("biases")
    kwargs = {}
    if "global_scale" in module:
        kwargs["global_scale"] = module["global_scale"]
    return mx.dequantize(
        module["weight"],
        scales,
        biases.astype(dtype) if biases is not None else None,
        group_size=module.group_size,
        bits=module.bits,
        mode=module.mode,
        **kwargs,
    ).astype(dtype)


def _replacement(module, dtype: mx.Dtype, blas_layout: bool) -> nn.Module:
    weight = _dequantized_weight(module, dtype)
    if blas_layout:
        # Same (out, in) shape, stored in (in, out) order: Linear's ``x @ weight.T`` then hands
        # BLAS a row-major matrix to use untransposed, which OpenBLAS does faster. Tied
        # embeddings (``as_linear``) gain too; row lookups don't mind.
        weight = mx.contiguous(weight.T).T
    if isinstance(module, nn.QuantizedEmbedding):
        new = nn.Embedding(1, 1)
        new.weight = weight
        return new
    has_bias = "bias" in module
    new = nn.Linear(1, 1, bias=has_bias)
    new.weight = weight
    if has_bias:
        new.bias = module["bias"].astype(dtype)
    return new


def dequantize_model(model: nn.Module, dtype, *, blas_layout: bool | None = None) -> None:
    """Replace every QuantizedLinear / QuantizedEmbedding of ``model`` by a float one, in place.

    Each module's own group size, bits and mode are used; linear biases are kept. The other
    floating-point parameters (norms) are cast to ``dtype`` too so no op mixes precisions.
    Layers are converted and evaluated one at a time; peak memory is the float model plus the
    quantized one, which is released at the end. ``dtype``: an ``mx.Dtype`` or a name ("float32", "float16", ...).
    ``blas_layout`` (default: for float32, the dtype BLAS serves, unless the few-row kernels
    of smallgemm.py are in use) stores each weight transposed, the order OpenBLAS multiplies
    fastest; shapes and parameter names do not change.
    """
    if isinstance(dtype, str):
        name = parse_setting(dtype)
        if name is None or name == KEEP:
            raise ValueError(f"not a float dtype: {dtype!r}")
        dtype = getattr(mx, name)
    if not mx.issubdtype(dtype, mx.floating):
        raise ValueError(f"not a float dtype: {dtype}")
    if blas_layout is None:
        # The few-row kernels read nn.Linear's own layout fastest (each weight row contiguous);
        # OpenBLAS alone reads the transposed one faster.
        blas_layout = dtype == mx.float32 and not backend.small_gemm_active()

    def convert(path, module):
        if not _is_quantized(module):
            return module
        new = _replacement(module, dtype, blas_layout)
        mx.eval(new.parameters())
        return new

    leaves = tree_map_with_path(convert, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)

    for _, module in model.named_modules():
        if isinstance(module, KernelModule):
            continue  # scales and biases stay as stored: the kernels read them as they are
        for key, value in list(module.items()):
            if isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating) and value.dtype != dtype:
                module[key] = value.astype(dtype)
    mx.eval(model.parameters())


def float_bytes(model: nn.Module, dtype=mx.float32) -> int:
    """Bytes the model's parameters would take after ``dequantize_model(model, dtype)``."""
    quantized = {path: m for path, m in model.named_modules() if _is_quantized(m)}
    total = 0
    for key, v in tree_flatten(model.parameters()):
        path, _, leaf = key.rpartition(".")
        module = quantized.get(path)
        if module is not None:
            if leaf == "weight":
                total += v.size * 32 // module.bits * dtype.size
            elif leaf == "bias":
                total += v.size * dtype.size
            continue  # scales, biases, global_scale disappear
        total += v.size * dtype.size if mx.issubdtype(v.dtype, mx.floating) else v.nbytes
    return total


def parameter_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
