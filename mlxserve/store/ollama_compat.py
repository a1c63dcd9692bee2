"""A ModelSpec for a manifest in Ollama's format (pulled from an OCI registry).

Ollama's config blob is a small JSON (model_format, model_family, file_type...) and the
template, system prompt, parameters, license and messages live in their own layers. Its
templates are Go templates: kept as they are, the model's own Jinja chat template (inside the
GGUF) is used in their place when it has one, else they are translated (specs/gotemplate.py).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from ..errors import BadRequest
from ..specs.modelspec import ModelSpec
from ..specs.options import ALL_OPTIONS, Options
from . import manifest as mt

log = logging.getLogger(__name__)


def _json(data: bytes, default: Any) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return default


def spec_from_ollama(config: dict[str, Any], layers: list[dict], read: Callable[[dict], bytes]) -> ModelSpec:
    """``read(descriptor)`` returns a small layer's bytes."""
    family = str(config.get("model_family") or "")
    spec = ModelSpec(
        format="gguf",
        family=family,
        families=[str(f) for f in config.get("model_families") or [family] if f],
        parameter_size=str(config.get("model_type") or ""),
        quantization_level=str(config.get("file_type") or ""),
        model_type=family,
    )
    licenses: list[str] = []
    for layer in layers:
        kind = layer["mediaType"]
        if kind in (mt.OLLAMA_TEMPLATE, mt.TEMPLATE):
            text = read(layer).decode("utf-8", "replace")
            spec.template = text
        elif kind in (mt.OLLAMA_SYSTEM, mt.SYSTEM):
            spec.system = read(layer).decode("utf-8", "replace")
        elif kind in (mt.OLLAMA_LICENSE, mt.LICENSE):
            licenses.append(read(layer).decode("utf-8", "replace"))
        elif kind in (mt.OLLAMA_PARAMS, mt.PARAMS):
            params = _json(read(layer), {})
            known = {k: v for k, v in params.items() if k in ALL_OPTIONS} if isinstance(params, dict) else {}
            try:
                spec.parameters = Options.from_dict(known)
            except BadRequest as exc:
                log.warning("ignoring parameters of a pulled model: %s", exc)
        elif kind in (mt.OLLAMA_MESSAGES, mt.MESSAGES):
            msgs = _json(read(layer), [])
            spec.messages = (
                [
                    {"role": str(m.get("role", "")), "content": str(m.get("content", ""))}
                    for m in msgs
                    if isinstance(m, dict)
                ]
                if isinstance(msgs, list)
                else []
            )
        elif kind in (mt.OLLAMA_ADAPTER, mt.ADAPTER):
            spec.adapter = True
    spec.license = "\n\n".join(licenses) or None
    return spec
