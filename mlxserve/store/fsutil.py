"""Durable file primitives: hashing, atomic replace, fsync of directories, a store-wide lock."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

CHUNK = 4 << 20
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


def hash_file(path: Path) -> tuple[str, int]:
    """(``sha256:<hex>``, size) of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(tmp_dir: Path, prefix: str) -> Path:
    return tmp_dir / f"{prefix}-{os.getpid()}-{secrets.token_hex(6)}.tmp"


def write_chunks(dest: BinaryIO, chunks: Iterable[bytes]) -> tuple[str, int]:
    """Write ``chunks`` to an open file, hashing on the way; fsyncs before returning."""
    h = hashlib.sha256()
    size = 0
    for chunk in chunks:
        if not chunk:
            continue
        h.update(chunk)
        dest.write(chunk)
        size += len(chunk)
    dest.flush()
    os.fsync(dest.fileno())
    return "sha256:" + h.hexdigest(), size


def read_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def publish(tmp: Path, dest: Path) -> None:
    """Rename a complete, fsynced temp file into place and make the rename durable."""
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


def atomic_write(dest: Path, data: bytes, tmp_dir: Path) -> None:
    """Write ``data`` to ``dest`` so that readers see the old file or the new one, never half."""
    tmp = temp_path(tmp_dir, dest.name)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def makedirs_durable(path: Path, stop: Path) -> None:
    """mkdir -p, fsyncing each parent whose entry list changed (up to ``stop``)."""
    missing: list[Path] = []
    p = path
    while not p.exists() and p != stop and p != p.parent:
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    for d in missing:
        fsync_dir(d.parent)


@contextlib.contextmanager
def file_lock(path: Path, exclusive: bool) -> Iterator[None]:
    """flock on ``path``: writers share it, prune takes it alone so it never sees a blob that a
    running create has written but not yet named in a manifest. flock locks belong to the open
    file, so this also works between threads of one process."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock
