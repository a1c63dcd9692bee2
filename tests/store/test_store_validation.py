"""Create refuses what the engine could not run or read (unsupported architectures, GGUF and
safetensors files whose headers lie, FIFOs) with a 400 and leaves the store as it was."""

from __future__ import annotations

import os
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from model_files import write_unsupported_gguf

from mlxserve.engine import convert
from mlxserve.errors import BadRequest
from mlxserve.store import Store
from mlxserve.store.ggufmeta import GGUF_ARCHITECTURES


def patch_tensor(data: bytes, name: str, part: str, value: int) -> bytes:
    """``data`` with one field of tensor ``name``'s header entry replaced: its first dimension,
    its type or its data offset."""
    raw = name.encode()
    at = data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)
    (ndim,) = struct.unpack_from("<I", data, at)
    pos, fmt = {"dim0": (at + 4, "<Q"), "type": (at + 4 + 8 * ndim, "<I"), "offset": (at + 8 + 8 * ndim, "<Q")}[part]
    out = bytearray(data)
    struct.pack_into(fmt, out, pos, value)
    return bytes(out)


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "models", converter=convert)


def snapshot(store: Store) -> tuple:
    """Everything a create may write: blobs, manifests, temp files."""

    def names(d: Path) -> list[str]:
        return sorted(str(p.relative_to(d)) for p in d.rglob("*"))

    return names(store.blobs_dir), names(store.manifests_dir), names(store.tmp_dir)


def refused(store: Store, modelfile: str, base: Path, match: str) -> str:
    before = snapshot(store)
    with pytest.raises(BadRequest, match=match) as info:
        store.create("x", modelfile, base_dir=base)
    assert snapshot(store) == before
    return str(info.value)


def test_gguf_architectures_match_the_engine():
    from mlxserve.engine.gguf import SUPPORTED_ARCHITECTURES

    assert GGUF_ARCHITECTURES == SUPPORTED_ARCHITECTURES


def test_unsupported_gguf_architecture_is_refused(store, tmp_path):
    write_unsupported_gguf(tmp_path / "qwen.gguf")
    message = refused(store, "FROM qwen.gguf", tmp_path, "unsupported model architecture")
    assert "'falcon'" in message and "llama" in message


@pytest.mark.parametrize(
    "arch,missing",
    [
        ("gemma2", "blk.1.post_ffw_norm.weight"),
        ("qwen3", "blk.0.attn_k_norm.weight"),
        ("qwen3moe", "blk.1.ffn_up_exps.weight"),
        ("phi3", "blk.0.ffn_up.weight"),
        ("gpt-oss", "blk.0.attn_sinks.weight"),
    ],
)
def test_gguf_missing_an_architecture_tensor_is_refused(store, tmp_path, arch, missing):
    from mlxserve.testing import ggufmodels

    ggufmodels.write(tmp_path / "m.gguf", arch, "Q8_0", drop=(missing,))
    message = refused(store, "FROM m.gguf", tmp_path, "are missing")
    assert missing in message


