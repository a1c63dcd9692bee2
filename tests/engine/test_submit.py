"""engine/submit.py: a CPU step handed to MLX every few layers computes the same logits, and
the layers that hand it over are the ones asked for."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mlxserve.config import CpuSettings
from mlxserve.engine.model import load_path
from mlxserve.engine.submit import submit_in_parts
from mlxserve.testing import ggufmodels


def _submitting(model: nn.Module) -> list[int]:
    return [i for i, layer in enumerate(model.layers) if getattr(type(layer), "_submits", False)]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("submit") / "llama.gguf"
    ggufmodels.write(path, "llama", "Q4_0")
    return path


class _Add(nn.Module):
    def __call__(self, x):
        return x + 1


class _Model(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = layers

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_every_second_layer_but_the_last_submits():
    model = _Model([_Add() for _ in range(5)])
    assert submit_in_parts(model, 0) == 0 and _submitting(model) == []
    assert submit_in_parts(model, 2) == 2
    assert _submitting(model) == [1, 3]  # layer 4 is the last: the step's own async_eval follows
    assert submit_in_parts(model, 2) == 2 and _submitting(model) == [1, 3]  # a second pass adds nothing
    assert all(isinstance(layer, _Add) for layer in model.layers)  # still the model's own class
    assert model(mx.array([0.0])).item() == 5.0


def test_the_load_submits_on_the_cpu_as_configured(gguf, monkeypatch):
    assert CpuSettings.from_env({}).submit_layers == 2
    monkeypatch.setenv("MLXSERVE_SUBMIT_LAYERS", "1")
    model = load_path(gguf).model
    assert len(model.layers) == 2
    assert _submitting(model) == ([0] if mx.default_device() == mx.cpu else [])


def test_parts_give_the_same_logits_step_by_step(gguf, monkeypatch):
    monkeypatch.setenv("MLXSERVE_SUBMIT_LAYERS", "0")
    whole, parts = load_path(gguf).model, load_path(gguf).model
    submit_in_parts(parts, 1)
    prompt = mx.array([[1, 5, 9, 2, 7, 3], [4, 4, 8, 1, 6, 2]])
    caches = make_prompt_cache(whole), make_prompt_cache(parts)
    a, b = whole(prompt, cache=caches[0]), parts(prompt, cache=caches[1])
    for _ in range(4):  # decode steps through the KV cache, as the engine runs them
        assert mx.array_equal(a, b).item()
        token = mx.argmax(a[:, -1:, :], axis=-1)
        a, b = whole(token, cache=caches[0]), parts(token, cache=caches[1])
    assert mx.array_equal(a, b).item()


def test_a_layer_returning_a_tuple_is_left_whole():
    class Pair(nn.Module):
        def __call__(self, x):
            return x + 1, x

    model = _Model([Pair(), Pair(), Pair()])
    assert submit_in_parts(model, 1) == 2
    out = model.layers[0](mx.array([1.0]))
    assert isinstance(out, tuple) and out[0].item() == 2.0
