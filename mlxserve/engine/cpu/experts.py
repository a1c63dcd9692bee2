"""Mixture-of-experts layers on the quantized CPU kernels.

mlx-lm runs experts as ``QuantizedSwitchLinear`` (``mx.gather_qmm``, MLX's slow quantized CPU
kernel) inside ``SwitchGLU``. Here each expert's weight is packed into the kernels' 8-row tiles
at load and the layer computes ``gather_qmm_rows`` (each row times the experts it chose, every
chosen expert's tiles read once for all rows that chose it); a ``SwitchGLU`` with mlx-lm's
SwiGLU becomes two ops: gate and up with the SwiGLU, then down; and qwen3moe's whole block
after the router is one op. MXFP4 experts (gpt-oss) use the same tiles, their e2m1 codes turned
into small integers by a table. Experts the kernels do not fit (other bits, global scales) stay
on ``mx.gather_qmm``.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwiGLU, SwitchGLU

from . import KernelModule, pack


def pack_experts(w, scales, biases, bits: int):
    """MLX's affine layout with a leading experts axis -> each expert packed by :func:`pack`,
    stacked: (w (E, T, K*bits/4), scales and biases (E, T, K/group, 8), rows per expert).
    MXFP4 (biases None) packs as 4 bits; its packed biases come back None."""
    if biases is None:  # the scales stand in for the biases MXFP4 does not have
        pw, ps, _, n = pack_experts(w, scales, scales, bits)
        return pw, ps, None, n
    e, n = w.shape[:2]
    if n % 8 == 0:  # whole tiles per expert: one pack of all the rows
        pw, ps, pb, _ = pack(w.reshape(e * n, -1), scales.reshape(e * n, -1), biases.reshape(e * n, -1), bits)
        t = n // 8
        return pw.reshape(e, t, -1), ps.reshape(e, t, *ps.shape[1:]), pb.reshape(e, t, *pb.shape[1:]), n
    parts = [pack(w[i], scales[i], biases[i], bits) for i in range(e)]
    return tuple(mx.stack([p[j] for p in parts]) for j in range(3)) + (n,)


def fits(module) -> bool:
    """Whether the kernels compute this QuantizedSwitchLinear's products: affine 4/8 bits in
    groups of 32 or 64, or MXFP4 (gpt-oss)."""
    if module["weight"].ndim != 3 or module.get("global_scale") is not None:
        return False
    if getattr(module, "mode", "affine") == "mxfp4":
        return module.bits == 4 and module.group_size == 32 and module["scales"].dtype == mx.uint8
    if getattr(module, "mode", "affine") != "affine" or module.get("biases") is None:
        return False
    if module.bits not in (4, 8) or module.group_size not in (32, 64):
        return False
    return module["scales"].dtype in (mx.float16, mx.bfloat16, mx.float32)


class CpuQuantizedSwitchLinear(KernelModule, QuantizedSwitchLinear):
    """weight, scales and biases hold each expert's packed tiles (pack_experts)."""

    out_features = 0  # each expert's rows before packing

    def __call__(self, x, indices, sorted_indices=False):
        # mx.gather_qmm's broadcasting: x (..., M, K) against indices (...). SwitchGLU hands
        # x with M = 1 and its batch either indices' shape or that with the last axis 1.
        if x.dtype != mx.float32:
            x = x.astype(mx.float32)
        batch, ishape = tuple(x.shape[:-2]), tuple(indices.shape)
        if x.shape[-2] == 1 and (batch == ishape or batch == (*ishape[:-1], 1)):
            y = self._product(x, indices)[..., None, :]
        else:  # the general case: a row per index
            shape = mx.broadcast_shapes(batch, ishape)
            rows = x.shape[-2]
            x = mx.broadcast_to(x, (*shape, rows, x.shape[-1]))
            y = self._product(x, mx.broadcast_to(indices[..., None], (*shape, rows)))
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][indices], -2)
        return y

    def _product(self, x, indices):
        return self.kernels.gather_qmm_rows(
            x,
            indices,
            self["weight"],
            self["scales"],
            self.get("biases"),
            self.group_size,
            self.bits,
            self.out_features,
            mode=self.mode,
        )

    def pack(self) -> None:
        w, s, b, self.out_features = pack_experts(self["weight"], self["scales"], self.get("biases"), self.bits)
        self["weight"], self["scales"], self.biases = w, s, b
        if "bias" in self:
            self["bias"] = self["bias"].astype(mx.float32)
        mx.eval(self.parameters())  # one module's copy at a time; the unpacked arrays go


