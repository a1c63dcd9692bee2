"""Turn what users have (a GGUF file, a model directory) into layers plus a ModelSpec.

Nothing here writes into the store: each importer returns ``LayerSource`` items (a file to copy
or bytes) and the spec fields it learned; ``Store.create`` writes the blobs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import attrs

from ..errors import BadRequest
from ..specs.modelspec import ModelSpec
from ..specs.visiontypes import served_vision_type
from . import convert, manifest as mt, safetensorsmeta
from .ggufmeta import GGUF_ARCHITECTURES, GGUFHeader, read_header

EMBEDDING_TYPES = frozenset(
    {"bert", "nomic_bert", "nomic-bert", "xlm-roberta", "roberta", "distilbert", "mpnet", "jina-bert-v2"}
)
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
    }
)
_TOKENIZER_SUFFIXES = (".jinja", ".tiktoken")


@attrs.frozen
class LayerSource:
    """A layer to write: a file to copy, or a blob already in the store (digest and size)."""

    media_type: str
    path: Path | None = None
    title: str | None = None
    digest: str | None = None
    size: int | None = None


@attrs.define
class Imported:
    layers: list[LayerSource]
    spec: ModelSpec
    vocab: list[str] = attrs.field(factory=list)  # for choosing a default chat template


def human_count(n: int) -> str:
    """Parameter count as Ollama shows it: 135.0M, 8.0B."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


# ---------------------------------------------------------------- GGUF


def _file_type_name(header: GGUFHeader) -> str:
    from gguf.constants import GGMLQuantizationType, LlamaFileType

    ft = header.metadata.get("general.file_type")
    try:
        name = LlamaFileType(int(ft)).name if ft is not None else ""
    except ValueError:
        name = ""
    if name:
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    counts: dict[int, int] = {}
    for t in header.tensors:
        if len(t.shape) >= 2:
            counts[t.ggml_type] = counts.get(t.ggml_type, 0) + t.n_elements
    return GGMLQuantizationType(max(counts, key=counts.__getitem__)).name if counts else ""


def _gguf_model_info(header: GGUFHeader, n_params: int) -> dict[str, Any]:
    info: dict[str, Any] = {}
    for key, value in header.metadata.items():
        if key.startswith("tokenizer.") and (isinstance(value, list) or key.endswith("template")):
            continue  # vocabularies and templates are shown elsewhere
        if isinstance(value, list) and len(value) > 64:
            continue
        info[key] = value
    info["general.parameter_count"] = n_params
    return info


def _gguf_spec(path: Path, header: GGUFHeader) -> ModelSpec:
    md = header.metadata
    arch = str(md.get("general.architecture", ""))
    n_params = sum(t.n_elements for t in header.tensors)
    ctx = md.get(f"{arch}.context_length")
    template = md.get("tokenizer.chat_template")
    return ModelSpec(
        format="gguf",
        family=arch,
        families=[arch] if arch else [],
        parameter_size=str(md.get("general.size_label") or human_count(n_params)),
        quantization_level=_file_type_name(header),
        context_length=int(ctx) if ctx is not None else None,
        capabilities=["embedding"] if arch in EMBEDDING_TYPES else ["completion"],
        template=template if isinstance(template, str) else None,
        model_type=arch,
        model_info={**_gguf_model_info(header, n_params), "mlxserve.tensor_types": convert.describe(header)},
    )


# (metadata key under "<arch>.", tensor name with {i} for each block) that the loader needs.
_GGUF_NEEDS_KEYS = ("embedding_length", "block_count", "attention.head_count")
_GGUF_NEEDS_TENSORS = ("token_embd.weight", "output_norm.weight")
_ATTENTION = ("attn_q", "attn_k", "attn_v")
_DENSE_FFN = ("ffn_gate", "ffn_up", "ffn_down")
_QK_NORMS = ("attn_q_norm", "attn_k_norm")
_GEMMA_NORMS = ("post_attention_norm", "post_ffw_norm")
_GGUF_BLOCK_TENSORS = {  # besides attn_norm, attn_output and ffn_norm
    "llama": (*_ATTENTION, *_DENSE_FFN),
    "qwen2": (*_ATTENTION, *_DENSE_FFN),
    "qwen3": (*_ATTENTION, *_DENSE_FFN, *_QK_NORMS),
    "qwen3moe": (*_ATTENTION, *_QK_NORMS, "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"),
    "gemma2": (*_ATTENTION, *_DENSE_FFN, *_GEMMA_NORMS),
    "gemma3": (*_ATTENTION, *_DENSE_FFN, *_QK_NORMS, *_GEMMA_NORMS),
    "phi3": ("ffn_up", "ffn_down"),  # and attn_qkv, or attn_q/k/v
    "gpt-oss": (
        *_ATTENTION,
        "attn_sinks",
        "post_attention_norm",
        "ffn_gate_inp",
        "ffn_gate_exps",
        "ffn_up_exps",
        "ffn_down_exps",
    ),
}


