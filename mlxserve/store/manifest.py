"""OCI image manifests and the media types of mlxserve (and Ollama) layers."""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any

from ..errors import IntegrityError
from .fsutil import DIGEST_RE

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
SPEC_MEDIA_TYPE = "application/vnd.mlxserve.config.v1+json"
OLLAMA_CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"

GGUF = "application/vnd.mlxserve.model.gguf"
SAFETENSORS = "application/vnd.mlxserve.model.safetensors"
TOKENIZER = "application/vnd.mlxserve.tokenizer"
MODEL_CONFIG = "application/vnd.mlxserve.config"
ADAPTER = "application/vnd.mlxserve.adapter"
TEMPLATE = "application/vnd.mlxserve.template"
SYSTEM = "application/vnd.mlxserve.system"
PARAMS = "application/vnd.mlxserve.params"
LICENSE = "application/vnd.mlxserve.license"
MESSAGES = "application/vnd.mlxserve.messages"

OLLAMA_MODEL = "application/vnd.ollama.image.model"
OLLAMA_ADAPTER = "application/vnd.ollama.image.adapter"
OLLAMA_PROJECTOR = "application/vnd.ollama.image.projector"
OLLAMA_TEMPLATE = "application/vnd.ollama.image.template"
OLLAMA_SYSTEM = "application/vnd.ollama.image.system"
OLLAMA_PARAMS = "application/vnd.ollama.image.params"
OLLAMA_LICENSE = "application/vnd.ollama.image.license"
OLLAMA_MESSAGES = "application/vnd.ollama.image.messages"

# Layers that hold the model itself; a model created FROM another shares exactly these.
WEIGHT_TYPES = frozenset(
    {GGUF, SAFETENSORS, TOKENIZER, MODEL_CONFIG, ADAPTER, OLLAMA_MODEL, OLLAMA_ADAPTER, OLLAMA_PROJECTOR}
)
# Files that model_path() lays out as a directory (by their title annotation).
DIRECTORY_TYPES = frozenset({SAFETENSORS, TOKENIZER, MODEL_CONFIG})
ADAPTER_TYPES = frozenset({ADAPTER, OLLAMA_ADAPTER})
GGUF_TYPES = frozenset({GGUF, OLLAMA_MODEL})
TITLE = "org.opencontainers.image.title"


def descriptor(media_type: str, digest: str, size: int, title: str | None = None) -> dict:
    d: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    if title is not None:
        d["annotations"] = {TITLE: title}
    return d


def build_manifest(config: dict, layers: list[dict]) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "config": config, "layers": layers}
    return json.dumps(doc, indent=2).encode() + b"\n"


def parse_manifest(data: bytes, where: str) -> dict:
    """Check the parts of a manifest the store relies on; ``where`` names it in errors."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise IntegrityError(f"manifest of {where} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise IntegrityError(f"manifest of {where} is not an OCI/Docker schema 2 manifest")
    if not isinstance(doc.get("layers"), list):
        raise IntegrityError(f"manifest of {where} has no layer list")
    for d in [doc.get("config"), *doc["layers"]]:
        if not isinstance(d, dict) or not isinstance(d.get("mediaType"), str):
            raise IntegrityError(f"manifest of {where} has a malformed descriptor")
        if not isinstance(d.get("digest"), str) or not DIGEST_RE.fullmatch(d["digest"]):
            raise IntegrityError(f"manifest of {where} has a bad digest {d.get('digest')!r}")
        if not isinstance(d.get("size"), int) or d["size"] < 0:
            raise IntegrityError(f"manifest of {where} has a bad size for {d['digest']}")
    return doc


def referenced_digests(doc: dict) -> set[str]:
    return {doc["config"]["digest"], *(d["digest"] for d in doc["layers"])}


def layer_title(layer: dict) -> str | None:
    return (layer.get("annotations") or {}).get(TITLE)


def safe_title(title: Any) -> PurePosixPath:
    """A layer's file name as a relative path that stays inside its directory.

    Manifests may come from a registry, so a title like ``../../x`` must not become a symlink
    outside ``links/``."""
    if not isinstance(title, str) or not title or "\\" in title or "\x00" in title:
        raise IntegrityError(f"layer title {title!r} is not a safe file name")
    p = PurePosixPath(title)
    if p.is_absolute() or any(part in ("", ".", "..") for part in p.parts) or len(p.parts) > 3:
        raise IntegrityError(f"layer title {title!r} is not a safe file name")
    return p
