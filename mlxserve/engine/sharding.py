"""Which part of a model's weights this rank keeps, for an mx.distributed group (distributed.py).

``engine/model.py`` calls the two hooks while it loads; they do nothing unless the thread loads
for a group (``loading(plan)``): ``announce`` lets rank 0 tell its followers what to load before
it starts, ``shard`` keeps this rank's part before the weights are evaluated.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, Callable

import attrs

from ..errors import LoadError

SPLITS = ("auto", "tensor", "pipeline")

_loading = threading.local()  # set on the thread that loads for the group


@attrs.frozen
class ShardPlan:
    group: Any  # mx.distributed.Group
    split: str  # what was asked: auto | tensor | pipeline
    on_path: Callable[[Path, str | None], None] | None = None  # rank 0: tell the followers first
    chosen: list = attrs.field(factory=list)  # the split that was used, for the caller


@contextlib.contextmanager
def loading(plan: ShardPlan):
    """Load for the group on this thread: the model hooks below act on ``plan``."""
    _loading.plan = plan
    try:
        yield plan
    finally:
        _loading.plan = None


def announce(path: Path, weight_dtype: str | None) -> None:
    """model.load_path's hook: on rank 0, send the followers the model to load before loading it."""
    plan = getattr(_loading, "plan", None)
    if plan is not None and plan.on_path is not None:
        plan.on_path(Path(path), weight_dtype)


def shard(model, config: dict) -> None:
    """model._build's hook, before the weights are evaluated: keep only this rank's part.

    Tensor parallel where mlx-lm's class has ``shard()`` and the heads divide among the ranks,
    pipeline parallel (contiguous blocks of layers) otherwise or when MLXSERVE_DIST_SPLIT asks.
    """
    plan = getattr(_loading, "plan", None)
    if plan is None:
        return
    n = plan.group.size()
    split = plan.split
    if split == "auto":
        split = "tensor" if _tensor_fits(model, config, n) else "pipeline"
    if split == "tensor":
        if not hasattr(model, "shard"):
            raise LoadError(
                f"'{config.get('model_type')}' has no tensor-parallel split in mlx-lm; use MLXSERVE_DIST_SPLIT=pipeline"
            )
        if not _tensor_fits(model, config, n):
            raise LoadError(f"the model's heads do not divide among {n} ranks; use MLXSERVE_DIST_SPLIT=pipeline")
        model.shard(plan.group)
    else:
        _pipeline(model, plan.group)
    plan.chosen.append(split)


def _tensor_fits(model, config: dict, n: int) -> bool:
    if not hasattr(model, "shard"):
        return False
    heads = int(config.get("num_attention_heads") or 0)
    kv = int(config.get("num_key_value_heads") or heads)
    inter = int(config.get("intermediate_size") or 0)
    hidden = int(config.get("hidden_size") or 0)
    head_dim = int(config.get("head_dim") or (hidden // heads if heads else 0))
    if not (heads > 0 and heads % n == 0 and kv % n == 0 and inter % n == 0):
        return False
    # Quantized weights split along their input (o_proj, down_proj) in whole groups only.
    group = int((config.get("quantization") or {}).get("group_size") or 1)
    return (heads * head_dim // n) % group == 0 and (inter // n) % group == 0


def _pipeline(model, group) -> None:
    """Rank r runs its own contiguous block of layers (rank 0 the first); the others' layers are
    placeholders without weights. The hidden state goes from each block to the next with
    send/recv, and the last block's is gathered so that every rank samples the same logits."""
    import mlx.core as mx
    import mlx.nn as nn

    if hasattr(model, "pipeline") and not hasattr(model, "shard"):
        raise LoadError("this architecture's own pipeline split is not supported yet")
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or not isinstance(layers, list) or not hasattr(inner, "norm"):
        raise LoadError(f"cannot split '{type(model).__module__}' into a pipeline")
    n, r = group.size(), group.rank()
    if len(layers) < n:
        raise LoadError(f"{len(layers)} layers cannot be split among {n} ranks")
    base, extra = divmod(len(layers), n)
    sizes = [base + (1 if i < extra else 0) for i in range(n)]
    start = sum(sizes[:r])
    end = start + sizes[r]

    class Skip(nn.Module):
        """Another rank's layer. It keeps its cache's length in step (masks are built from a
        layer's cache) with one-wide keys: a few bytes a token."""

        def __init__(self, layer):
            super().__init__()
            for k, v in vars(layer).items():  # plain settings the model reads (use_sliding, ...)
                if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None))):
                    setattr(self, k, v)

        def __call__(self, x, mask=None, cache=None):
            if cache is not None:
                z = mx.zeros((x.shape[0], 1, x.shape[1], 1), dtype=x.dtype)
                cache.update_and_fetch(z, z)
            return x

    class Wrapped(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def __getattr__(self, key):
            try:
                return super().__getattr__(key)
            except AttributeError:
                if "layer" not in self:
                    raise
                return getattr(self["layer"], key)

    class First(Wrapped):
        def __call__(self, x, *args, **kwargs):
            return self.layer(mx.distributed.recv_like(x, r - 1, group=group), *args, **kwargs)

    class Last(Wrapped):
        def __call__(self, x, mask=None, cache=None):
            y = mx.distributed.send(self.layer(x, mask, cache), r + 1, group=group)
            if cache is not None:
                # A prefill chunk evaluates only the caches: the send must be part of that, or
                # the next rank waits for ever in its recv.
                cache.keys = mx.depends(cache.keys, y)
            return y

    class Gather(nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.norm = norm

        def __call__(self, x):
            b = x.shape[0]
            return self.norm(mx.distributed.all_gather(x, group=group)[(n - 1) * b : n * b])

    for i in range(len(layers)):
        if not start <= i < end:
            layers[i] = Skip(layers[i])
    if r > 0:
        layers[start] = First(layers[start])
    if r < n - 1:
        layers[end - 1] = Last(layers[end - 1])
    inner.norm = Gather(inner.norm)
