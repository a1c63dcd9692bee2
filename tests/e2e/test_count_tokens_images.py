"""/v1/messages/count_tokens with an image counts the tokens the vision processor makes of it
(the tiny LLaVA's fixed run), as /v1/messages' usage reads them, through Anthropic's SDK."""

from __future__ import annotations

import pytest
import trio

pytest.importorskip("mlx_vlm")

from test_vision import RED, vdaemon, vision_store  # noqa: E402, F401  (the fixtures)

from mlxserve.testing import tinyvision  # noqa: E402


async def test_count_tokens_counts_an_image_as_its_tokens(vdaemon):  # noqa: F811  (the fixture)
    import anthropic

    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": RED}}
    with_image = [{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}]
    plain = [{"role": "user", "content": "What is this?"}]

    def calls():
        an = anthropic.Anthropic(base_url=vdaemon.url, api_key="x", max_retries=0)
        counted = an.messages.count_tokens(model="llava", messages=with_image).input_tokens
        counted_plain = an.messages.count_tokens(model="llava", messages=plain).input_tokens
        used = an.messages.create(model="llava", max_tokens=2, messages=with_image).usage.input_tokens
        try:  # a model without vision: the same 400 as /v1/messages, not a count
            an.messages.count_tokens(model="tiny", messages=with_image)
            refused = None
        except anthropic.BadRequestError as exc:
            refused = exc
        return counted, counted_plain, used, refused

    with trio.fail_after(180):
        counted, counted_plain, used, refused = await trio.to_thread.run_sync(calls)
    assert counted == used == counted_plain + tinyvision.IMAGE_TOKENS
    assert refused is not None and "does not support images" in str(refused)
