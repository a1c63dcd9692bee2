"""Offline transfer (OCI image layout tar) and the /api/blobs upload routes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import pytest
import trio
from regfixtures import start_daemon

from mlxserve.errors import BadRequest, DigestMismatch, ModelNotFound
from mlxserve.store import fsutil, transfer
from mlxserve.store.store import Store


def test_pack_unpack_round_trip_into_a_second_store(models_dir, tmp_path):
    src = Store(models_dir)
    out = tmp_path / "tiny.tar"
    info = transfer.pack(src, "tiny", out)
    original = src.resolve("tiny")
    assert info["digest"] == original.digest
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        assert json.loads(tar.extractfile("oci-layout").read()) == {"imageLayoutVersion": "1.0.0"}
        index = json.loads(tar.extractfile("index.json").read())
    (entry,) = index["manifests"]
    assert entry["digest"] == original.digest
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "registry.ollama.ai/library/tiny:latest"
    for d in [original.manifest["config"], *original.layers]:
        assert f"blobs/sha256/{d['digest'][7:]}" in names

    dst = Store(tmp_path / "other")
    assert transfer.unpack(dst, out) == "tiny:latest"
    assert transfer.unpack(dst, out, "copy/tiny:v2") == "copy/tiny:v2"
    for name in ("tiny", "copy/tiny:v2"):
        got = dst.resolve(name)
        assert got.digest == original.digest and got.manifest == original.manifest
    dst.verify_for_load(dst.resolve("tiny"))
    with pytest.raises(ModelNotFound):
        transfer.pack(src, "absent", tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()


def test_unpack_refuses_a_tampered_archive(models_dir, tmp_path):
    src = Store(models_dir)
    good = tmp_path / "good.tar"
    transfer.pack(src, "tiny", good)
    gguf = next(l for l in src.resolve("tiny").layers if l["size"] > 4096)
    member = f"blobs/sha256/{gguf['digest'][7:]}"
    bad = tmp_path / "bad.tar"
    with tarfile.open(good) as tin, tarfile.open(bad, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read() if m.isfile() else None
            if m.name == member:
                data = data[:-1] + bytes([data[-1] ^ 1])
            tout.addfile(m, io.BytesIO(data) if data is not None else None)
    dst = Store(tmp_path / "other")
    with pytest.raises(DigestMismatch):
        transfer.unpack(dst, bad)
    assert not dst.has_blob(gguf["digest"])
    with pytest.raises(ModelNotFound):
        dst.resolve("tiny")
    (tmp_path / "junk.tar").write_bytes(b"not a tar")
    with pytest.raises(BadRequest):
        transfer.unpack(dst, tmp_path / "junk.tar")


def test_cli_pack_unpack(models_dir, tmp_path):
    mlxctl = str(Path(sys.executable).with_name("mlxctl"))
    out = tmp_path / "t.tar"
    env = {**os.environ, "MLXSERVE_MODELS": str(models_dir)}
    r = subprocess.run([mlxctl, "pack", "tiny", "-o", str(out)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "packed" in r.stdout, r.stderr
    env["MLXSERVE_MODELS"] = str(tmp_path / "second")
    r = subprocess.run([mlxctl, "unpack", str(out), "moved"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "imported moved:latest" in r.stdout, r.stderr
    assert Store(tmp_path / "second").resolve("moved").digest == Store(models_dir).resolve("tiny").digest


async def test_blob_routes(models_dir):
    data = os.urandom(300_000)
    digest = fsutil.sha256_bytes(data)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            d = await start_daemon(nursery, models_dir)
            async with httpx.AsyncClient(base_url=d.url, timeout=30) as c:
                assert (await c.head(f"/api/blobs/{digest}")).status_code == 404
                assert (await c.head("/api/blobs/sha256:xyz")).status_code == 400
                r = await c.post(f"/api/blobs/{digest}", content=data[:-1] + bytes([data[-1] ^ 1]))
                assert r.status_code == 400 and "mismatch" in r.json()["error"]
                assert (await c.head(f"/api/blobs/{digest}")).status_code == 404

                async def chunks():
                    for i in range(0, len(data), 65536):
                        yield data[i : i + 65536]

                r = await c.post(f"/api/blobs/{digest}", content=chunks())
                assert r.status_code == 201, r.text
                assert (await c.head(f"/api/blobs/{digest}")).status_code == 200
                assert (await c.post(f"/api/blobs/{digest}", content=data)).status_code == 200
                assert d.runtime.store.store.blob_path(digest).read_bytes() == data
            d.shutdown.set()
