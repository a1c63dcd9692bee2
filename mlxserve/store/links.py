"""Model directories made of symlinks to blobs, for loaders that want a directory.

``links/<manifest hex>/`` holds one symlink per file layer (``config.json``, ``model.safetensors``,
``1_Pooling/config.json``...) and adapter files under ``adapter/``. A manifest's digest fixes its
layers, so an existing directory is always current; it is built under a temporary name and
renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from ..errors import IntegrityError
from . import fsutil, manifest as mt

TMP_PREFIX = ".tmp-"
STALE_TMP_S = 3600


def build_links(links_dir: Path, blobs_dir: Path, manifest_hex: str, layers: list[dict]) -> Path:
    final = links_dir / manifest_hex
    if final.is_dir():
        return final
    entries: list[tuple[Path, str]] = []
    for layer in layers:
        kind = layer["mediaType"]
        if kind in mt.DIRECTORY_TYPES:
            rel = mt.safe_title(mt.layer_title(layer))
        elif kind in mt.ADAPTER_TYPES:
            rel = Path("adapter") / mt.safe_title(mt.layer_title(layer))
        else:
            continue
        entries.append((Path(rel), layer["digest"]))
    if len({rel for rel, _ in entries}) != len(entries):
        raise IntegrityError("manifest names the same file twice")
    tmp = fsutil.temp_path(links_dir, TMP_PREFIX + "links")
    tmp.mkdir()
    try:
        for rel, digest in entries:
            link = tmp / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            # Relative to the final location, so the store can be moved as a whole.
            target = os.path.relpath(blobs_dir / digest.replace(":", "-"), (final / rel).parent)
            os.symlink(target, link)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # a concurrent build that won the rename is just as good
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def prune_links(links_dir: Path, live: set[str]) -> None:
    now = time.time()
    for entry in links_dir.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            try:
                if now - entry.lstat().st_mtime < STALE_TMP_S:
                    continue  # maybe being built right now
            except FileNotFoundError:
                continue
        elif entry.name in live:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
