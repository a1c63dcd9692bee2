"""Blob verification: a full hash once, then a record that lets later loads skip it.

A record holds (digest, size, mtime_ns, ctime_ns, inode) from the stat taken just before the
hash that matched. Any write to the file or replacement of it changes at least one of these, so
while they all match the bytes are the ones that were hashed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import IntegrityError
from . import fsutil


def _stat_key(st: os.stat_result) -> dict:
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
        "dev": st.st_dev,
    }


class Verifier:
    def __init__(self, blobs_dir: Path, records_dir: Path):
        self.blobs_dir = blobs_dir
        self.records_dir = records_dir

    def _record_path(self, digest: str) -> Path:
        return self.records_dir / digest.replace(":", "-")

    def _read_record(self, digest: str) -> dict | None:
        try:
            return json.loads(self._record_path(digest).read_bytes())
        except (OSError, ValueError):
            return None  # no record or a torn one: hash again

    def _write_record(self, digest: str, st: os.stat_result) -> None:
        data = json.dumps({"digest": digest, **_stat_key(st)}).encode()
        # Not fsynced, and failures ignored: a lost record only costs one more hash later.
        tmp = fsutil.temp_path(self.records_dir, ".tmp-record")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self._record_path(digest))
        except OSError:
            tmp.unlink(missing_ok=True)

    def forget(self, digest: str) -> None:
        self._record_path(digest).unlink(missing_ok=True)

    def check(self, digest: str, size: int, *, full: bool = False) -> None:
        """Raise IntegrityError unless blob ``digest`` exists with ``size`` bytes and hashes to
        ``digest``; the hash is skipped when a record matches and ``full`` is false."""
        path = self.blobs_dir / digest.replace(":", "-")
        try:
            st = path.stat()
        except FileNotFoundError:
            self.forget(digest)
            raise IntegrityError(f"blob {digest} is missing", digest=digest) from None
        if st.st_size != size:
            self.forget(digest)
            raise IntegrityError(f"blob {digest} has size {st.st_size}, expected {size}", digest=digest)
        if not full:
            record = self._read_record(digest)
            if record == {"digest": digest, **_stat_key(st)}:
                return
        # Looked up at call time so tests can count or replace the hash function.
        got, _ = fsutil.hash_file(path)
        if got != digest:
            self.forget(digest)
            raise IntegrityError(f"blob {digest} content does not match its digest (got {got})", digest=digest)
        self._write_record(digest, st)
