"""Manifests that did not come from create: Ollama's format, hostile titles, broken GGUFs."""

import hashlib
import json

import pytest

from mlxserve.engine import convert
from mlxserve.errors import BadRequest, IntegrityError
from mlxserve.store import Store, manifest as mt


def put(store: Store, data: bytes) -> dict:
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    store.ingest_blob(d, [data])
    return {"digest": d, "size": len(data)}


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "models", default_registry="127.0.0.1:5000", converter=convert)


def test_ollama_manifest_is_read(store):
    config = put(
        store,
        json.dumps(
            {"model_format": "gguf", "model_family": "llama", "model_type": "135M", "file_type": "Q4_1"}
        ).encode(),
    )
    layers = [
        {"mediaType": mt.OLLAMA_MODEL, **put(store, b"GGUF fake weights")},
        {"mediaType": mt.OLLAMA_TEMPLATE, **put(store, b"{{ .Prompt }}")},
        {"mediaType": mt.OLLAMA_SYSTEM, **put(store, b"be nice")},
        {
            "mediaType": mt.OLLAMA_PARAMS,
            **put(store, json.dumps({"stop": ["<|im_end|>"], "temperature": 0.3}).encode()),
        },
        {"mediaType": mt.OLLAMA_LICENSE, **put(store, b"MIT")},
    ]
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": mt.OLLAMA_CONFIG_MEDIA_TYPE, **config},
            "layers": layers,
        }
    ).encode()
    store.write_manifest("smollm2:135m", manifest)
    r = store.resolve("127.0.0.1:5000/library/smollm2:135m")
    assert r.display == "smollm2:135m"
    spec = r.spec
    assert (spec.format, spec.family, spec.parameter_size, spec.quantization_level) == ("gguf", "llama", "135M", "Q4_1")
    assert spec.template == "{{ .Prompt }}"  # kept: the GGUF's own template goes first at render
    assert spec.system == "be nice" and spec.license == "MIT"
    assert spec.parameters.stop == ["<|im_end|>"] and spec.parameters.temperature == 0.3
    assert store.model_path(r) == store.blob_path(layers[0]["digest"])
    store.verify_for_load(r)
    assert store.prune() == 0


def test_write_manifest_needs_every_blob(store):
    config = put(store, b"{}")
    missing = {"mediaType": mt.GGUF, "digest": "sha256:" + "ab" * 32, "size": 3}
    data = mt.build_manifest({"mediaType": mt.SPEC_MEDIA_TYPE, **config}, [missing])
    with pytest.raises(IntegrityError, match="is missing"):
        store.write_manifest("x", data)
    with pytest.raises(IntegrityError, match="schema 2"):
        store.write_manifest("x", b'{"layers": []}')


@pytest.mark.parametrize("title", ["../../evil", "/etc/passwd", "a/../../b", "", None])
def test_hostile_layer_titles_never_leave_the_links_dir(store, title):
    from mlxserve.specs.modelspec import ModelSpec

    config = put(store, ModelSpec(format="safetensors").to_json())
    layer = {"mediaType": mt.SAFETENSORS, **put(store, b"weights")}
    if title is not None:
        layer["annotations"] = {mt.TITLE: title}
    store.write_manifest("evil", mt.build_manifest({"mediaType": mt.SPEC_MEDIA_TYPE, **config}, [layer]))
    with pytest.raises(IntegrityError, match="not a safe file name"):
        store.model_path(store.resolve("evil"))
    assert [p.name for p in store.links_dir.iterdir()] == []


def test_corrupt_config_blob_and_unreadable_manifest(store, tmp_path):
    from mlxserve.specs.modelspec import ModelSpec

    config = put(store, ModelSpec(format="gguf").to_json())
    weights = {"mediaType": mt.GGUF, **put(store, b"GGUF")}
    store.write_manifest("m", mt.build_manifest({"mediaType": mt.SPEC_MEDIA_TYPE, **config}, [weights]))
    path = store.blob_path(config["digest"])
    path.write_bytes(path.read_bytes().replace(b"gguf", b"GGUF"))
    with pytest.raises(IntegrityError, match="does not match its digest"):
        store.resolve("m")
    assert store.list() == []  # skipped, with a warning
    # A manifest nobody can read stops prune: it cannot know what that manifest references.
    store.manifest_path(store.parse("m")).write_bytes(b"garbage")
    orphan = put(store, b"orphan")
    (store.uploads_dir / store.blob_path(orphan["digest"]).name).unlink()
    assert store.prune() == 0 and store.has_blob(orphan["digest"])


def test_truncated_gguf_is_a_bad_request(store, tmp_path, kquant_gguf):
    path, _ = kquant_gguf
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(BadRequest, match="cannot read GGUF file bad.gguf"):
        store.create("x", "FROM bad.gguf", base_dir=tmp_path)
