"""A CPU step reaches MLX's stream thread in parts, so building the graph overlaps computing it.

MLX's ``eval``/``async_eval`` blocks its caller while more than 10 tasks of 10 CPU ops each are
outstanding (``MAX_ACTIVE_TASKS`` in mlx/transforms.cpp). A SmolLM2 decode step is ~400 CPU ops,
so the one ``async_eval`` at its end returned only once most of the step had been computed, and
the engine's pipelining (build step n+1 while step n computes) hid little of the ~5 ms Python
spends building a step. With an ``async_eval`` of the hidden state every few layers, the stream's
thread computes those layers while Python builds the next ones. Only the CPU does this; a
GPU step is still submitted whole (not measured there).
"""

from __future__ import annotations

import functools
from typing import Any

import mlx.core as mx
import mlx.nn as nn


def submit_in_parts(model: nn.Module, every: int) -> int:
    """Every ``every``-th decoder layer (not the last: the step's own ``async_eval`` follows it)
    hands its output to MLX as soon as it is built. Returns how many layers do."""
    layers = getattr(model, "layers", None)
    if every <= 0 or not isinstance(layers, list):
        return 0
    marked = 0
    for i, layer in enumerate(layers[:-1]):
        if (i + 1) % every == 0 and isinstance(layer, nn.Module):
            layer.__class__ = _submitting(type(layer))
            marked += 1
    return marked


@functools.cache
def _submitting(base: type[nn.Module]) -> type[nn.Module]:
    if getattr(base, "_submits", False):
        return base

    def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        out = base.__call__(self, *args, **kwargs)
        if isinstance(out, mx.array):  # a layer that returns more (a tuple) is left whole
            mx.async_eval(out)  # type: ignore[no-untyped-call]
        return out

    return type(base.__name__, (base,), {"__call__": __call__, "_submits": True, "__module__": base.__module__})
