"""Typed generation options, as Ollama's ``options`` object and Modelfile ``PARAMETER`` lines."""

from __future__ import annotations

from typing import Any, Mapping

import attrs

from ..errors import BadRequest

INT_OPTIONS = ("num_ctx", "num_predict", "num_keep", "seed", "top_k", "repeat_last_n")
FLOAT_OPTIONS = (
    "temperature",
    "top_p",
    "min_p",
    "typical_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
)
# Load-time and llama.cpp-only options that Ollama clients send routinely: accepted and kept, so
# existing clients are not refused, but nothing here changes how MLX runs.
EXTRA_OPTIONS: dict[str, type] = {
    "num_batch": int,
    "num_thread": int,
    "num_gpu": int,
    "main_gpu": int,
    "mirostat": int,
    "use_mmap": bool,
    "low_vram": bool,
    "f16_kv": bool,
    "vocab_only": bool,
    "use_mlock": bool,
    "numa": bool,
    "penalize_newline": bool,
    "mirostat_eta": float,
    "mirostat_tau": float,
    "tfs_z": float,
}
_KIND: dict[str, type] = {
    **{n: int for n in INT_OPTIONS},
    **{n: float for n in FLOAT_OPTIONS},
    **EXTRA_OPTIONS,
}
ALL_OPTIONS = frozenset(_KIND) | {"stop"}
_KIND_WORDS = {int: "an integer", float: "a number", bool: "true or false"}


# Ranges the engine can honour; a value outside is the client's mistake (400), never a 500.
_RANGES: dict[str, tuple[float, float]] = {
    "num_ctx": (1, 1 << 24),
    "num_predict": (-2, 1 << 24),
    "num_keep": (-1, 1 << 24),
    "top_k": (0, 1 << 31),
    "repeat_last_n": (-1, 1 << 24),
    "temperature": (0.0, 100.0),
    "top_p": (0.0, 1.0),
    "min_p": (0.0, 1.0),
    "typical_p": (0.0, 1.0),
    "repeat_penalty": (0.0, 100.0),
    "presence_penalty": (-100.0, 100.0),
    "frequency_penalty": (-100.0, 100.0),
}


def _check_range(name: str, value: Any) -> Any:
    bounds = _RANGES.get(name)
    if bounds is None or isinstance(value, bool):
        return value
    lo, hi = bounds
    if not (lo <= value <= hi):  # also false for NaN
        raise BadRequest(f"invalid value for option '{name}': must be between {lo} and {hi}, got {value}")
    return value


def _typename(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def coerce_option(name: str, value: Any) -> Any:
    """One option value from JSON, checked against its type; raises BadRequest naming it."""
    if name == "stop":
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return list(value)
        raise BadRequest(
            f"invalid value for option 'stop': expected a string or a list of strings, got {_typename(value)}"
        )
    kind = _KIND.get(name)
    if kind is None:
        raise BadRequest(f"unknown option '{name}'")
    ok = False
    if kind is bool:
        ok = isinstance(value, bool)
    elif isinstance(value, bool):
        ok = False  # bool is an int subclass in Python; JSON true is not a number
    elif kind is int:
        # JSON encoders in some clients write 2048 as 2048.0; only integral values pass.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int)
    elif kind is float:
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    if not ok:
        raise BadRequest(f"invalid value for option '{name}': expected {_KIND_WORDS[kind]}, got {_typename(value)}")
    return _check_range(name, value)


def parse_option_text(name: str, text: str) -> Any:
    """One option value from Modelfile text (``PARAMETER name value``)."""
    if name == "stop":
        return text
    kind = _KIND.get(name)
    if kind is None:
        raise BadRequest(f"unknown parameter '{name}'")
    try:
        if kind is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        if kind is int:
            return _check_range(name, int(text))
        return _check_range(name, float(text))
    except ValueError:
        raise BadRequest(f"invalid value for parameter '{name}': expected {_KIND_WORDS[kind]}, got {text!r}") from None


@attrs.define
class Options:
    num_ctx: int | None = None
    num_predict: int | None = None
    num_keep: int | None = None
    seed: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[str] | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Options:
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise BadRequest(f"options must be an object, got {_typename(d)}")
        known: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in d.items():
            if value is None:
                continue
            value = coerce_option(key, value)
            (extra if key in EXTRA_OPTIONS else known)[key] = value
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = {
            a.name: getattr(self, a.name)
            for a in attrs.fields(Options)
            if a.name != "extra" and getattr(self, a.name) is not None
        }
        out.update(self.extra)
        return out

    def merged(self, other: Options | None) -> Options:
        """A copy where every option ``other`` sets wins."""
        if other is None:
            return attrs.evolve(self, stop=list(self.stop) if self.stop else self.stop, extra=dict(self.extra))
        d = self.to_dict()
        d.update(other.to_dict())
        return Options.from_dict(d)

    def is_empty(self) -> bool:
        return not self.to_dict()
