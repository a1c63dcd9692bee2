"""Uploaded blobs (POST /api/blobs/:digest) and creating a model from one."""

import hashlib
import os

import pytest

from mlxserve.engine import convert
from mlxserve.errors import BadRequest, DigestMismatch
from mlxserve.specs.modelfile import Modelfile
from mlxserve.store import Store

NO_FROM = Modelfile(from_="")  # as /api/create builds it when ``files`` stands for FROM


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "models", converter=convert)


def test_ingest_streams_and_keeps_matching_bytes(store):
    data = os.urandom(3 << 20)
    d = digest_of(data)
    assert not store.has_blob(d)
    store.ingest_blob(d, (data[i : i + 65536] for i in range(0, len(data), 65536)))
    assert store.has_blob(d) and store.blob_path(d).read_bytes() == data
    assert list(store.tmp_dir.iterdir()) == []


def test_mismatch_keeps_nothing(store):
    claimed = digest_of(b"something else")
    with pytest.raises(DigestMismatch) as info:
        store.ingest_blob(claimed, [b"actual ", b"bytes"])
    assert str(info.value) == (f"digest mismatch: expected {claimed}, got {digest_of(b'actual bytes')}")
    assert info.value.status == 400
    assert not store.has_blob(claimed) and not store.has_blob(digest_of(b"actual bytes"))
    assert list(store.tmp_dir.iterdir()) == [] and list(store.blobs_dir.iterdir()) == []


def test_failed_stream_keeps_nothing(store):
    def chunks():
        yield b"partial"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        store.ingest_blob(digest_of(b"partial"), chunks())
    assert list(store.tmp_dir.iterdir()) == [] and list(store.blobs_dir.iterdir()) == []


@pytest.mark.parametrize(
    "bad", ["sha256:abc", "md5:" + "0" * 32, "sha256-" + "0" * 64, "sha256:" + "G" * 64, "../../etc/passwd"]
)
def test_bad_digest_syntax(store, bad):
    with pytest.raises(BadRequest, match="invalid digest"):
        store.ingest_blob(bad, [b"x"])
    with pytest.raises(BadRequest):
        store.has_blob(bad)


def test_uploaded_blobs_survive_prune_until_used(store, kquant_gguf, tmp_path):
    path, _ = kquant_gguf
    data = path.read_bytes()
    d = digest_of(data)
    store.ingest_blob(d, [data])
    assert store.prune() == 0 and store.has_blob(d)  # grace period for a create to follow
    r = store.create("from-upload", f"FROM @{d}", base_dir=tmp_path)
    assert r.spec.family == "llama"
    store.delete("from-upload")
    assert store.has_blob(d)  # still inside its grace period...
    marker = store.uploads_dir / store.blob_path(d).name
    os.utime(marker, (0, 0))
    store.prune()
    assert not store.has_blob(d) and not marker.exists()  # ...and gone after it


def test_from_unknown_blob(store, tmp_path):
    with pytest.raises(BadRequest, match="no such blob"):
        store.create("x", "FROM @sha256:" + "0" * 64, base_dir=tmp_path)


def test_prune_keeps_partial_downloads(store):
    part = store.partial_dir / ("sha256-" + "1" * 64 + ".part")
    part.write_bytes(b"half")
    store.prune()
    assert part.read_bytes() == b"half"


def upload(store: Store, path) -> str:
    data = path.read_bytes()
    store.ingest_blob(digest_of(data), [data])
    return digest_of(data)


def test_create_from_uploaded_files(store, kquant_gguf, tiny_llama_dir, tmp_path):
    """``files`` of an API create: {file name: digest of an uploaded blob}."""
    gguf = upload(store, kquant_gguf[0])
    r = store.create("one-gguf", NO_FROM, base_dir=tmp_path, files={"model.gguf": gguf})
    assert r.spec.family == "llama"
    directory = {f.name: upload(store, f) for f in tiny_llama_dir.iterdir() if f.is_file()}
    r = store.create("a-dir", NO_FROM, base_dir=tmp_path, files=directory)
    assert r.spec.format == "safetensors" and r.spec.template is not None
    # The uploads are the model's blobs (README.md is not part of a model).
    assert {d for n, d in directory.items() if n != "README.md"} <= {l["digest"] for l in r.layers}
    before = sorted(store.blobs_dir.iterdir())
    for files, match in [
        ({}, "files must be an object"),
        ({"../x.gguf": gguf}, "not a plain relative file name"),
        ({"m.gguf": "sha256:" + "0" * 64}, "not found .*upload it first"),
        ({"m.gguf": 5}, "must be a string"),
        ({"m.gguf": gguf, "config.json": directory["config.json"]}, "a single file"),
    ]:
        with pytest.raises(BadRequest, match=match):
            store.create("x", NO_FROM, base_dir=tmp_path, files=files)
    with pytest.raises(BadRequest, match="either from or files"):
        store.create("x", Modelfile(from_="one-gguf"), base_dir=tmp_path, files={"m.gguf": gguf})
    assert sorted(store.blobs_dir.iterdir()) == before
