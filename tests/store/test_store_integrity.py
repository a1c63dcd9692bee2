"""Verification before load: corrupt, truncated and missing blobs; records that skip re-hashing."""

import os

import pytest

from mlxserve.engine import convert
from mlxserve.errors import IntegrityError
from mlxserve.store import Store, fsutil


@pytest.fixture
def store(tmp_path, tiny_llama_dir):
    s = Store(tmp_path / "models", converter=convert)
    s.create("tiny", "FROM tiny-llama\nSYSTEM hi\n", base_dir=tiny_llama_dir.parent)
    return s


@pytest.fixture
def hash_calls(monkeypatch):
    calls = []
    real = fsutil.hash_file

    def counting(path):
        calls.append(path.name)
        return real(path)

    monkeypatch.setattr(fsutil, "hash_file", counting)
    return calls


def weights_layer(resolved) -> dict:
    return next(l for l in resolved.layers if l["mediaType"].endswith("model.safetensors"))


def flip_byte(path, offset=1000):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_intact_model_verifies(store):
    store.verify_for_load(store.resolve("tiny"))


def test_flipped_byte_is_refused(store):
    r = store.resolve("tiny")
    layer = weights_layer(r)
    flip_byte(store.blob_path(layer["digest"]))
    with pytest.raises(IntegrityError) as info:
        store.verify_for_load(r)
    msg = str(info.value)
    assert msg.startswith(f"blob {layer['digest']} content does not match its digest (got sha256:")
    assert "tiny:latest" in msg
    assert info.value.status == 409


def test_truncated_blob_is_refused(store):
    r = store.resolve("tiny")
    layer = weights_layer(r)
    path = store.blob_path(layer["digest"])
    os.truncate(path, layer["size"] - 10)
    with pytest.raises(
        IntegrityError, match=f"blob {layer['digest']} has size {layer['size'] - 10}, expected {layer['size']}"
    ):
        store.verify_for_load(r)


def test_missing_blob_is_refused(store):
    r = store.resolve("tiny")
    layer = r.layers[-1]
    store.blob_path(layer["digest"]).unlink()
    with pytest.raises(IntegrityError, match=f"blob {layer['digest']} is missing"):
        store.verify_for_load(r)


def test_record_skips_the_second_hash(store, hash_calls):
    r = store.resolve("tiny")
    store.verify_for_load(r)
    assert len(hash_calls) == len(r.layers) + 1  # every layer and the config blob
    hash_calls.clear()
    store.verify_for_load(r)
    assert hash_calls == []


def test_a_changed_file_is_hashed_again(store, hash_calls):
    r = store.resolve("tiny")
    store.verify_for_load(r)
    layer = weights_layer(r)
    path = store.blob_path(layer["digest"])
    st = path.stat()
    flip_byte(path)
    # Make "later" explicit: a write in the same clock tick as the record could keep mtime.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    hash_calls.clear()
    with pytest.raises(IntegrityError, match="does not match"):
        store.verify_for_load(r)
    assert hash_calls == [path.name]


def test_replaced_file_with_same_bytes_is_rehashed_and_passes(store, hash_calls):
    r = store.resolve("tiny")
    store.verify_for_load(r)
    path = store.blob_path(weights_layer(r)["digest"])
    copy = path.with_name("copy")
    copy.write_bytes(path.read_bytes())
    os.replace(copy, path)  # a new inode
    hash_calls.clear()
    store.verify_for_load(r)
    assert hash_calls == [path.name]


def test_full_verify_rehashes_and_reports(store, hash_calls):
    r = store.resolve("tiny")
    store.verify_for_load(r)
    hash_calls.clear()
    rows = store.verify()
    assert len(hash_calls) == len(r.layers) + 1
    assert all(row["ok"] and row["model"] == "tiny:latest" for row in rows)
    bad = weights_layer(r)["digest"]
    flip_byte(store.blob_path(bad))
    rows = store.verify("tiny")
    problems = {row["digest"]: row["problem"] for row in rows if not row["ok"]}
    assert list(problems) == [bad] and "does not match" in problems[bad]
