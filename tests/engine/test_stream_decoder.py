"""StreamDecoder: the streamed deltas add up to the whole decode, and each step decodes only a
few tokens however long the answer grows."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mlxserve.engine.tokenizer import StreamDecoder, TokenizerInfo
from mlxserve.testing import tinymodel

TEXTS = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)),
    min_size=0,
    max_size=80,
)


def _info(tok: Tokenizer) -> TokenizerInfo:
    return TokenizerInfo(tok, bos_token=None, eos_tokens=[], chat_template=None, add_bos=False)


def _metaspace() -> TokenizerInfo:
    """A SentencePiece-style tokenizer: its decoder drops the space that opens a window."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False)
    tok.train_from_iterator(tinymodel.CORPUS, trainer)
    return _info(tok)


BYTE_LEVEL = _info(tinymodel.build_tokenizer())
METASPACE = _metaspace()


class Counting:
    """The tokenizer, counting how many ids each decode call gets."""

    def __init__(self, info: TokenizerInfo):
        self.info, self.sizes = info, []

    def decode(self, ids, **kw):
        ids = list(ids)
        self.sizes.append(len(ids))
        return self.info.decode(ids, **kw)


def _stream(info, ids: list[int]) -> str:
    d = StreamDecoder(info)
    return "".join(d.add(i) for i in ids) + d.flush()


@settings(max_examples=200, deadline=None)
@given(TEXTS)
def test_deltas_add_up_to_the_whole_decode_byte_level(text):
    ids = BYTE_LEVEL.encode(text)
    assert _stream(BYTE_LEVEL, ids) == BYTE_LEVEL.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, BYTE_LEVEL.vocab_size - 1), max_size=40))
def test_any_ids_stream_like_the_whole_decode(ids):
    # A model may emit byte tokens that never form a character; the stream still ends as the
    # whole decode does.
    assert _stream(BYTE_LEVEL, ids) == BYTE_LEVEL.decode(ids)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["Hello", " world", " the", "capital", " of", "France", "!", "\n"]), max_size=30))
def test_metaspace_keeps_the_spaces_between_windows(words):
    ids = METASPACE.encode("".join(words))
    assert _stream(METASPACE, ids) == METASPACE.decode(ids)


def test_each_step_decodes_a_few_tokens_however_long_the_text():
    text = "Once upon a time there was a small model that answered questions, " * 40  # no newline
    ids = BYTE_LEVEL.encode(text)
    assert len(ids) > 400
    counting = Counting(BYTE_LEVEL)
    assert _stream(counting, ids) == text
    assert max(counting.sizes) <= 8, max(counting.sizes)  # was the whole text: 400+ ids


def test_a_split_character_is_held_until_complete():
    ids = BYTE_LEVEL.encode("🙂")  # four bytes, more than one byte-level token
    assert len(ids) > 1
    d = StreamDecoder(BYTE_LEVEL)
    deltas = [d.add(i) for i in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "🙂"
    assert d.flush() == ""