def check_gguf_runnable(path: Path, header: GGUFHeader) -> None:
    """Refuse at create a GGUF the engine could not load, rather than fail its first request."""
    md = header.metadata
    arch = md.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise BadRequest(
            f"{path.name}: unsupported model architecture {arch!r} (GGUF models "
            f"mlxserve can run: {', '.join(GGUF_ARCHITECTURES)}; other "
            "architectures can be created from an mlx-lm safetensors directory)"
        )
    for key in (*_GGUF_NEEDS_KEYS, *(("feed_forward_length",) if arch not in ("qwen3moe", "gpt-oss") else ())):
        value = md.get(f"{arch}.{key}", md.get(f"{arch}.text.{key}"))  # .text.: older Ollama files
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise BadRequest(f"{path.name}: metadata {arch}.{key} is missing or not a positive integer")
    if not isinstance(md.get("tokenizer.ggml.tokens"), list):
        raise BadRequest(f"{path.name}: no tokenizer vocabulary (tokenizer.ggml.tokens)")
    have = {t.name for t in header.tensors}
    parts = ["attn_norm", "attn_output", *(() if arch == "gpt-oss" else ("ffn_norm",)), *_GGUF_BLOCK_TENSORS[arch]]
    if arch == "phi3" and "blk.0.attn_qkv.weight" in have:
        parts.append("attn_qkv")
    elif arch == "phi3":
        parts += _ATTENTION
    needed = [
        *_GGUF_NEEDS_TENSORS,
        *(f"blk.{i}.{part}.weight" for i in range(md[f"{arch}.block_count"]) for part in parts),
    ]
    missing = [n for n in needed if n not in have]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise BadRequest(f"{path.name}: tensors {', '.join(missing[:3])}{more} are missing")


def _nothing() -> None:
    pass


def import_gguf(
    path: Path,
    workdir: Path,
    progress: Callable[[dict], None],
    validated: Callable[[], None] = _nothing,
    *,
    converter: convert.Converter | None,
) -> Imported:
    """``validated`` is called once the file is known good, before a conversion (minutes for a
    large model) starts; ``converter`` runs it (None: a file that needs one is refused)."""
    progress({"status": "parsing GGUF"})
    header = read_header(path)
    check_gguf_runnable(path, header)
    spec = _gguf_spec(path, header)
    vocab = [t for t in header.metadata.get("tokenizer.ggml.tokens") or [] if isinstance(t, str)]
    if not convert.needs_conversion(header):
        return Imported([LayerSource(mt.GGUF, path=path)], spec, vocab)
    if spec.capabilities != ["completion"]:
        raise BadRequest(f"{path.name}: only completion GGUF models can be converted")
    validated()
    progress({"status": "converting model"})
    out = workdir / "converted"
    config = convert.convert_gguf(converter, path, header, out, progress)
    quant = config.get("quantization") or {}
    spec.format = "safetensors"
    if quant:
        spec.quantization_level = f"{spec.quantization_level}->Q{quant['bits']}"
    spec.conversion = f"GGUF {_file_type_name(header)} dequantized into MLX's format: " + ", ".join(
        f"{name} -> {what}" for name, what in convert.describe(header).items()
    )
    layers = _directory_layers(out, _scan(out))
    return Imported(layers, spec, vocab)


# ---------------------------------------------------------------- directories


def _media_type(rel: str) -> str:
    name = rel.rsplit("/", 1)[-1]
    if name.endswith(".safetensors"):
        return mt.SAFETENSORS
    if name in TOKENIZER_FILES or name.startswith("tokenizer") or name.endswith(_TOKENIZER_SUFFIXES):
        return mt.TOKENIZER
    return mt.MODEL_CONFIG


