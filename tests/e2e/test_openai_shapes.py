"""OpenAI response shapes that clients depend on, through the official `openai` client against a
real daemon: usage in completion streams, legacy logprobs' text_offset, n choices streamed."""

from __future__ import annotations

import openai
import pytest
import trio
from support import start_daemon

PROMPT = "Once upon a time"


def _client(d) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{d.url}/v1", api_key="unused", max_retries=0, timeout=120)


async def _in_thread(fn, limit: float = 120):
    with trio.fail_after(limit):
        return await trio.to_thread.run_sync(fn)


async def test_completion_stream_sends_usage_when_asked(daemon):
    def calls():
        with _client(daemon) as oc:
            streamed = list(
                oc.completions.create(
                    model="tiny",
                    prompt=PROMPT,
                    max_tokens=7,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            whole = oc.completions.create(model="tiny", prompt=PROMPT, max_tokens=7, temperature=0)
            return streamed, whole

    streamed, whole = await _in_thread(calls)
    last = streamed[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump(
        exclude={"prompt_tokens_details", "completion_tokens_details"}
    ) == whole.usage.model_dump(exclude={"prompt_tokens_details", "completion_tokens_details"})
    assert last.usage.completion_tokens == 7
    assert all(ch.usage is None for ch in streamed[:-1])
    assert "".join(c.text for ch in streamed[:-1] for c in ch.choices) == whole.choices[0].text


def _offsets(tokens: list[str], start: int) -> list[int]:
    out, at = [], start
    for t in tokens:
        out.append(at)
        at += len(t)
    return out


@pytest.mark.parametrize("echo", [False, True])
async def test_completion_logprobs_carry_text_offset(daemon, echo):
    def calls():
        with _client(daemon) as oc:
            kw = dict(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, echo=echo)
            whole = oc.completions.create(**kw)
            streamed = list(oc.completions.create(**kw, stream=True))
            return whole, streamed

    whole, streamed = await _in_thread(calls)
    choice = whole.choices[0]
    lp = choice.logprobs
    start = len(PROMPT) if echo else 0
    assert choice.text.startswith(PROMPT) is echo
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert lp.text_offset == _offsets(lp.tokens, start)
    assert choice.text[start:] == "".join(lp.tokens)
    for tok, at in zip(lp.tokens, lp.text_offset):
        assert choice.text[at : at + len(tok)] == tok
    # Streamed offsets count from the start of the whole choice text, not of each chunk.
    pieces = [c.logprobs for ch in streamed for c in ch.choices if c.logprobs is not None]
    assert [o for p in pieces for o in p.text_offset] == lp.text_offset
    assert [t for p in pieces for t in p.tokens] == lp.tokens


async def test_chat_stream_with_n_interleaves_every_choice(daemon):
    msgs = [{"role": "user", "content": "Tell me a story"}]

    def calls():
        with _client(daemon) as oc:
            kw = dict(model="tiny", messages=msgs, max_tokens=5, temperature=0, n=3)
            whole = oc.chat.completions.create(**kw)
            streamed = list(oc.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
            return whole, streamed

    whole, streamed = await _in_thread(calls)
    *chunks, usage = streamed
    assert usage.choices == [] and usage.usage.completion_tokens == 15 == whole.usage.completion_tokens
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(len(ch.choices) == 1 for ch in chunks)
    by_index: dict[int, list] = {}
    for ch in chunks:
        by_index.setdefault(ch.choices[0].index, []).append(ch.choices[0])
    assert sorted(by_index) == [0, 1, 2]
    for i, parts in by_index.items():
        assert parts[0].delta.role == "assistant"
        assert sum(p.delta.role is not None for p in parts) == 1
        assert [p.finish_reason for p in parts] == [None] * (len(parts) - 1) + ["length"]
        text = "".join(p.delta.content or "" for p in parts)
        assert text == whole.choices[i].message.content  # greedy: every choice is the same answer
    assert len({ch.id for ch in chunks}) == 1


async def test_completion_stream_with_n_and_several_prompts(daemon):
    prompts = ["Hello", "The capital of France"]

    def calls():
        with _client(daemon) as oc:
            kw = dict(model="tiny", prompt=prompts, max_tokens=4, temperature=0, n=2)
            whole = oc.completions.create(**kw)
            streamed = list(oc.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
            return whole, streamed

    whole, streamed = await _in_thread(calls)
    *chunks, usage = streamed
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in whole.choices} and sorted(texts) == [0, 1, 2, 3]
    assert finishes == {i: "length" for i in range(4)}
    assert usage.usage.completion_tokens == 16
    # Both prompts count, each once (not once per choice).
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens
    assert whole.choices[0].text == whole.choices[1].text != whole.choices[2].text


async def test_n_accepts_up_to_128_choices(daemon):
    def calls():
        with _client(daemon) as oc:
            many = oc.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=2,
                temperature=0,
                n=128,
                stream=True,
            )
            chunks = list(many)
            try:
                oc.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], n=129)
            except openai.BadRequestError as exc:
                return chunks, exc
            return chunks, None

    chunks, too_many = await _in_thread(calls, 240)
    finished = {c.index for ch in chunks for c in ch.choices if c.finish_reason}
    assert finished == set(range(128))  # more than NUM_PARALLEL: the rest queued in the engine
    assert too_many is not None and too_many.status_code == 400
    assert too_many.body["type"] == "invalid_request_error" and "n must be" in too_many.body["message"]


async def test_leaving_an_n_stream_cancels_every_choice(models_dir):
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, models_dir, num_parallel=2)

            def leave_after_first_token():
                with _client(d) as oc:
                    stream = oc.chat.completions.create(
                        model="tiny",
                        messages=[{"role": "user", "content": "Hi"}],
                        max_tokens=1500,
                        temperature=0,
                        n=5,
                        stream=True,
                    )
                    with stream:
                        for ch in stream:
                            if ch.choices and ch.choices[0].delta.content:
                                return ch.choices[0].index

            await _in_thread(leave_after_first_token)
            runner = await d.runner()
            await runner.wait_until(lambda s: s.running == 0)
            stats = await d.runtime.scheduler.statistics()
            ended = runner.finished()[-5:]
            d.shutdown.set()
    assert stats.running == 0 and stats.queued == 0  # every choice's lease went back
    assert len(ended) == 5 and all(finish == "cancelled" for _, finish, _ in ended)
    assert all(s is None or s.generated_tokens < 750 for _, _, s in ended)


async def test_n_beyond_the_queue_cap_is_503_and_releases_what_it_took(models_dir):
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, models_dir, num_parallel=2, max_queue=1)

            def calls():
                with _client(d) as oc:
                    msgs = [{"role": "user", "content": "Hi"}]
                    try:
                        oc.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, n=4, stream=True)
                        busy = None
                    except openai.APIStatusError as exc:
                        busy = exc
                    fits = oc.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, n=3)
                    return busy, fits

            busy, fits = await _in_thread(calls)
            stats = await d.runtime.scheduler.statistics()
            d.shutdown.set()
    assert busy is not None and busy.status_code == 503 and busy.response.headers.get("retry-after")
    assert [c.finish_reason for c in fits.choices] == ["length"] * 3
    assert stats.running == 0 and stats.queued == 0
