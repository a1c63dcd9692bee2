"""Garbage collection of the store: blobs, records, markers, temp files and link directories
that nothing references any more. Called with the store's lock held exclusively."""

from __future__ import annotations

import logging
import shutil
import time
from typing import TYPE_CHECKING

from ..errors import IntegrityError
from . import fsutil, links, manifest as mt

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)

UPLOAD_GRACE_S = 24 * 3600  # an uploaded blob waits this long for the create that uses it
STALE_RECORD_TMP_S = 3600


def collect(store: Store) -> int:
    referenced: set[str] = set()
    live_links: set[str] = set()
    for mn, path in store.iter_manifests():
        try:
            data = path.read_bytes()
            doc = mt.parse_manifest(data, mn.display(store.default_registry))
        except (OSError, IntegrityError) as exc:
            # Without knowing what this manifest references, deleting anything is unsafe.
            log.error("not pruning the model store: %s", exc)
            return 0
        referenced |= mt.referenced_digests(doc)
        live_links.add(fsutil.sha256_bytes(data).split(":")[1])
    now = time.time()

    def age(p) -> float:
        try:
            return now - p.stat().st_mtime
        except FileNotFoundError:
            return float("inf")

    removed = 0
    for blob in store.blobs_dir.iterdir():
        if blob.name.replace("-", ":", 1) in referenced:
            continue
        if age(store.uploads_dir / blob.name) < UPLOAD_GRACE_S:
            continue
        blob.unlink(missing_ok=True)
        removed += 1
    fsutil.fsync_dir(store.blobs_dir)
    for marker in store.uploads_dir.iterdir():
        blob = store.blobs_dir / marker.name
        if not blob.exists() or marker.name.replace("-", ":", 1) in referenced:
            marker.unlink(missing_ok=True)
    for record in store.records_dir.iterdir():
        if record.name.startswith("."):  # a record being written by a verifying load
            if age(record) > STALE_RECORD_TMP_S:
                record.unlink(missing_ok=True)
        elif not (store.blobs_dir / record.name).exists():
            record.unlink(missing_ok=True)
    # Writers hold the shared lock, so anything left in tmp/ is from a crashed one.
    for entry in store.tmp_dir.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    links.prune_links(store.links_dir, live_links)
    return removed