def _wanted(name: str) -> bool:
    return name.endswith((".safetensors", ".json", *_TOKENIZER_SUFFIXES)) or name in TOKENIZER_FILES


def _scan(root: Path) -> list[str]:
    """Relative paths of the files that make up the model (README, .git*, *.bin etc. are not)."""
    rels = sorted(p.name for p in root.iterdir() if p.is_file() and _wanted(p.name))
    modules = root / "modules.json"
    if modules.is_file():
        # sentence-transformers keeps pooling/normalize settings in subdirectories it names here.
        try:
            entries = json.loads(modules.read_text())
        except ValueError as exc:
            raise BadRequest(f"modules.json in {root.name} is not JSON: {exc}") from None
        for entry in entries if isinstance(entries, list) else []:
            sub = entry.get("path") if isinstance(entry, dict) else None
            if not sub or "/" in sub or sub.startswith(".") or not (root / sub).is_dir():
                continue
            rels += sorted(f"{sub}/{p.name}" for p in (root / sub).iterdir() if p.is_file() and _wanted(p.name))
    return rels


def _directory_layers(root: Path, rels: list[str], skip: frozenset[str] = frozenset()) -> list[LayerSource]:
    return [LayerSource(_media_type(r), path=root / r, title=r) for r in rels if r not in skip]


_ST_DTYPES = {"F16": "F16", "BF16": "BF16", "F32": "F32", "F64": "F64"}


def _safetensors_summary(files: list[Path], bits: int | None) -> tuple[int, str]:
    """(parameter count, dominant float dtype) from safetensors headers, reading no tensor;
    packed quantized weights count 32/bits parameters per uint32."""
    total = 0
    by_dtype: dict[str, int] = {}
    for f in files:
        header = safetensorsmeta.read_header(f)
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if name.endswith((".scales", ".biases")) and f"{name.rsplit('.', 1)[0]}.weight" in header:
                continue
            count = 1
            for d in meta["shape"]:
                count *= d
            if bits and meta["dtype"] == "U32":
                count = count * 32 // bits
            total += count
            by_dtype[meta["dtype"]] = by_dtype.get(meta["dtype"], 0) + count
    floats = {k: v for k, v in by_dtype.items() if k in _ST_DTYPES}
    return total, (max(floats, key=floats.__getitem__) if floats else "")


