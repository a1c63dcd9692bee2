"""Fitting a conversation into the context window: what is dropped, and how many renders it takes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mlxserve.engine.tokenizer import from_directory
from mlxserve.errors import Unprocessable
from mlxserve.http import generation as g
from mlxserve.specs import templates


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return from_directory(tiny_dir)


def _resolved(template=None, system=None):
    return SimpleNamespace(spec=SimpleNamespace(template=template, messages=None, system=system))


def _conversation(turns: int) -> list[dict]:
    msgs = [{"role": "system", "content": "Be brief."}]
    for i in range(turns):
        msgs += [
            {"role": "user", "content": f"question {i}: what is the capital of France?"},
            {"role": "assistant", "content": f"answer {i}: the capital of France is Paris."},
        ]
    return msgs + [{"role": "user", "content": "last one"}]


def _newest_first(tok, msgs, ctx):
    """The rule as Ollama states it: keep the system messages and the last one, then add older
    messages, newest first, while the prompt still fits."""
    droppable = [i for i, m in enumerate(msgs[:-1]) if m["role"] != "system"]
    best = None
    for k in range(len(droppable), -1, -1):
        gone = set(droppable[:k])
        kept = [m for i, m in enumerate(msgs) if i not in gone]
        ids = tok.encode(templates.render_chat(templates.CHATML_TEMPLATE, kept), add_bos=False)
        if len(ids) >= ctx:
            break
        best = ids
    return best


def test_bisection_keeps_what_dropping_one_by_one_keeps_in_a_few_renders(tok, monkeypatch):
    renders = []
    real = templates.render_chat
    monkeypatch.setattr(templates, "render_chat", lambda *a, **k: renders.append(1) or real(*a, **k))
    msgs = _conversation(1000)
    ids = g.fit_chat(_resolved(), tok, msgs, None, 256)
    assert len(renders) <= 2 * 11 + 2  # log2(2000) steps; dropping one by one took ~2000
    monkeypatch.setattr(templates, "render_chat", real)
    assert ids == _newest_first(tok, msgs, 256)
    text = tok.decode(ids, skip_special=False)
    assert text.startswith("<|im_start|>system\nBe brief.") and "last one" in text
    assert len(ids) < 256


def test_a_last_message_too_long_for_any_window_is_refused_unread(tok, monkeypatch):
    monkeypatch.setattr(tok, "encode", None)  # it must not be needed
    big = [{"role": "user", "content": "x" * (256 * 16 * 4)}]
    with pytest.raises(Unprocessable, match="characters, more than the context window of 256 tokens"):
        g.fit_chat(_resolved(), tok, big, None, 256)
    with pytest.raises(Unprocessable, match="characters"):
        g.raw_prompt_ids(tok, big[0]["content"], 256, add_bos=None)


def test_a_template_that_renders_tools_keeps_them_its_own_way(tok):
    native = (
        "{% if tools %}[{{ tools | map(attribute='function.name') | join(',') }}]{% endif %}"
        + templates.CHATML_TEMPLATE
    )
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "d", "parameters": {}}}]
    msgs = [{"role": "user", "content": "hi"}]
    ids = g.fit_chat(_resolved(template=native), tok, msgs, tools, 512)
    assert tok.decode(ids, skip_special=False) == templates.render_chat(native, msgs, tools=tools)
    fallback = tok.decode(g.fit_chat(_resolved(), tok, msgs, tools, 512), skip_special=False)
    assert fallback.startswith("<|im_start|>system\nYou can call the following tools")


def test_lone_surrogates_are_tokenized_as_replacement_characters(tok):
    # JSON allows "\ud800"; the Rust tokenizer refuses such a str with a TypeError (a 500 before).
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")
    assert tok.encode("\udfff") == tok.encode("\ufffd")
