"""A tiny random-weight LLaVA (a 2-layer CLIP vision tower, a projector and the tiny llama of
``tinymodel``) written as an mlx-vlm / Hugging Face directory that loads offline.

Used by the vision tests. The image is 28x28 pixels in patches of 14: four image tokens stand for
one ``<image>`` placeholder. Random weights rarely emit EOS, so ``num_predict`` sets the length.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from . import tinymodel

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 28
PATCH_SIZE = 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # the CLS position is dropped ("default" strategy)

# The placeholder goes where a message's image parts are, as LLaVA's own templates put it.
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": IMAGE_SIZE,
    "patch_size": PATCH_SIZE,
    "projection_dim": 32,
    "num_channels": 3,
    "layer_norm_eps": 1e-5,
}


def _random_params(vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Every parameter of mlx-vlm's LLaVA (its names, MLX's conv layout), drawn at random: the
    language model is tinymodel's llama; norms are one, biases zero."""
    rng = np.random.default_rng(seed)
    h, inter, p = VISION["hidden_size"], VISION["intermediate_size"], PATCH_SIZE
    text_h = tinymodel.CONFIG["hidden_size"]

    def w(*shape):
        return (rng.standard_normal(shape) * 0.08).astype(np.float32)

    def norm(name):
        return {f"{name}.weight": np.ones(h, np.float32), f"{name}.bias": np.zeros(h, np.float32)}

    def linear(name, out, inp):
        return {f"{name}.weight": w(out, inp), f"{name}.bias": np.zeros(out, np.float32)}

    v = "vision_tower.vision_model."
    out = {
        v + "embeddings.class_embedding": w(h),
        v + "embeddings.patch_embedding.weight": w(h, p, p, 3),
        v + "embeddings.position_embedding.weight": w(IMAGE_TOKENS + 1, h),
        **norm(v + "pre_layrnorm"),
        **norm(v + "post_layernorm"),
        **linear("multi_modal_projector.linear_1", text_h, h),
        **linear("multi_modal_projector.linear_2", text_h, text_h),
    }
    for i in range(VISION["num_hidden_layers"]):
        layer = f"{v}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out |= linear(layer + "self_attn." + proj, h, h)
        out |= {
            **norm(layer + "layer_norm1"),
            **norm(layer + "layer_norm2"),
            **linear(layer + "mlp.fc1", inter, h),
            **linear(layer + "mlp.fc2", h, inter),
        }
    text = tinymodel._weights(vocab, seed)
    out |= {"language_model." + k: a for k, a in text.items()}
    return out


def write_llava_dir(path: Path, seed: int = 0) -> Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    tok = tinymodel.build_tokenizer()
    tok.add_special_tokens([IMAGE_TOKEN])
    vocab = tok.get_vocab_size()
    image_id = tok.token_to_id(IMAGE_TOKEN)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": TEMPLATE,
                "eos_token": "<|im_end|>",
                "bos_token": None,
                "pad_token": "<|endoftext|>",
                "add_bos_token": False,
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )
    text = {**tinymodel.CONFIG, "vocab_size": vocab}
    config = {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "text_config": text,
        "vision_config": VISION,
        "image_token_index": image_id,
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2,
        "vocab_size": vocab,
        "eos_token_id": [tok.token_to_id("<|im_end|>")],
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "processor_class": "LlavaProcessor",
                "do_resize": True,
                "size": {"shortest_edge": IMAGE_SIZE},
                "do_center_crop": True,
                "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "do_convert_rgb": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "resample": 3,
            }
        )
    )
    (path / "processor_config.json").write_text(
        json.dumps(
            {
                "processor_class": "LlavaProcessor",
                "patch_size": PATCH_SIZE,
                "vision_feature_select_strategy": "default",
                "image_token": IMAGE_TOKEN,
                "num_additional_image_tokens": 1,
            }
        )
    )
    save_file(_random_params(vocab, seed), str(path / "model.safetensors"))
    return path


def png(color: tuple[int, int, int], size: int = IMAGE_SIZE, *, stripes: bool = False) -> bytes:
    """A small PNG of one colour (with white stripes when asked), for requests."""
    from PIL import Image

    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[:] = color
    if stripes:
        pixels[::4] = 255
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