def _dtype_level(config: dict[str, Any], stored_dtype: str) -> str:
    quant = config.get("quantization") or config.get("quantization_config")
    if isinstance(quant, dict) and isinstance(quant.get("bits"), int):
        return f"Q{quant['bits']}"
    return stored_dtype


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadRequest(f"cannot read {path.parent.name}/{path.name}: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"{path.parent.name}/{path.name} is not a JSON object")
    return data


def _chat_template(root: Path) -> str | None:
    tc = root / "tokenizer_config.json"
    template = _read_json(tc).get("chat_template") if tc.is_file() else None
    if isinstance(template, list):  # named templates: the default one is the chat template
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and (root / "chat_template.jinja").is_file():
        template = (root / "chat_template.jinja").read_text()
    return template if isinstance(template, str) else None


def _vocab(root: Path) -> list[str]:
    tj = root / "tokenizer.json"
    if not tj.is_file():  # absent, or a FIFO that would block the read
        return []
    try:
        data = json.loads(tj.read_text())
    except (OSError, ValueError):
        return []
    return [t.get("content", "") for t in data.get("added_tokens") or [] if isinstance(t, dict)]


def import_directory(
    root: Path,
    workdir: Path,
    progress: Callable[[dict], None],
    quantize: str | None = None,
    validated: Callable[[], None] = _nothing,
    *,
    converter: convert.Converter | None,
) -> Imported:
    """``validated`` and ``converter`` as for import_gguf (the converter also knows which model
    types the engine runs)."""
    progress({"status": "reading model directory"})
    if not (root / "config.json").is_file():
        raise BadRequest(f"{root} has no config.json (expected an mlx-lm or Hugging Face model directory)")
    config = _read_json(root / "config.json")
    rels = _scan(root)
    weights = [root / r for r in rels if r.endswith(".safetensors") and "/" not in r]
    if not weights:
        raise BadRequest(f"no *.safetensors weights in {root}")
    if not any(r in ("tokenizer.json", "tokenizer.model") for r in rels):
        raise BadRequest(f"no tokenizer.json in {root}")
    model_type = str(config.get("model_type") or "")
    embedding = model_type in EMBEDDING_TYPES or (root / "modules.json").is_file()
    vision = not embedding and served_vision_type(config)  # mlx-lm may still serve it as text
    if not vision:
        _check_runnable(root, config, embedding, converter)
    for r in rels:
        if r.endswith(".safetensors"):
            safetensorsmeta.read_header(root / r)
    layers = _directory_layers(root, rels)
    conversion = None
    if quantize is not None:
        bits = {"q4": 4, "q8": 8}.get(quantize.lower())
        if bits is None:
            raise BadRequest(f"unsupported quantization '{quantize}' (use q4 or q8)")
        if embedding:
            raise BadRequest("quantize is only supported for completion models")
        if vision:
            raise BadRequest("quantize is not supported for vision models (quantize with mlx_vlm.convert)")
        if config.get("quantization") or config.get("quantization_config"):
            raise BadRequest(f"{root.name} is already quantized")
        validated()
        progress({"status": f"quantizing model to {quantize.lower()}"})
        out = workdir / "quantized"
        config = convert.quantize_directory(converter, root, out, bits)
        # The new weights and config replace the originals (and any shard index, which would
        # name shards that are no longer there); tokenizer files stay.
        replaced = frozenset(
            r for r in rels if r.endswith(".safetensors") or r in ("config.json", "model.safetensors.index.json")
        )
        layers = _directory_layers(root, rels, skip=replaced) + _directory_layers(
            out, ["config.json", "model.safetensors"]
        )
        weights = [out / "model.safetensors"]
        conversion = f"quantized to {bits}-bit (group {convert.GROUP_SIZE}) at create"
    quant = config.get("quantization")
    bits = quant.get("bits") if isinstance(quant, dict) else None
    n_params, stored_dtype = _safetensors_summary(weights, bits)
    if vision:  # the language model's sizes are the ones users ask about
        config = {**config, **(config.get("text_config") or {}), "model_type": model_type}
    ctx = config.get("max_position_embeddings") or config.get("n_positions") or config.get("max_seq_len")
    spec = ModelSpec(
        format="safetensors",
        family=model_type,
        families=[model_type] if model_type else [],
        parameter_size=human_count(n_params),
        quantization_level=_dtype_level(config, stored_dtype),
        context_length=int(ctx) if isinstance(ctx, int) else None,
        capabilities=["embedding"] if embedding else ["completion", "vision"] if vision else ["completion"],
        template=None if embedding else _chat_template(root),
        model_type=model_type,
        model_info=_directory_model_info(config, model_type, n_params),
        conversion=conversion,
    )
    return Imported(layers, spec, _vocab(root))


def _check_runnable(root: Path, config: dict[str, Any], embedding: bool, converter: convert.Converter | None) -> None:
    """Refuse at create a directory whose model type the engine has no implementation for."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise BadRequest(f"{root.name}/config.json has no model_type")
    if embedding:
        if model_type != "bert":  # engine/bert.py is the one encoder
            raise BadRequest(
                f"unsupported embedding model type {model_type!r} (embedding models mlxserve can run: bert)"
            )
        return
    if not convert.knows_model_type(converter, config):
        raise BadRequest(
            f"unsupported model type {model_type!r} (mlx-lm has no implementation "
            "of it; see mlx_lm/models for the model types it can run)"
        )


def _directory_model_info(config: dict[str, Any], arch: str, n_params: int) -> dict[str, Any]:
    info: dict[str, Any] = {"general.architecture": arch, "general.parameter_count": n_params}
    keys = {
        "context_length": "max_position_embeddings",
        "embedding_length": "hidden_size",
        "block_count": "num_hidden_layers",
        "feed_forward_length": "intermediate_size",
        "attention.head_count": "num_attention_heads",
        "attention.head_count_kv": "num_key_value_heads",
        "vocab_size": "vocab_size",
        "rope.freq_base": "rope_theta",
    }
    for key, hf in keys.items():
        if isinstance(config.get(hf), (int, float)):
            info[f"{arch}.{key}"] = config[hf]
    return info