class CpuSwitchGLU(KernelModule, SwitchGLU):
    """mlx-lm's SwitchGLU with SwiGLU: gate and up products and the SwiGLU as one op, then down."""

    def __call__(self, x, indices):
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        if x.dtype != mx.float32:
            x = x.astype(mx.float32)
        weights = (m[key] for m in (gate, up) for key in ("weight", "scales", "biases"))
        h = self.kernels.gather_swiglu(x, indices, *weights, gate.group_size, gate.bits, gate.out_features)
        y = down._product(h, indices)
        if "bias" in down:
            y = y + down["bias"][indices]
        return y


def _fusable(module) -> bool:
    gate, up, down = module.gate_proj, module.up_proj, module.down_proj
    return (
        type(module.activation) is SwiGLU
        and all(isinstance(m, CpuQuantizedSwitchLinear) and m.mode == "affine" for m in (gate, up, down))
        and "bias" not in gate
        and "bias" not in up
        and (gate.group_size, gate.bits, gate["scales"].dtype) == (up.group_size, up.bits, up["scales"].dtype)
    )


def use_expert_kernels(model: nn.Module, kernels) -> int:
    """Route every QuantizedSwitchLinear the kernels fit through them, in place (their weights
    become the packed tiles), and fuse mlx-lm's SwitchGLU where all three are. Returns how
    many expert linears now use the kernels."""
    KernelModule.kernels = kernels
    count = 0
    for _, module in model.named_modules():
        if type(module) is QuantizedSwitchLinear and fits(module):
            module.__class__ = CpuQuantizedSwitchLinear
            module.pack()
            count += 1
    for _, module in model.named_modules():
        if type(module) is SwitchGLU and _fusable(module):
            module.__class__ = CpuSwitchGLU
    for _, module in model.named_modules():
        if hasattr(module, "switch_mlp") and (cls := _moe_block_class(type(module))) and _block_fusable(module):
            module.__class__ = cls
    return count


def _moe_block_call(self, x):
    """mlx-lm qwen3_moe's block: the router's product, then the rest as one op (moe_swiglu)."""
    if getattr(self, "sharding_group", None) is not None:
        return super(type(self), self).__call__(x)
    if x.dtype != mx.float32:
        x = x.astype(mx.float32)
    mlp = self.switch_mlp
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    logits = self.gate(x)
    if logits.dtype != mx.float32:
        logits = logits.astype(mx.float32)
    return self.kernels.moe_swiglu(
        x,
        logits,
        self.top_k,
        self.norm_topk_prob,
        *(m[key] for m in (gate, up, down) for key in ("weight", "scales", "biases")),
        gate.group_size,
        gate.bits,
        down.group_size,
        down.bits,
        gate.out_features,
        down.out_features,
    )


@functools.cache
def _moe_block_class(cls) -> type | None:
    """A one-op subclass for mlx-lm's qwen3_moe block (its __call__ as shipped: softmax, top k,
    renormalize, SwitchGLU, weighted sum); None for any other class."""
    from mlx_lm.models import qwen3_moe

    if cls is not qwen3_moe.Qwen3MoeSparseMoeBlock:
        return None
    return type(f"Cpu{cls.__name__}", (KernelModule, cls), {"__call__": _moe_block_call})


def _block_fusable(module) -> bool:
    mlp = getattr(module, "switch_mlp", None)
    return (
        type(mlp) is CpuSwitchGLU
        and type(module.gate) is nn.Linear
        and "bias" not in module.gate
        and "bias" not in mlp.down_proj
        and mlp.down_proj["scales"].dtype == mlp.gate_proj["scales"].dtype
    )
