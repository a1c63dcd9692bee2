"""The parts of ``Store.create`` that decide *what* to write: the FROM source, the spec with the
Modelfile applied, and the small text layers. ``Store.create`` does the writing."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import BadRequest
from ..specs.modelfile import Modelfile
from ..specs.modelspec import ModelSpec
from ..specs.options import Options
from ..specs.templates import default_template
from . import importers, manifest as mt
from .ggufmeta import is_gguf

if TYPE_CHECKING:
    from .store import Store

Progress = Callable[[dict], None]
_BLOB_REF = re.compile(r"@?sha256[:-]([0-9a-f]{64})")
_QUANTIZE_NEEDS_DIR = "quantize is only supported when creating from a safetensors directory"


def source_path(ref: str, base_dir: Path, what: str = "FROM") -> Path | None:
    """FROM/ADAPTER as a path relative to the Modelfile's directory, or None (a model name)."""
    p = Path(ref).expanduser()
    if not p.is_absolute():
        p = base_dir / p
    if p.exists():
        return p
    # Clearly meant as a path: say it is missing rather than "model not found".
    if ref.startswith(("/", "./", "../", "~")) or ref.endswith((".gguf", ".safetensors")):
        raise BadRequest(f"{what} {ref}: no such file or directory")
    return None


def import_source(store: Store, mf: Modelfile, base_dir: Path, workdir: Path, emit: Progress,
                  quantize: str | None) -> importers.Imported:
    """Layers and spec for the Modelfile's FROM: an uploaded blob (``@sha256:...``), a GGUF
    file, a model directory, or a model already in the store (whose weights are shared)."""
    ref = mf.from_
    if m := _BLOB_REF.fullmatch(ref):
        path: Path | None = store.blob_path(f"sha256:{m.group(1)}")
        if not path.is_file():
            raise BadRequest(f"FROM {ref}: no such blob (upload it first)")
    else:
        path = source_path(ref, base_dir)
    if path is not None:
        if path.is_dir():
            return importers.import_directory(path, workdir, emit, quantize)
        if quantize is not None:
            raise BadRequest(_QUANTIZE_NEEDS_DIR)
        if is_gguf(path):
            return importers.import_gguf(path, workdir, emit)
        raise BadRequest(f"FROM {ref}: not a GGUF file or a model directory")
    if quantize is not None:
        raise BadRequest(_QUANTIZE_NEEDS_DIR)
    base = store.resolve(ref)
    shared = [importers.LayerSource(l["mediaType"], title=mt.layer_title(l), digest=l["digest"],
                                    size=l["size"])
              for l in base.layers if l["mediaType"] in mt.WEIGHT_TYPES]
    spec = ModelSpec.from_dict(base.spec.to_dict())  # a deep copy
    spec.parent_model = base.display
    return importers.Imported(shared, spec)


def apply_modelfile(imported: importers.Imported, mf: Modelfile) -> ModelSpec:
    """The imported spec with the Modelfile's PARAMETER/TEMPLATE/SYSTEM/... applied."""
    spec = imported.spec
    # Parameters merge (as Ollama's do): a derived model keeps the base's stop words etc.
    spec.parameters = spec.parameters.merged(Options.from_dict(mf.parameters))
    if mf.template is not None:
        spec.template = mf.template
    elif spec.template is None and not spec.is_embedding and imported.vocab:
        spec.template = default_template(imported.vocab)
    if mf.system is not None:
        spec.system = mf.system
    if mf.license:
        spec.license = "\n\n".join(mf.license)
    if mf.messages:
        spec.messages = list(mf.messages)
    if mf.adapter is not None:
        if spec.is_embedding:
            raise BadRequest("ADAPTER is not supported for embedding models")
        spec.adapter = True
    return spec


def text_layers(spec: ModelSpec) -> list[tuple[str, bytes]]:
    """(media type, bytes) of the template/system/params/license/messages layers; they mirror
    the spec so that registries and Ollama-style tools see the usual layer set."""
    parts: list[tuple[str, bytes]] = []
    if spec.template is not None:
        parts.append((mt.TEMPLATE, spec.template.encode()))
    if spec.system is not None:
        parts.append((mt.SYSTEM, spec.system.encode()))
    if not spec.parameters.is_empty():
        parts.append((mt.PARAMS, json.dumps(spec.parameters.to_dict(), sort_keys=True).encode()))
    if spec.license:
        parts.append((mt.LICENSE, spec.license.encode()))
    if spec.messages:
        parts.append((mt.MESSAGES, json.dumps(spec.messages).encode()))
    return parts
