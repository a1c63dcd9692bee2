"""Vision-language models through mlx-vlm.

The batch (mlx-lm's BatchGenerator) only ever sees the language model. A request with images
runs here first, on the engine thread: the processor turns each image into pixels and into the
run of image tokens that stands for it, the vision tower and projector turn the pixels into
embeddings merged with the prompt's, and the prompt but its last token is prefilled into a fresh
KV cache. The sequence then joins the batch like a prompt-cache hit, so its decode batches with
every other sequence and is cancelled like any other.

Images are paired with the image placeholders the chat template wrote, last with last (the
oldest messages, and their images, are the ones dropped to fit the window); a prompt without a
placeholder gets its images at the start.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache

from ..errors import LoadError, UnsupportedModel
from ..specs.visiontypes import served_vision_type
from . import tokenizer as tok

if TYPE_CHECKING:
    from .model import LoadedModel

log = logging.getLogger(__name__)


def is_vision_dir(path: Path) -> bool:
    """A directory whose config has a vision tower of a type served here (specs/visiontypes.py)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return served_vision_type(config)


class TextModel(nn.Module):
    """The language model as the batch drives it: token ids (or merged embeddings) in, logits out."""

    def __init__(self, language_model: nn.Module):
        super().__init__()
        self.language_model = language_model

    @property
    def layers(self):
        return self.language_model.layers

    def make_cache(self) -> list:
        if hasattr(self.language_model, "make_cache"):
            return self.language_model.make_cache()
        return [KVCache() for _ in self.layers]

    def __call__(self, inputs: mx.array, cache=None, inputs_embeds: mx.array | None = None) -> mx.array:
        out = self.language_model(inputs, inputs_embeds=inputs_embeds, cache=cache)
        return getattr(out, "logits", out)


@attrs.define
class VisionParts:
    model: nn.Module  # the whole mlx-vlm model: vision tower, projector, language model
    processor: Any
    placeholder: str  # what the chat template writes for one image
    placeholder_id: int


def _placeholder(processor, tokenizer) -> tuple[str, int]:
    # Gemma 3's templates write <start_of_image>, which its processor expands; LLaVA's and
    # Qwen-VL's write the image token itself.
    text = getattr(processor, "boi_token", None) or getattr(processor, "image_token", None) or "<image>"
    ids = tokenizer.encode(text, add_bos=False)
    if len(ids) != 1:
        raise UnsupportedModel(f"the image placeholder {text!r} is not one token in this tokenizer")
    return text, ids[0]


def _tolerate_broken_mistral_common() -> None:
    """transformers 5 checks every processor's tokenizer against MistralCommonBackend too, which
    it imports whenever mistral-common is installed: one installed without its own dependencies
    (as engine/tokenizer's vocabularies may have it) fails every processor. A class nothing is an
    instance of stands in for it then."""
    import transformers

    try:
        transformers.MistralCommonBackend  # noqa: B018
    except ImportError:
        transformers.MistralCommonBackend = type("MistralCommonBackend", (), {})


def load_directory(path: str | Path) -> tuple[TextModel, tok.TokenizerInfo, dict, int, int, VisionParts]:
    """The fields of engine/model.py's LoadedModel: the language model as the batch drives it, the
    tokenizer, the text config, weight bytes (the vision tower's too), context, the vision parts."""
    from mlx_vlm.utils import load as vlm_load

    path = Path(path)
    _tolerate_broken_mistral_common()
    try:
        model, processor = vlm_load(str(path))
    except (ValueError, FileNotFoundError, KeyError, OSError) as exc:
        raise LoadError(f"cannot load the vision model in {path.name}: {exc}") from exc
    model.eval()
    tokenizer = tok.from_directory(path)
    if tokenizer.chat_template is None:  # newer processors keep the template beside the tokenizer
        tokenizer.chat_template = getattr(processor, "chat_template", None)
    config = json.loads((path / "config.json").read_text())
    text_config = {**config, **(config.get("text_config") or {})}
    text_config.pop("quantization", None)  # the batch sees the language model as loaded
    placeholder, placeholder_id = _placeholder(processor, tokenizer)
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    ctx = int(text_config.get("max_position_embeddings") or 4096)
    return (
        TextModel(model.language_model),
        tokenizer,
        text_config,
        weight_bytes,
        ctx,
        VisionParts(model, processor, placeholder, placeholder_id),
    )


