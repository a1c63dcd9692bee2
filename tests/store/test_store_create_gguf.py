"""Create from the SmolLM2 GGUF, derive models from it, list/show/copy/delete/prune."""

import hashlib
import json
from datetime import UTC

import pytest

from mlxserve.errors import BadRequest, InvalidName, ModelNotFound
from mlxserve.specs.modelfile import parse_modelfile, render_modelfile
from mlxserve.specs.templates import render_chat
from mlxserve.store import manifest as mt


def blob_names(store) -> set[str]:
    return {p.name.replace("-", ":", 1) for p in store.blobs_dir.iterdir()}


def referenced(store) -> set[str]:
    out: set[str] = set()
    for m in store.list():
        out |= mt.referenced_digests(m.manifest)
    return out


def test_gguf_model_is_one_layer_plus_small_ones(smol_store, smollm2_gguf):
    r = smol_store.resolve("smollm2:135m")
    assert r.display == "smollm2:135m"
    assert r.manifest["schemaVersion"] == 2
    assert r.manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert r.manifest["config"]["mediaType"] == "application/vnd.mlxserve.config.v1+json"
    kinds = [l["mediaType"] for l in r.layers]
    assert kinds == [
        "application/vnd.mlxserve.model.gguf",
        "application/vnd.mlxserve.template",
        "application/vnd.mlxserve.params",
    ]
    assert r.layers[0]["size"] == smollm2_gguf.stat().st_size
    assert r.size == sum(l["size"] for l in r.layers)
    assert r.modified_at.tzinfo is UTC
    path = smol_store.manifest_path(r.name)
    assert path == smol_store.root / "manifests/registry.ollama.ai/library/smollm2/135m"
    assert r.digest == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_gguf_spec_comes_from_metadata(smol_store):
    spec = smol_store.resolve("smollm2:135m").spec
    assert (spec.format, spec.family, spec.parameter_size, spec.quantization_level) == ("gguf", "llama", "135M", "Q4_1")
    assert spec.context_length == 8192 and spec.capabilities == ["completion"]
    assert spec.parameters.temperature == 0.2
    assert spec.model_info["general.architecture"] == "llama"
    assert spec.model_info["llama.block_count"] == 30
    prompt = render_chat(spec.template, [{"role": "user", "content": "Hi"}])
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_model_path_is_the_gguf_blob(smol_store):
    r = smol_store.resolve("smollm2:135m")
    path = smol_store.model_path(r)
    assert path == smol_store.blob_path(r.layers[0]["digest"])
    assert path.read_bytes()[:4] == b"GGUF"
    assert smol_store.adapter_path(r) is None


def test_create_from_name_shares_weights_and_overrides(smol_store, tmp_path):
    events = []
    r = smol_store.create(
        "me/smol-pirate",
        "FROM smollm2:135m\nPARAMETER top_k 20\nSYSTEM You are a pirate.\n",
        base_dir=tmp_path,
        progress=events.append,
    )
    base = smol_store.resolve("smollm2:135m")
    assert r.layers[0]["digest"] == base.layers[0]["digest"]
    statuses = [e["status"] for e in events]
    assert statuses[0] == "parsing modelfile" and statuses[-2:] == ["writing manifest", "success"]
    assert f"using existing layer {base.layers[0]['digest']}" in statuses
    assert any(s.startswith("creating new layer sha256:") for s in statuses)
    # Parameters merge: the base's temperature stays, top_k is added.
    assert r.spec.parameters.temperature == 0.2 and r.spec.parameters.top_k == 20
    assert r.spec.system == "You are a pirate." and r.spec.parent_model == "smollm2:135m"
    assert r.spec.template == base.spec.template
    smol_store.delete("me/smol-pirate")


def test_show_modelfile_recreates_the_model(smol_store, tmp_path):
    r = smol_store.resolve("smollm2:135m")
    text = render_modelfile(r.name, r.spec)
    assert parse_modelfile(text).from_ == "smollm2:135m"
    again = smol_store.create("smol-again", text, base_dir=tmp_path)
    assert again.spec.parameters == r.spec.parameters and again.spec.template == r.spec.template
    assert again.layers[0] == r.layers[0]
    smol_store.delete("smol-again")


