import pytest

from mlxserve.errors import BadRequest
from mlxserve.specs.modelspec import Options


def test_types_are_kept():
    o = Options.from_dict(
        {"num_ctx": 2048, "temperature": 1, "top_p": 0.9, "stop": "</s>", "seed": 42, "repeat_last_n": 64}
    )
    assert o.num_ctx == 2048 and o.seed == 42
    assert o.temperature == 1.0 and isinstance(o.temperature, float)
    assert o.stop == ["</s>"]
    assert o.to_dict() == {
        "num_ctx": 2048,
        "temperature": 1.0,
        "top_p": 0.9,
        "stop": ["</s>"],
        "seed": 42,
        "repeat_last_n": 64,
    }


def test_integral_float_is_an_int_and_none_is_unset():
    o = Options.from_dict({"num_predict": 128.0, "top_k": None})
    assert o.num_predict == 128 and isinstance(o.num_predict, int)
    assert o.top_k is None


@pytest.mark.parametrize(
    "options, field",
    [
        ({"num_ctx": "2048"}, "num_ctx"),
        ({"num_ctx": 1.5}, "num_ctx"),
        ({"top_k": True}, "top_k"),
        ({"temperature": "hot"}, "temperature"),
        ({"stop": 3}, "stop"),
        ({"stop": ["a", 1]}, "stop"),
        ({"use_mmap": 1}, "use_mmap"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_options_name_the_field(options, field):
    with pytest.raises(BadRequest, match=f"'{field}'"):
        Options.from_dict(options)


def test_options_must_be_an_object():
    with pytest.raises(BadRequest, match="object"):
        Options.from_dict(["temperature", 1])


def test_load_time_options_are_kept_in_extra():
    o = Options.from_dict(
        {"num_batch": 512, "num_thread": 4, "use_mmap": False, "tfs_z": 1, "mirostat": 0, "temperature": 0.5}
    )
    assert o.extra == {"num_batch": 512, "num_thread": 4, "use_mmap": False, "tfs_z": 1.0, "mirostat": 0}
    assert o.to_dict()["num_batch"] == 512
    assert Options.from_dict(o.to_dict()) == o


def test_merged_lets_the_other_side_win():
    base = Options.from_dict({"temperature": 0.2, "stop": ["a"], "num_ctx": 4096, "num_batch": 8})
    over = Options.from_dict({"temperature": 0.9, "stop": ["b", "c"], "num_thread": 2})
    m = base.merged(over)
    assert m.temperature == 0.9 and m.num_ctx == 4096 and m.stop == ["b", "c"]
    assert m.extra == {"num_batch": 8, "num_thread": 2}
    assert base.temperature == 0.2  # unchanged
    assert base.merged(None) == base and base.merged(Options()) == base
