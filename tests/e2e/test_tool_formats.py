"""Tool calls by family on the HTTP side: special tokens that open a call ([TOOL_CALLS],
<|python_tag|>), which decoding drops, are written back so the call is read; calls stream as
each completes on /api/chat and /v1/chat/completions."""

from __future__ import annotations

import types

from tokenizers import AddedToken

from mlxserve.engine.loop import Chunk
from mlxserve.engine.tokenizer import TokenizerInfo
from mlxserve.http import generation as g
from mlxserve.specs.tools import parse_tool_calls
from mlxserve.testing import tinymodel

TOOLS = [{"name": "get_weather", "description": "", "parameters": {"type": "object"}}]


def _tokenizer() -> TokenizerInfo:
    tok = tinymodel.build_tokenizer()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("[TOOL_CALLS]", "<|python_tag|>")])
    return TokenizerInfo(tok, bos_token=None, eos_tokens=["<|endoftext|>"], chat_template=None, add_bos=False)


def test_call_tokens_that_decoding_drops_are_written_back():
    tok = _tokenizer()
    markers = g.marker_tokens(tok)
    assert sorted(markers.values()) == ["<|python_tag|>", "[TOOL_CALLS]"]  # <|im_end|> etc. are not
    gen = types.SimpleNamespace(markers=markers, tokenizer=tok)  # what _with_markers reads
    body = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    ids = tok.encode("[TOOL_CALLS]" + body)
    assert tok.decode(ids) == body  # what the engine sends: the marker is gone
    chunk = g._with_markers(gen, Chunk(seq_id=1, text=tok.decode(ids), token_ids=tuple(ids)))
    assert chunk.text == "[TOOL_CALLS]" + body
    assert parse_tool_calls(chunk.text, TOOLS) == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    plain = Chunk(seq_id=1, text="Paris", token_ids=tuple(tok.encode("Paris")))
    assert g._with_markers(gen, plain) is plain
