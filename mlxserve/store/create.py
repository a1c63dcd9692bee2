"""The parts of ``Store.create`` that decide *what* to write: the FROM source, the spec with the
Modelfile applied, and the small text layers. ``Store.create`` does the writing."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import BadRequest, IntegrityError
from ..specs.modelfile import Modelfile
from ..specs.modelspec import ModelSpec
from ..specs.options import Options
from ..specs.templates import default_template
from . import importers, manifest as mt
from .ggufmeta import GGUF_ARCHITECTURES, is_gguf

if TYPE_CHECKING:
    from .store import Store

Progress = Callable[[dict], None]
_BLOB_REF = re.compile(r"@?sha256[:-]([0-9a-f]{64})")
_QUANTIZE_NEEDS_DIR = "quantize is only supported when creating from a safetensors directory"
ADAPTERS_UNSUPPORTED = "adapters are not supported (mlxserve does not apply LoRA adapters)"


def source_path(ref: str, base_dir: Path) -> Path | None:
    """FROM as a path relative to the Modelfile's directory, or None (a model name)."""
    p = Path(ref).expanduser()
    if not p.is_absolute():
        p = base_dir / p
    if p.exists():
        # A FIFO would block the open (and every store write behind it); a device is no model.
        if not (p.is_dir() or stat.S_ISREG(os.stat(p).st_mode)):
            raise BadRequest(f"FROM {ref}: not a regular file or a directory")
        return p
    # Clearly meant as a path: say it is missing rather than "model not found".
    if ref.startswith(("/", "./", "../", "~")) or ref.endswith((".gguf", ".safetensors")):
        raise BadRequest(f"FROM {ref}: no such file or directory")
    return None


def files_source(store: Store, files: object, workdir: Path) -> Path:
    """The model made of uploaded blobs named by an API create's ``files`` ({file name: digest},
    as ``ollama create`` sends): a GGUF blob as it is, else a directory of links to the blobs
    under their file names, imported like any model directory."""
    if not isinstance(files, dict) or not files:
        raise BadRequest("files must be an object mapping file names to blob digests")
    blobs: dict[str, Path] = {}
    for name, digest in files.items():
        try:
            rel = mt.safe_title(name)
        except IntegrityError:
            raise BadRequest(f"files: {name!r} is not a plain relative file name") from None
        if not isinstance(digest, str):
            raise BadRequest(f"files: the digest of {name} must be a string")
        blob = store.blob_path(digest)
        if not blob.is_file():
            raise BadRequest(f"files: {name}: blob {digest} not found (upload it first with POST /api/blobs/{digest})")
        blobs[str(rel)] = blob
    ggufs = [name for name, blob in blobs.items() if is_gguf(blob)]
    if ggufs:
        if len(blobs) > 1:
            raise BadRequest(f"files: a GGUF model is a single file (got {', '.join(blobs)})")
        return blobs[ggufs[0]]
    root = workdir / "files"
    for name, blob in blobs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(blob, root / name)
    return root


def import_source(
    store: Store,
    mf: Modelfile,
    base_dir: Path,
    workdir: Path,
    emit: Progress,
    quantize: str | None,
    files: object = None,
    validated: Callable[[], None] = lambda: None,
) -> importers.Imported:
    """Layers and spec for the Modelfile's FROM: an uploaded blob (``@sha256:...``), a GGUF
    file, a model directory, or a model already in the store (whose weights are shared); or
    for the uploaded ``files`` of an API create. ``validated``: see importers.import_gguf."""
    ref = mf.from_
    if files is not None:
        if ref:
            raise BadRequest("give either from or files, not both")
        path: Path | None = files_source(store, files, workdir)
    elif not ref:
        raise BadRequest("either from or files is required")
    elif m := _BLOB_REF.fullmatch(ref):
        path = store.blob_path(f"sha256:{m.group(1)}")
        if not path.is_file():
            raise BadRequest(f"FROM {ref}: no such blob (upload it first)")
    else:
        path = source_path(ref, base_dir)
    if path is not None:
        if path.is_dir():
            return importers.import_directory(path, workdir, emit, quantize, validated, converter=store.converter)
        if quantize is not None:
            raise BadRequest(_QUANTIZE_NEEDS_DIR)
        if is_gguf(path):
            return importers.import_gguf(path, workdir, emit, validated, converter=store.converter)
        raise BadRequest(f"{f'FROM {ref}' if ref else 'files'}: not a GGUF file or a model directory")
    if quantize is not None:
        raise BadRequest(_QUANTIZE_NEEDS_DIR)
    base = store.resolve(ref)
    if base.spec.format == "gguf" and base.spec.family not in ("", *GGUF_ARCHITECTURES):
        raise BadRequest(
            f"FROM {ref}: unsupported model architecture {base.spec.family!r} "
            f"(GGUF models mlxserve can run: {', '.join(GGUF_ARCHITECTURES)})"
        )
    shared = [
        importers.LayerSource(l["mediaType"], title=mt.layer_title(l), digest=l["digest"], size=l["size"])
        for l in base.layers
        if l["mediaType"] in mt.WEIGHT_TYPES
    ]
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