def open_image(data: bytes):
    """Bytes -> an RGB PIL image; anything PIL cannot read is a ValueError."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # PIL raises many kinds for a bad file
        raise ValueError(f"cannot read the image: {exc}") from None
    return img.convert("RGB")


def _as_mx(value) -> mx.array:
    return value if isinstance(value, mx.array) else mx.array(np.asarray(value))


def _image_runs(v: VisionParts, images: tuple[bytes, ...]) -> tuple[list[list[int]], dict[str, mx.array]]:
    """For each image, the token run that stands for it; and the processor's pixel tensors
    (pixel_values, and grid sizes where the model has them) of all images, in order."""
    bos = getattr(v.processor.tokenizer, "bos_token_id", None)
    runs, tensors = [], {}
    for data in images:
        out = v.processor(text=[v.placeholder], images=[open_image(data)])
        ids = [int(t) for t in np.asarray(out["input_ids"]).reshape(-1)]
        if bos is not None and len(ids) > 1 and ids[0] == bos and bos != v.placeholder_id:
            ids = ids[1:]
        runs.append(ids)
        for key, value in out.items():
            if key not in ("input_ids", "attention_mask") and value is not None:
                tensors.setdefault(key, []).append(_as_mx(value))
    return runs, {k: mx.concatenate(vs, axis=0) for k, vs in tensors.items()}


def expand(prompt_ids: list[int], placeholder_id: int, runs: list[list[int]]) -> list[int]:
    """Each image's run in place of its placeholder, last image with last placeholder; without
    placeholders the runs go first. A placeholder left without an image is dropped: the vision
    model would look for an image there."""
    at = [i for i, t in enumerate(prompt_ids) if t == placeholder_id]
    if not at:
        return [t for run in runs for t in run] + list(prompt_ids)
    pairs = dict(zip(at[::-1], runs[::-1]))
    out: list[int] = []
    for i, t in enumerate(prompt_ids):
        out.extend(pairs.get(i, () if t == placeholder_id else (t,)))
    return out


def used_images(prompt_ids: list[int], placeholder_id: int, images: tuple) -> tuple:
    """The images the prompt still has a place for (the last ones)."""
    n = sum(t == placeholder_id for t in prompt_ids)
    return images if n == 0 or n >= len(images) else images[len(images) - n :]


def prefill(
    lm: LoadedModel, prompt_ids: list[int], images: tuple[bytes, ...], chunk: int, stream: Any = None
) -> tuple[list, list[int]]:
    """Run the vision tower and every prompt token but the last into a new KV cache, on
    ``stream`` (the batch's). Returns (cache, the prompt's ids with each image's tokens in place)."""
    with mx.stream(stream if stream is not None else mx.default_stream(mx.default_device())):
        return _prefill(lm, prompt_ids, images, chunk)


def _prefill(lm: LoadedModel, prompt_ids: list[int], images: tuple[bytes, ...], chunk: int) -> tuple[list, list[int]]:
    v: VisionParts | None = getattr(lm, "vision", None)
    if v is None:
        raise ValueError("this model does not take images")
    images = used_images(prompt_ids, v.placeholder_id, images)
    runs, tensors = _image_runs(v, images)
    ids = expand(prompt_ids, v.placeholder_id, runs)
    if len(ids) >= lm.context_length:
        raise ValueError(
            f"the prompt with its images is {len(ids)} tokens, which does not fit the "
            f"context window of {lm.context_length} tokens"
        )
    pixel_values = tensors.pop("pixel_values", None)
    feats = v.model.get_input_embeddings(mx.array([ids]), pixel_values, mask=mx.ones((1, len(ids))), **tensors)
    embeds = getattr(feats, "inputs_embeds", feats)
    cache = lm.model.make_cache()
    head = len(ids) - 1  # the last token runs in the batch, which samples from its logits
    for start in range(0, head, max(chunk, 1)):
        end = min(start + chunk, head)
        lm.model(mx.array([ids[start:end]]), cache=cache, inputs_embeds=embeds[:, start:end])
        mx.eval([c.state for c in cache])
    return cache, ids
