"""ModelSpec: everything the server knows about a stored model, kept as the manifest's config blob.

Structured and unstructured with cattrs. The converter is strict on purpose: a spec written by
hand or by a newer version with a field we do not know, or with a mistyped field, is refused
with the field named instead of being half-read.
"""

from __future__ import annotations

import json
import typing
from typing import Any

import attrs
import cattrs
import cattrs.v

from ..errors import BadRequest
from .options import Options

__all__ = ["ModelSpec", "Options", "FORMATS", "CAPABILITIES"]

FORMATS = ("gguf", "safetensors")
CAPABILITIES = ("completion", "embedding", "tools", "vision", "insert", "thinking")


@attrs.define
class ModelSpec:
    format: str = attrs.field(validator=attrs.validators.in_(FORMATS))
    family: str = ""
    families: list[str] = attrs.field(factory=list)
    parameter_size: str = ""
    quantization_level: str = ""
    context_length: int | None = None
    capabilities: list[str] = attrs.field(factory=lambda: ["completion"])
    parameters: Options = attrs.field(factory=Options)
    # Jinja chat template; None means "the model's own (tokenizer) template, else a default".
    template: str | None = None
    system: str | None = None
    license: str | None = None
    messages: list[dict[str, str]] = attrs.field(factory=list)
    adapter: bool = False
    model_type: str = ""
    # GGUF-style key/values for /api/show "model_info" (general.*, <arch>.*).
    model_info: dict[str, Any] = attrs.field(factory=dict)
    parent_model: str = ""
    # What create did to the source weights, e.g. "gguf Q4_K_M dequantized, requantized to q4".
    conversion: str | None = None

    @property
    def is_embedding(self) -> bool:
        return "embedding" in self.capabilities

    def reported_capabilities(self) -> list[str]:
        """What /api/show and /api/tags report, in Ollama's order. ``capabilities`` stores what
        the model is (completion, embedding); the rest says what the server does with it:
        ``tools`` for every generative model, since every one is prompted through a chat
        template (its own, its tokenizer's, or ChatML) and tools reach any template;
        ``thinking`` when the template thinks (specs/thinking.py); never ``insert`` (a
        ``suffix`` is refused)."""
        from .thinking import style_of

        out = [c for c in ("completion", "embedding") if c in self.capabilities]
        if "completion" in out:
            out.append("tools")
        if "vision" in self.capabilities:
            out.append("vision")
        if "completion" in out and style_of(self.template) is not None:
            out.append("thinking")
        return out

    def details(self) -> dict[str, Any]:
        """Ollama's "details" object for the model (/api/tags, /api/show, /api/ps)."""
        return {
            "parent_model": self.parent_model or "",
            "format": self.format,
            "family": self.family,
            "families": self.families or ([self.family] if self.family else None),
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }

    def to_dict(self) -> dict[str, Any]:
        return _converter.unstructure(self)

    def to_json(self) -> bytes:
        # Sorted and compact so an identical spec gives an identical config blob (same digest).
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, d: Any) -> ModelSpec:
        if not isinstance(d, dict):
            raise BadRequest("invalid model spec: expected a JSON object")
        try:
            return _converter.structure(d, cls)
        except BadRequest:
            raise
        except Exception as exc:  # cattrs wraps field errors in (nested) exception groups
            raise BadRequest(f"invalid model spec: {'; '.join(_describe(exc))}") from None

    @classmethod
    def from_json(cls, data: bytes | str) -> ModelSpec:
        try:
            d = json.loads(data)
        except ValueError as exc:
            raise BadRequest(f"invalid model spec: not JSON ({exc})") from None
        return cls.from_dict(d)


def _format(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, BadRequest):
        return str(exc)
    if isinstance(exc, (TypeError, ValueError)) and exc.args and isinstance(exc.args[0], str):
        if exc.args[0].startswith(("expected", "'")):  # ours, or an attrs validator's
            return exc.args[0]
    return cattrs.v.format_exception(exc, type_)


def _describe(exc: BaseException) -> list[str]:
    try:
        msgs = cattrs.transform_error(exc, format_exception=_format)
    except Exception:
        msgs = [str(exc)]
    out = []
    for m in msgs:
        text, _, where = m.rpartition(" @ $")
        where = where.lstrip(".")
        out.append(f"field '{where}': {text}" if where else text)
    return out or [str(exc)]


def _got(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _strict(kind: type, words: str):
    def hook(value: Any, _type: Any) -> Any:
        if isinstance(value, bool) and kind is not bool:
            raise TypeError(f"expected {words}, got {_got(value)}")
        if kind is float and isinstance(value, int):
            return float(value)
        if not isinstance(value, kind):
            raise TypeError(f"expected {words}, got {_got(value)}")
        return value

    return hook


def _is_list(t: Any) -> bool:
    return typing.get_origin(t) is list


def _is_dict(t: Any) -> bool:
    return typing.get_origin(t) is dict


def _list_hook(value: Any, t: Any) -> list:
    # A string is iterable; without this "x" would become ["x"].
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {_got(value)}")
    (arg,) = typing.get_args(t) or (Any,)
    return [_converter.structure(v, arg) for v in value]


def _dict_hook(value: Any, t: Any) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {_got(value)}")
    _k, arg = typing.get_args(t) or (str, Any)
    return {_converter.structure(k, str): _converter.structure(v, arg) for k, v in value.items()}


def _options_hook(value: Any, _type: Any) -> Options:
    return Options.from_dict(value)


_converter = cattrs.Converter(forbid_extra_keys=True)
# cattrs' defaults coerce (str(5) == "5"); a spec with a mistyped field must fail instead.
_converter.register_structure_hook(str, _strict(str, "a string"))
_converter.register_structure_hook(int, _strict(int, "an integer"))
_converter.register_structure_hook(float, _strict(float, "a number"))
_converter.register_structure_hook(bool, _strict(bool, "a boolean"))
_converter.register_structure_hook(Any, lambda v, _t: v)
_converter.register_structure_hook(Options, _options_hook)
_converter.register_structure_hook_func(_is_list, _list_hook)
_converter.register_structure_hook_func(_is_dict, _dict_hook)
_converter.register_unstructure_hook(Options, lambda o: o.to_dict())
