"""Model names: ``[registry[:port]/][namespace/]name[:tag]``, as Ollama spells them.

A name becomes four path components under ``manifests/``, so the rules are strict: every part
is a short run of ``[a-z0-9_.-]`` starting with a letter, digit or ``_``, with no ``..``; the
registry may carry ``:port``. Names are case-insensitive (Ollama's are), so they are lowercased
before anything else; that also keeps one model from having two manifests on case-sensitive
filesystems.
"""

from __future__ import annotations

import re

import attrs

from ..errors import InvalidName

DEFAULT_REGISTRY = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 350

_PART = re.compile(r"[a-z0-9_][a-z0-9_.-]{0,79}")
_TAG = re.compile(r"[a-z0-9_][a-z0-9_.-]{0,127}")
_HOST = re.compile(r"[a-z0-9_][a-z0-9_.-]{0,252}(:[0-9]{1,5})?")


@attrs.frozen
class ModelName:
    registry: str
    namespace: str
    name: str
    tag: str

    def display(self, default_registry: str = DEFAULT_REGISTRY) -> str:
        """Shortest unambiguous form: ``name:tag``, ``ns/name:tag`` or the full name."""
        if self.registry == default_registry:
            if self.namespace == DEFAULT_NAMESPACE:
                return f"{self.name}:{self.tag}"
            return f"{self.namespace}/{self.name}:{self.tag}"
        return str(self)

    def path_parts(self) -> tuple[str, str, str, str]:
        return (self.registry, self.namespace, self.name, self.tag)

    def __str__(self) -> str:
        return f"{self.registry}/{self.namespace}/{self.name}:{self.tag}"


def _bad(text: str, why: str) -> InvalidName:
    shown = text if len(text) <= 80 else text[:77] + "..."
    return InvalidName(f"invalid model name '{shown}': {why}")


def parse_name(text: str, default_registry: str = DEFAULT_REGISTRY) -> ModelName:
    if not isinstance(text, str):
        raise InvalidName("invalid model name: expected a string")
    raw = text
    text = text.strip().lower()
    if not text:
        raise _bad(raw, "the name is empty")
    if len(text) > MAX_NAME_LENGTH:
        raise _bad(raw, f"longer than {MAX_NAME_LENGTH} characters")
    if text.startswith("/") or text.startswith("\\"):
        raise _bad(raw, "a model name is not a path (it must not start with '/')")
    if ".." in text:
        raise _bad(raw, "'..' is not allowed")
    if "\\" in text or "\x00" in text:
        raise _bad(raw, "backslashes and NUL are not allowed")
    # The tag follows the last ':' after the last '/', so a registry's ':port' is not a tag.
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        path, tag = text[:colon], text[colon + 1 :]
        if not tag:
            raise _bad(raw, "the tag after ':' is empty")
    else:
        path, tag = text, DEFAULT_TAG
    parts = path.split("/")
    if any(not p for p in parts):
        raise _bad(raw, "empty path component")
    if len(parts) > 3:
        raise _bad(raw, "too many '/' (expected [registry/][namespace/]name[:tag])")
    registry, namespace = default_registry.lower(), DEFAULT_NAMESPACE
    if len(parts) == 3:
        registry, namespace, name = parts
    elif len(parts) == 2:
        namespace, name = parts
    else:
        (name,) = parts
    if not _HOST.fullmatch(registry):
        raise _bad(raw, f"invalid registry '{registry}'")
    if not _PART.fullmatch(namespace):
        raise _bad(raw, f"invalid namespace '{namespace}' (use a-z, 0-9, '_', '.', '-'; at most 80 characters)")
    if not _PART.fullmatch(name):
        raise _bad(raw, f"invalid model '{name}' (use a-z, 0-9, '_', '.', '-'; at most 80 characters)")
    if not _TAG.fullmatch(tag):
        raise _bad(raw, f"invalid tag '{tag}' (use a-z, 0-9, '_', '.', '-'; at most 128 characters)")
    return ModelName(registry, namespace, name, tag)
