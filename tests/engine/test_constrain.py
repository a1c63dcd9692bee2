"""JSON schema grammars (engine/constrain.py) checked token by token with llguidance's matcher."""

from __future__ import annotations

import pytest
from llguidance import LLMatcher, LLTokenizer

from mlxserve.engine.constrain import ANY_JSON_OBJECT, grammar_for_schema
from mlxserve.errors import BadRequest
from mlxserve.testing.tinymodel import build_tokenizer


@pytest.fixture(scope="module")
def lltok() -> LLTokenizer:
    return LLTokenizer(build_tokenizer().to_str())


def accepts(lltok, schema, text: str) -> bool:
    """Whether the grammar takes the whole text and may end there."""
    m = LLMatcher(lltok, grammar_for_schema(schema), log_level=0)
    assert not m.is_error(), m.get_error()
    ids = lltok.tokenize_str(text)
    return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()


INT = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.mark.parametrize("digits,ok", [(1, True), (16, True), (17, False), (300, False)])
def test_unbounded_integers_take_at_most_16_digits(lltok, digits, ok):
    assert accepts(lltok, INT, '{"n":' + "9" * digits + "}") is ok
    assert accepts(lltok, INT, '{"n":-' + "9" * digits + "}") is ok


def test_numbers_bound_integral_and_fraction_digits_and_drop_exponents(lltok):
    num = {"type": "number"}
    assert accepts(lltok, num, "-" + "9" * 16 + ".5")
    assert not accepts(lltok, num, "9" * 17)
    assert accepts(lltok, num, "3.1415926535")  # 10 digits after the point
    assert not accepts(lltok, num, "3.14159265358")
    assert not accepts(lltok, num, "1e5")
    assert accepts(lltok, {"type": ["number", "null"]}, "null")
    assert not accepts(lltok, {"type": ["integer", "null"]}, "1" * 17)


def test_user_bounds_are_kept(lltok):
    assert not accepts(lltok, {"type": "integer", "minimum": 0, "maximum": 120}, "121")
    assert not accepts(lltok, {"type": "integer", "minimum": 5}, "4")
    assert accepts(lltok, {"type": "integer", "minimum": 5}, "9" * 16)
    # a lower bound past 10^16 moves the added upper bound with it
    assert accepts(lltok, {"type": "integer", "minimum": 10**17}, str(10**17 + 3))
    assert not accepts(lltok, {"type": "number", "maximum": -5}, "-4")
    assert not accepts(lltok, {"type": "number", "exclusiveMinimum": 0}, "0")
    assert accepts(lltok, {"type": "number", "multipleOf": 0.5, "minimum": 0, "maximum": 10}, "7.5")
    assert not accepts(lltok, {"type": "number", "multipleOf": 0.5}, "7.25")


def test_any_json_object_bounds_nested_numbers(lltok):
    assert accepts(lltok, ANY_JSON_OBJECT, '{"a":[1,{"b":null,"c":true}],"d":"x","e":-1.5}')
    assert not accepts(lltok, ANY_JSON_OBJECT, '{"a":{"b":[' + "1" * 17 + "]}}")
    assert not accepts(lltok, ANY_JSON_OBJECT, "[1]")  # still an object


def test_data_keywords_are_not_rewritten(lltok):
    const = {"type": "integer", "properties": {"x": {}}}
    assert accepts(lltok, {"const": const}, '{"type":"integer","properties":{"x":{}}}')


def test_unusable_schemas_are_bad_requests():
    with pytest.raises(BadRequest):
        grammar_for_schema("{not json")
    with pytest.raises(BadRequest):
        grammar_for_schema({"type": "integer", "minimum": 10**30})
