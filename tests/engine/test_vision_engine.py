"""Vision requests on the engine thread (no trio, no HTTP): the tiny random LLaVA of
mlxserve.testing.tinyvision, images prefilled through mlx-vlm and decoded in the batch."""

from __future__ import annotations

import pytest

pytest.importorskip("mlx_vlm")

import mlx.core as mx  # noqa: E402
from test_loop import EngineHarness, tokens_of  # noqa: E402

from mlxserve.engine import (
    loop as eng,  # noqa: E402
    vision,  # noqa: E402
)
from mlxserve.engine.sampling import SamplingParams  # noqa: E402
from mlxserve.testing import tinyvision  # noqa: E402

GREEDY = SamplingParams(temperature=0, repeat_penalty=1.0)
RED = tinyvision.png((255, 0, 0))
BLUE = tinyvision.png((0, 0, 255), stripes=True)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return tinyvision.write_llava_dir(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def harness(llava_dir):
    h = EngineHarness(llava_dir, num_parallel=4, prefill_chunk=8, prompt_cache_bytes=64 << 20)
    yield h
    h.close()


def prompt(h, text="What is in the picture?") -> list[int]:
    return h.tokenizer.encode(f"<|im_start|>user\n{tinyvision.IMAGE_TOKEN}{text}<|im_end|>\n<|im_start|>assistant\n")


def add(h, seq_id, ids, n=12, images=()):
    h.engine.submit(eng.Add(seq_id, ids, n, GREEDY, images=tuple(images)))


def solo(h, seq_id, ids, n=12, images=()):
    add(h, seq_id, ids, n, images)
    return h.collect({seq_id})[seq_id]


def reference(h, ids: list[int], image: bytes, n: int) -> list[int]:
    """Greedy decoding by mlx-vlm's whole model, one sequence, no batch: what the engine must match."""
    v = h.engine.lm.vision
    runs, tensors = vision._image_runs(v, (image,))
    full = vision.expand(ids, v.placeholder_id, runs)
    cache = h.engine.lm.model.make_cache()
    with mx.stream(mx.default_stream(mx.cpu)):
        logits = v.model(mx.array([full]), tensors["pixel_values"], mask=None, cache=cache).logits
        out = []
        for _ in range(n):
            token = int(mx.argmax(logits[0, -1]).item())
            out.append(token)
            logits = h.engine.lm.model(mx.array([[token]]), cache=cache)
    return out


def test_images_reach_the_model_and_count_as_prompt_tokens(harness):
    ids = prompt(harness)
    red = solo(harness, 1, ids, images=[RED])
    blue = solo(harness, 2, ids, images=[BLUE])
    text = solo(harness, 3, ids)
    assert red[-1].finish == blue[-1].finish == "length"
    # Under greedy decoding only the image differs between these two.
    assert tokens_of(red) != tokens_of(blue)
    assert tokens_of(red) != tokens_of(text)
    # One placeholder became the image's tokens; a KV of another image is never reused.
    assert red[-1].stats.prompt_tokens == len(ids) - 1 + tinyvision.IMAGE_TOKENS
    assert text[-1].stats.prompt_tokens == len(ids)
    assert blue[-1].stats.cached_tokens == 0


def test_batched_decode_matches_mlx_vlm_alone(harness):
    ids = prompt(harness)
    want_red, want_blue = reference(harness, ids, RED, 10), reference(harness, ids, BLUE, 10)
    text_ids = harness.tokenizer.encode("Hello world! How are you")
    text_alone = tokens_of(solo(harness, 10, text_ids, 10))
    add(harness, 11, ids, 10, [RED])
    add(harness, 12, text_ids, 10)
    add(harness, 13, ids, 10, [BLUE])
    got = harness.collect({11, 12, 13})
    assert tokens_of(got[11]) == want_red
    assert tokens_of(got[13]) == want_blue
    assert tokens_of(got[12]) == text_alone


def test_two_images_in_one_prompt(harness):
    two = harness.tokenizer.encode(
        f"<|im_start|>user\n{tinyvision.IMAGE_TOKEN}and{tinyvision.IMAGE_TOKEN}<|im_end|>\n<|im_start|>assistant\n"
    )
    a = solo(harness, 20, two, images=[RED, BLUE])
    b = solo(harness, 21, two, images=[BLUE, RED])
    assert a[-1].stats.prompt_tokens == len(two) - 2 + 2 * tinyvision.IMAGE_TOKENS
    assert tokens_of(a) != tokens_of(b)  # the order of the images matters


def test_cancelling_a_vision_request_frees_its_slot(harness):
    ids = prompt(harness)
    add(harness, 30, ids, 1500, [RED])
    first = harness.events.get(timeout=60)
    assert first.seq_id == 30 and first.finish is None
    harness.engine.submit(eng.Cancel(30))
    chunks = harness.collect({30})[30]
    assert chunks[-1].finish == "cancelled" and chunks[-1].stats.generated_tokens < 100
    # The batch goes on: the same request again runs to its end.
    again = solo(harness, 31, ids, 5, [RED])
    assert again[-1].finish == "length" and again[-1].stats.generated_tokens == 5


def test_a_bad_image_fails_that_request_only(harness):
    ids = prompt(harness)
    add(harness, 40, ids, 5, [b"not an image"])
    add(harness, 41, ids, 5, [RED])
    got = harness.collect({40, 41})
    assert got[40][-1].finish == "error" and "cannot read the image" in got[40][-1].error
    assert got[41][-1].finish == "length"


def test_images_pair_with_placeholders_from_the_end():
    P = 9
    assert vision.expand([1, P, 2, P, 3], P, [[7, 7], [8]]) == [1, 7, 7, 2, 8, 3]
    assert vision.expand([1, 2], P, [[7], [8]]) == [7, 8, 1, 2]  # no placeholder: images first
    assert vision.expand([P, 1, P], P, [[7]]) == [1, 7]  # a placeholder without an image goes
    # A dropped early message took its placeholder: the last images are the ones kept.
    assert vision.used_images([1, P, 2], P, (b"a", b"b", b"c")) == (b"c",)
    assert vision.used_images([1, 2], P, (b"a", b"b")) == (b"a", b"b")


@pytest.mark.parametrize(
    "model_type,served",
    [
        ("llava", True),
        ("gemma3", True),
        ("qwen2_5_vl", False),
        ("qwen2_vl", False),
        ("mllama", False),
        ("nonesuch", False),
    ],
)
def test_vision_types_that_cannot_share_a_batch_are_refused_alike(tmp_path, model_type, served):
    """Qwen-VL keeps an image's rotary positions as the model's own state and Llama 3.2 Vision
    cross-attends to the image at every step: neither can decode in a shared batch. Create (no
    MLX) and load decide alike."""
    import json

    from mlxserve.store import importers

    config = {"model_type": model_type, "vision_config": {}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert vision.is_vision_dir(tmp_path) is served
    assert importers.served_vision_type(config) is served
