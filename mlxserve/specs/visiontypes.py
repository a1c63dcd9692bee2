"""Which vision models mlxserve serves: store/importers.py (at create) and engine/vision.py (at
load) ask the same question here, without importing mlx-vlm."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

# A language model that keeps the image's 3-D rotary positions as its own state (Qwen-VL,
# GLM-4V: rope_deltas) would apply one sequence's to every row of a batch; one that cross-attends
# to the image at every step (Llama 3.2 Vision) has no image in the batch.
_UNBATCHABLE = ("rope_deltas", "cross_attention_states")


def served_vision_type(config: Any) -> bool:
    """A config with a vision tower of a type mlx-vlm implements in a way the batch can decode."""
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if (
        not isinstance(config, dict)
        or not isinstance(config.get("vision_config"), dict)
        or not isinstance(model_type, str)
        or not model_type.isidentifier()
    ):
        return False
    spec = importlib.util.find_spec("mlx_vlm")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return False
    dirs = [d for d in (Path(p) / "models" / model_type for p in spec.submodule_search_locations) if d.is_dir()]
    return bool(dirs) and not any(
        word in f.read_text(errors="replace") for d in dirs for f in d.glob("*.py") for word in _UNBATCHABLE
    )
