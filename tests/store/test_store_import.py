"""Create from K-quant GGUFs, safetensors directories (plain, --quantize) and embedding models."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlxserve.engine import convert
from mlxserve.errors import BadRequest
from mlxserve.store import Store
from mlxserve.store.ggufmeta import read_header


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return Store(tmp_path_factory.mktemp("import") / "models", converter=convert)


def test_header_reader_matches_gguf_package(kquant_gguf):
    import gguf

    path, _ = kquant_gguf
    header = read_header(path)
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert header.metadata == fields
    assert [(t.name, t.shape, t.ggml_type, t.offset) for t in header.tensors] == [
        (t.name, tuple(reversed(t.shape.tolist())), int(t.tensor_type), int(t.data_offset)) for t in reader.tensors
    ]


def test_kquant_gguf_is_dequantized_and_requantized(store, kquant_gguf):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path, types = kquant_gguf
    r = store.create("tiny-kq", f"FROM {path.name}", base_dir=path.parent)
    spec = r.spec
    assert spec.format == "safetensors" and spec.family == "llama"
    assert spec.quantization_level == "Q4_K_M->Q8"
    assert "Q4_K -> 4-bit group 32 (exact), 5 bits a weight" in spec.conversion
    assert "Q6_K -> 8-bit group 32 (re-quantized), 9 bits a weight" in spec.conversion
    assert spec.template is not None and "<|im_start|>" in spec.template
    root = store.model_path(r)
    assert sorted(p.name for p in root.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((root / "config.json").read_text())
    assert config["rope_traditional"] is True and config["tie_word_embeddings"] is False
    assert config["quantization"]["group_size"] == 32
    weights = mx.load(str(root / "model.safetensors"))
    names = {
        "token_embd.weight": "model.embed_tokens",
        "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj",
        "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj",
        "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj",
        "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj",
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj",
        "output.weight": "lm_head",
    }
    for t in GGUFReader(path).tensors:
        if t.name not in names:
            continue
        prefix = names[t.name]
        ref = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        bits = 4 if t.tensor_type.name == "Q4_K" else 8
        q = config["quantization"].get(prefix, config["quantization"])
        assert q["bits"] == bits, t.name
        got = mx.dequantize(
            weights[f"{prefix}.weight"],
            weights[f"{prefix}.scales"].astype(mx.float32),
            weights[f"{prefix}.biases"].astype(mx.float32),
            group_size=32,
            bits=bits,
        )
        got = np.array(got.astype(mx.float32))
        assert got.shape == ref.shape
        groups = ref.reshape(ref.shape[0], -1, 32)
        err = np.abs(got - ref).reshape(groups.shape).max(-1)
        if t.tensor_type.name == "Q6_K":
            # re-quantized (16-value sub-blocks): within about one 8-bit step of each group
            step = (groups.max(-1) - groups.min(-1)) / 255
            assert (err <= step * 1.1 + 1e-6).all(), t.name
        else:
            # code for code: only the float16 rounding of each group's scale and minimum
            assert (err <= 2e-3 * np.abs(groups).max(-1) + 1e-6).all(), t.name
    norm = np.array(weights["model.layers.0.input_layernorm.weight"])
    ref_norm = next(t for t in GGUFReader(path).tensors if t.name == "blk.0.attn_norm.weight")
    np.testing.assert_array_equal(norm, np.asarray(ref_norm.data))


def test_converted_model_loads_and_runs_in_mlx_lm(store, kquant_gguf):
    from mlx_lm.utils import load_model
    from tokenizers import Tokenizer

    path, _ = kquant_gguf
    r = store.create("tiny-kq", f"FROM {path.name}", base_dir=path.parent)
    root = store.model_path(r)
    model, _config = load_model(root)
    logits = model(mx.array([[3, 4, 5]]))
    assert logits.shape == (1, 3, 259) and bool(mx.isfinite(logits).all())
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    assert tok.decode(tok.encode("héllo <|im_end|>").ids, skip_special_tokens=False) == ("héllo <|im_end|>")
    tok_config = json.loads((root / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>" and "chat_template" in tok_config


def test_safetensors_directory(store, tiny_llama_dir):
    r = store.create("tiny", "FROM tiny-llama\n", base_dir=tiny_llama_dir.parent)
    spec = r.spec
    assert (spec.format, spec.family, spec.quantization_level) == ("safetensors", "llama", "F16")
    assert spec.capabilities == ["completion"] and spec.context_length == 256
    assert spec.template.startswith("{% for m in messages %}")
    by_title = {
        l["annotations"]["org.opencontainers.image.title"]: l["mediaType"] for l in r.layers if "annotations" in l
    }
    assert by_title == {
        "config.json": "application/vnd.mlxserve.config",
        "model.safetensors": "application/vnd.mlxserve.model.safetensors",
        "tokenizer.json": "application/vnd.mlxserve.tokenizer",
        "tokenizer_config.json": "application/vnd.mlxserve.tokenizer",
    }  # README.md is not part of the model
    root = store.model_path(r)
    assert (root / "model.safetensors").read_bytes() == (tiny_llama_dir / "model.safetensors").read_bytes()
    assert store.model_path(r) == root  # built once, reused


def test_quantize_at_create(store, tiny_llama_dir):
    from mlx_lm.utils import load_model

    plain = store.create("tiny", "FROM tiny-llama\n", base_dir=tiny_llama_dir.parent)
    r = store.create("tiny-q4", "FROM tiny-llama\n", base_dir=tiny_llama_dir.parent, quantize="q4")
    assert r.spec.quantization_level == "Q4" and r.spec.parameter_size == plain.spec.parameter_size
    shared = {l["digest"] for l in plain.layers} & {l["digest"] for l in r.layers}
    assert len(shared) >= 2  # tokenizer files are shared, weights and config are new
    root = store.model_path(r)
    config = json.loads((root / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    model, _ = load_model(root)
    assert model(mx.array([[1, 2]])).shape[-1] == 259
    with pytest.raises(BadRequest, match="q4 or q8"):
        store.create("x", "FROM tiny-llama", base_dir=tiny_llama_dir.parent, quantize="q3")


def test_embedding_directory(store, minilm_dir):
    r = store.create("all-minilm", f"FROM {minilm_dir}", base_dir=minilm_dir)
    assert r.spec.capabilities == ["embedding"] and r.spec.model_type == "bert"
    assert r.spec.reported_capabilities() == ["embedding"]  # no tools for an embedder
    assert r.spec.template is None and r.spec.parameter_size == "22.7M"
    root = store.model_path(r)
    for rel in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
    ):
        assert (root / rel).read_bytes() == (minilm_dir / rel).read_bytes(), rel
    assert not (root / "README.md").exists()
    with pytest.raises(BadRequest, match="quantize"):
        store.create("x", f"FROM {minilm_dir}", base_dir=minilm_dir, quantize="q8")


def test_adapter_is_refused_not_stored_and_ignored(store, tiny_llama_dir, tmp_path):
    # The engine does not apply LoRA adapters: a model that silently ran without its adapter
    # would answer as its base model.
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"rank": 4}))
    mx.save_safetensors(str(adapter / "adapters.safetensors"), {"a": mx.zeros((2, 2))})
    before = sorted(store.blobs_dir.iterdir())
    with pytest.raises(BadRequest, match="adapters are not supported"):
        store.create("tiny-lora", f"FROM {tiny_llama_dir}\nADAPTER ./lora\n", base_dir=tmp_path)
    assert sorted(store.blobs_dir.iterdir()) == before
    assert "tiny-lora:latest" not in {m.display for m in store.list()}


def test_directory_errors(store, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadRequest, match="config.json"):
        store.create("x", "FROM ./empty", base_dir=tmp_path)
    (empty / "config.json").write_text("{}")
    with pytest.raises(BadRequest, match="safetensors"):
        store.create("x", "FROM ./empty", base_dir=tmp_path)


def test_store_without_converter_refuses_what_needs_the_engine(tmp_path, kquant_gguf, tiny_llama_dir):
    """The store imports no MLX: a create that converts or checks a model type needs the
    engine's conversions injected, and without them says so instead of importing them."""
    from mlxserve.errors import EngineError

    bare = Store(tmp_path / "models")
    path, _ = kquant_gguf
    for source, base in ((path.name, path.parent), ("tiny-llama", tiny_llama_dir.parent)):
        with pytest.raises(EngineError, match="converter"):
            bare.create("x", f"FROM {source}", base_dir=base)
    assert bare.list() == [] and list(bare.tmp_dir.iterdir()) == []