def test_gguf_missing_what_the_loader_needs_is_refused(store, tmp_path, kquant_gguf):
    import gguf

    path, _ = kquant_gguf
    data = path.read_bytes()
    # Renaming a block tensor (same length, so the file stays consistent) drops it.
    (tmp_path / "renamed.gguf").write_bytes(data.replace(b"blk.0.ffn_up.weight", b"blk.0.ffn_xx.weight"))
    refused(store, "FROM renamed.gguf", tmp_path, "blk.0.ffn_up.weight .*missing")
    w = gguf.GGUFWriter(str(tmp_path / "nokeys.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((3, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    refused(store, "FROM nokeys.gguf", tmp_path, "llama.embedding_length is missing")


@pytest.mark.parametrize(
    "part,value,match",
    [
        ("offset", 10**9, "past the end of the file"),
        ("offset", 3, "unaligned"),
        ("dim0", 2**40, "past the end of the file"),
        ("dim0", 100, "type cannot hold"),
        ("type", 999, "unknown type 999"),
    ],
)
def test_gguf_whose_tensor_table_lies_is_refused(store, tmp_path, kquant_gguf, part, value, match):
    path, _ = kquant_gguf
    (tmp_path / "bad.gguf").write_bytes(patch_tensor(path.read_bytes(), "output.weight", part, value))
    refused(store, "FROM bad.gguf", tmp_path, match)


def test_gguf_tensors_that_overlap_are_refused(store, tmp_path, kquant_gguf):
    from mlxserve.store.ggufmeta import read_header

    path, _ = kquant_gguf
    data = path.read_bytes()
    header = read_header(path)
    first = min(header.tensors, key=lambda t: t.offset)
    (tmp_path / "bad.gguf").write_bytes(
        patch_tensor(data, "output.weight", "offset", first.offset - header.data_offset)
    )
    refused(store, "FROM bad.gguf", tmp_path, "overlaps")


@pytest.mark.parametrize("keep", [0.999, 0.5])
def test_truncated_gguf_is_refused(store, tmp_path, tiny_gguf, kquant_gguf, keep):
    # The F32 tiny model is stored as it is; the K-quant one would be converted.
    for src in (tiny_gguf, kquant_gguf[0]):
        data = src.read_bytes()
        (tmp_path / "cut.gguf").write_bytes(data[: int(len(data) * keep)])
        refused(store, "FROM cut.gguf", tmp_path, "past the end of the file|truncated")


def test_gguf_with_arrays_nested_without_end_is_refused(store, tmp_path):
    # general.x = array of arrays of arrays ... : the reader must not recurse until it crashes.
    kv = struct.pack("<Q", 9) + b"general.x" + struct.pack("<I", 9)
    kv += (struct.pack("<I", 9) + struct.pack("<Q", 1)) * 5000
    (tmp_path / "deep.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv)
    refused(store, "FROM deep.gguf", tmp_path, "nested too deeply")


SAFETENSORS_DAMAGE = {
    "short": (lambda data: b"abc", "only 3 bytes"),
    "huge header length": (lambda data: struct.pack("<Q", 2**62) + b"{}", "header length"),
    "header not JSON": (lambda data: struct.pack("<Q", 4) + b"zzzz", "not JSON"),
    "header a list": (lambda data: struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    "entry not an object": (lambda data: struct.pack("<Q", 8) + b'{"a": 5}', "not described"),
    "truncated": (lambda data: data[:-100], "damaged or truncated"),
    "size mismatch": (
        lambda data: (
            struct.pack("<Q", 64) + (b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}'.ljust(64)) + bytes(8)
        ),
        "needs 16 bytes",
    ),
}


@pytest.mark.parametrize("damage", list(SAFETENSORS_DAMAGE))
def test_damaged_safetensors_directory_is_refused(store, tmp_path, tiny_llama_dir, damage):
    mutate, match = SAFETENSORS_DAMAGE[damage]
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(mutate(weights.read_bytes()))
    refused(store, "FROM ./model", tmp_path, match)


def test_unsupported_directory_model_types_are_refused(store, tmp_path, tiny_llama_dir):
    import json

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "no_such_model"}))
    refused(store, "FROM ./model", tmp_path, "unsupported model type 'no_such_model'")
    # mlx-lm's own renames are runnable (mistral is built as llama).
    (model / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    assert store.create("m", "FROM ./model", base_dir=tmp_path).spec.model_type == "mistral"
    (model / "modules.json").write_text("[]")  # a sentence-transformers layout: an embedder
    refused(store, "FROM ./model", tmp_path, "unsupported embedding model type 'mistral'")


def test_from_a_fifo_is_refused_without_opening_it(store, tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    errors: list[BaseException] = []

    def create():
        try:
            store.create("x", f"FROM {fifo}", base_dir=tmp_path)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=create, daemon=True)
    t.start()
    t.join(timeout=60)
    if t.is_alive():  # unblock the open so the thread can end, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("create blocked opening a FIFO")
    assert len(errors) == 1 and isinstance(errors[0], BadRequest)
    assert "not a regular file" in str(errors[0])
    assert snapshot(store) == ([], [], [])
    refused(store, "FROM /dev/null", tmp_path, "not a regular file")  # a device, likewise


def test_a_failure_after_blobs_were_written_removes_them(store, tmp_path, tiny_llama_dir, monkeypatch):
    old = store.create("keep", f"FROM {tiny_llama_dir}\nSYSTEM old\n", base_dir=tmp_path)
    before = snapshot(store)

    def disk_full(*_args):  # fault injection: the manifest write fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "_write_manifest", disk_full)
    with pytest.raises(OSError, match="No space"):
        # New layers: a new system prompt, and another copy of the weights (a new digest).
        other = tmp_path / "other"
        shutil.copytree(tiny_llama_dir, other)
        (other / "config.json").write_text((other / "config.json").read_text() + " ")
        store.create("x", "FROM ./other\nSYSTEM new\n", base_dir=tmp_path)
    assert snapshot(store) == before
    assert store.resolve("keep").digest == old.digest
