"""One product for a layer's projections that read the same input (q/k/v, gate/up).

At load, where a module's ``q_proj``, ``k_proj`` and ``v_proj`` (or ``gate_proj`` and
``up_proj``) are linears of one kind (all float, or quantized with the same bits, group size and
mode), their weights are concatenated into one linear. The first projection becomes a
:class:`FusedHead` that computes the whole product once per input array and hands out its slice;
the others become :class:`FusedPart` that take their slice of the same product. The model's own
code is unchanged, so this works for every mlx-lm class that calls the projections on one input
(llama, qwen2/3, gemma2/3, MoE attention). Fewer, larger products: fewer graph ops per step, and
the small k/v products no longer run alone. A projection called on another input computes the
fused product for it (correct, only slower).

The fused linear is an ordinary child of the head (``q_proj.fused``), so later swaps that walk
the model (engine/dtype.py's CPU kernels, dequantizing) replace it like any other linear.
"""

from __future__ import annotations

import copy
from typing import Any

import mlx.core as mx
import mlx.nn as nn

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _State:
    """Plain attributes, kept out of the module's parameter tree."""

    def __init__(self, splits: list[int]) -> None:
        self.splits = splits  # where each part after the first starts, in the fused output
        self.pending: tuple[mx.array, list[mx.array], set[int]] | None = None  # (input, parts, parts not taken)


class FusedHead(nn.Module):
    def __init__(self, fused: nn.Module, splits: list[int]) -> None:
        super().__init__()
        self.fused = fused
        self._state = _State(splits)

    def part(self, x: mx.array, i: int) -> mx.array:
        st = self._state
        p = st.pending
        if p is not None and p[0] is x:
            parts, left = p[1], p[2] - {i}
        else:
            # One Split op hands out every part (a slice each would be one graph op each).
            parts, left = mx.split(self.fused(x), st.splits, axis=-1), set(range(len(st.splits) + 1)) - {i}
        # Dropped once every part was taken: a held product would outlive its step.
        st.pending = (x, parts, left) if left else None
        return parts[i]

    def __call__(self, x: mx.array) -> mx.array:
        return self.part(x, 0)


class _HeadRef:
    def __init__(self, head: FusedHead) -> None:
        self.head = head


class FusedPart(nn.Module):
    def __init__(self, head: FusedHead, index: int) -> None:
        super().__init__()
        self._ref = _HeadRef(head)  # not a child: the weights are the head's
        self._index = index

    def __call__(self, x: mx.array) -> mx.array:
        return self._ref.head.part(x, self._index)


def _signature(m: nn.Module) -> tuple[Any, ...] | None:
    """Linears that can share one product have equal signatures (None: not a plain linear)."""
    kind = type(m)
    if isinstance(m, nn.QuantizedLinear):
        # Exactly mlx's class or engine/model.py's subclasses of it (routing only, same layout).
        if kind is not nn.QuantizedLinear and kind.__module__ != "mlxserve.engine.model":
            return None
        return (
            kind,
            m.bits,
            m.group_size,
            m.mode,
            m["weight"].shape[-1],
            m["scales"].dtype,
            "biases" in m,
            "bias" in m,
        )
    if kind is nn.Linear:
        return (kind, m["weight"].shape[-1], m["weight"].dtype, "bias" in m)
    return None


def _fuse(parts: list[nn.Module]) -> tuple[nn.Module, list[int]]:
    fused = copy.copy(parts[0])  # same class and attributes (bits, group size, mode)
    for key in ("weight", "scales", "biases", "bias"):
        if key in parts[0]:
            fused[key] = mx.concatenate([p[key] for p in parts], axis=0)
    splits, start = [], 0
    for p in parts[:-1]:
        start += p["weight"].shape[0]
        splits.append(start)
    return fused, splits


def fuse_projections(model: nn.Module, *, gate_up: bool = True) -> int:
    """Fuse every module's q/k/v (and, with ``gate_up``, gate/up) projections in place;
    returns how many groups were fused."""
    count = 0
    groups = GROUPS if gate_up else GROUPS[:1]
    for _, module in list(model.named_modules()):
        for names in groups:
            parts = [module.get(n) for n in names]
            if any(not isinstance(p, nn.Module) for p in parts):
                continue
            sig = _signature(parts[0])
            if sig is None or any(_signature(p) != sig for p in parts[1:]):
                continue
            fused, splits = _fuse(parts)
            mx.eval(fused.parameters())  # one group at a time: the separate copies go now
            head = FusedHead(fused, splits)
            module[names[0]] = head
            for i, name in enumerate(names[1:], 1):
                module[name] = FusedPart(head, i)
            count += 1
    return count
