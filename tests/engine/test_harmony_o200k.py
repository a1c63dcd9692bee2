"""gpt-oss's harmony answers through the real o200k_harmony vocabulary: the engine's streaming
decoder keeps every channel marker token by token, a call's <|call|> ends the answer, and what
the HTTP side reads from the stream (specs/thinking's splitter, specs/tools) is the reasoning
apart from a whole tool call, or from the final text."""

from __future__ import annotations

import mlx.core as mx
import pytest
import tokenizer_vocabs

from mlxserve.engine import tokenizer as T
from mlxserve.specs import thinking
from mlxserve.specs.tools import parse_tool_calls

TOOLS = [{"name": "get_weather", "parameters": {"type": "object"}}]


@pytest.fixture(scope="module")
def o200k(tmp_path_factory) -> T.TokenizerInfo:
    path = tokenizer_vocabs.o200k_gguf(tmp_path_factory.mktemp("o200k") / "o200k.gguf")
    if path is None:
        pytest.skip("quicktok-v1 is not installed")
    _, metadata = mx.load(str(path), return_metadata=True)
    return T.from_gguf_metadata(metadata)


def _stream(info: T.TokenizerInfo, answer: str) -> tuple[list[str], list[int]]:
    """The text deltas the engine sends, up to and without the first end-of-generation token."""
    ids = info.encode(answer, add_bos=False)
    eog = set(info.eos_token_ids)
    stop = next((k for k, i in enumerate(ids) if i in eog), len(ids))
    d = T.StreamDecoder(info)
    return [d.add(i) for i in ids[:stop]] + [d.flush()], ids[stop:]


def _split(pieces: list[str]) -> tuple[str, str]:
    s = thinking.HarmonySplitter()
    steps = [s.feed(p) for p in pieces] + [s.finish()]
    return "".join(t for t, _ in steps), "".join(c for _, c in steps)


@pytest.mark.parametrize("end", ["<|call|>", "<|return|>"])
def test_end_tokens_end_the_answer(o200k, end):
    _, rest = _stream(o200k, f"<|channel|>final<|message|>Hi{end}")
    assert rest == o200k.encode(end, add_bos=False)


def test_a_tool_call_streams_apart_from_the_reasoning(o200k):
    pieces, rest = _stream(
        o200k,
        "<|channel|>analysis<|message|>Need Zürich's weather 🌧️.<|end|><|start|>assistant"
        '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Zürich"}<|call|>',
    )
    thought, said = _split(pieces)
    assert thought == "Need Zürich's weather 🌧️."
    assert parse_tool_calls(said, TOOLS) == [{"name": "get_weather", "arguments": {"city": "Zürich"}}]


def test_the_final_channel_is_the_answer(o200k):
    pieces, _ = _stream(
        o200k,
        "<|channel|>analysis<|message|>Greet back.<|end|><|start|>assistant<|channel|>final<|message|>こんにちは!<|return|>",
    )
    assert _split(pieces) == ("Greet back.", "こんにちは!")
