import json

import pytest

from mlxserve.errors import BadRequest
from mlxserve.specs.modelspec import ModelSpec, Options


def full_spec() -> ModelSpec:
    return ModelSpec(
        format="gguf",
        family="llama",
        families=["llama"],
        parameter_size="135M",
        quantization_level="Q4_1",
        context_length=8192,
        capabilities=["completion"],
        parameters=Options(temperature=0.2, stop=["<|im_end|>"], extra={"num_batch": 8}),
        template="{{ messages }}",
        system="Be brief.",
        license="MIT",
        messages=[{"role": "user", "content": "hi"}],
        adapter=False,
        model_type="llama",
        model_info={"general.architecture": "llama", "llama.context_length": 8192},
    )


def test_round_trip():
    spec = full_spec()
    assert ModelSpec.from_json(spec.to_json()) == spec
    assert spec.to_json() == ModelSpec.from_json(spec.to_json()).to_json()  # deterministic bytes


def test_defaults():
    spec = ModelSpec.from_json(b'{"format": "safetensors"}')
    assert spec.capabilities == ["completion"] and spec.parameters == Options()
    assert spec.template is None and spec.messages == []


@pytest.mark.parametrize(
    "change, field",
    [
        ({"colour": "blue"}, "colour"),
        ({"context_length": "8192"}, "context_length"),
        ({"family": 7}, "family"),
        ({"adapter": 1}, "adapter"),
        ({"capabilities": "completion"}, "capabilities"),
        ({"messages": [{"role": 1, "content": "x"}]}, "messages"),
        ({"parameters": {"temperature": "warm"}}, "temperature"),
        ({"parameters": {"nonsense": 1}}, "nonsense"),
        ({"format": "onnx"}, "format"),
        ({"model_info": []}, "model_info"),
    ],
)
def test_unknown_or_mistyped_fields_are_named(change, field):
    d = json.loads(full_spec().to_json())
    d.update(change)
    with pytest.raises(BadRequest, match=field):
        ModelSpec.from_json(json.dumps(d))


def test_missing_format_and_bad_json():
    with pytest.raises(BadRequest, match="format"):
        ModelSpec.from_json(b"{}")
    with pytest.raises(BadRequest, match="not JSON"):
        ModelSpec.from_json(b"{nope")
    with pytest.raises(BadRequest, match="object"):
        ModelSpec.from_json(b"[1]")