def test_delete_and_prune_keep_shared_blobs(smol_store, tmp_path):
    smol_store.create("derived", "FROM smollm2:135m\nSYSTEM x\n", base_dir=tmp_path)
    smol_store.create("derived2", "FROM derived\nPARAMETER num_ctx 1024\n", base_dir=tmp_path)
    gguf = smol_store.resolve("smollm2:135m").layers[0]["digest"]
    smol_store.delete("derived")
    assert smol_store.has_blob(gguf)
    r = smol_store.resolve("derived2")
    smol_store.verify_for_load(r)
    assert r.spec.system == "x" and r.spec.parameters.num_ctx == 1024
    assert blob_names(smol_store) == referenced(smol_store)
    smol_store.delete("derived2")
    assert blob_names(smol_store) == referenced(smol_store)
    with pytest.raises(ModelNotFound, match="model 'derived2' not found"):
        smol_store.resolve("derived2")
    with pytest.raises(ModelNotFound):
        smol_store.delete("derived2")
    # Empty manifest directories go too.
    assert not (smol_store.manifests_dir / "registry.ollama.ai/library/derived2").exists()


def test_copy_and_list(smol_store):
    smol_store.copy("smollm2:135m", "localhost:5000/team/smol:v1")
    names = [m.display for m in smol_store.list()]
    assert "localhost:5000/team/smol:v1" in names and "smollm2:135m" in names
    a, b = smol_store.resolve("smollm2:135m"), smol_store.resolve("localhost:5000/team/smol:v1")
    assert a.digest == b.digest
    listed = smol_store.list()
    assert [m.modified_at for m in listed] == sorted((m.modified_at for m in listed), reverse=True)
    with pytest.raises(ModelNotFound):
        smol_store.copy("nope", "x")
    smol_store.delete("localhost:5000/team/smol:v1")
    assert smol_store.has_blob(a.layers[0]["digest"])


def test_recreating_a_name_replaces_it_and_prunes_old_blobs(smol_store, tmp_path):
    smol_store.create("swap", "FROM smollm2:135m\nSYSTEM first\n", base_dir=tmp_path)
    smol_store.create("swap", "FROM smollm2:135m\nSYSTEM second\n", base_dir=tmp_path)
    assert smol_store.resolve("swap").spec.system == "second"
    assert blob_names(smol_store) == referenced(smol_store)
    smol_store.delete("swap")


def test_create_errors(smol_store, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InvalidName):
        smol_store.create("../evil", "FROM smollm2:135m", base_dir=tmp_path)
    with pytest.raises(ModelNotFound):
        smol_store.create("x", "FROM no-such-model", base_dir=tmp_path)
    with pytest.raises(BadRequest, match="no such file"):
        smol_store.create("x", "FROM ./missing.gguf", base_dir=tmp_path)
    with pytest.raises(BadRequest, match="not a GGUF file"):
        smol_store.create("x", "FROM notes.txt", base_dir=tmp_path)
    with pytest.raises(BadRequest, match="Go template uses .* does not translate"):
        smol_store.create("x", 'FROM smollm2:135m\nTEMPLATE {{ template "x" }}', base_dir=tmp_path)
    with pytest.raises(BadRequest, match="quantize"):
        smol_store.create("x", "FROM smollm2:135m", base_dir=tmp_path, quantize="q4")
    with pytest.raises(ModelNotFound):
        smol_store.resolve("x")
    assert list(smol_store.tmp_dir.iterdir()) == []


def test_from_path_expands_home(smol_store, smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(smollm2_gguf.parent))
    r = smol_store.create("home", f"FROM ~/{smollm2_gguf.name}", base_dir=tmp_path)
    assert r.layers[0] == smol_store.resolve("smollm2:135m").layers[0]
    smol_store.delete("home")


def test_manifest_on_disk_is_plain_oci_json(smol_store):
    r = smol_store.resolve("smollm2:135m")
    doc = json.loads(smol_store.manifest_path(r.name).read_bytes())
    assert set(doc) == {"schemaVersion", "mediaType", "config", "layers"}
    for d in [doc["config"], *doc["layers"]]:
        assert smol_store.blob_path(d["digest"]).stat().st_size == d["size"]
