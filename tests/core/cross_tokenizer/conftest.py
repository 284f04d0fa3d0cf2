"""Tokenizers of really different families, built locally (no hub): the committed tiny byte-level
BPE (KJV), a hand-written SentencePiece-style Unigram, a digit-splitting byte-level BPE and a
trained WordPiece."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

TINY_TOKENIZER_JSON = Path(__file__).resolve().parents[2] / "fixtures" / "tiny_tokenizer" / "tokenizer.json"

#: Characters of the test strings, so the Unigram below can spell all of them.
ALPHABET = sorted(set("In the beginning God created 2024 1999 東京 😀 🎉 café crème naïve\nnew line. Their theory,"))

#: Multi-character Unigram pieces (higher score than single characters, so they win).
UNIGRAM_PIECES = ["▁the", "▁beginning", "▁God", "▁cr", "eated", "2024", "▁2024", "東京", "▁caf", "é", "ne", "ew",
                  "▁l", "in", "e.", "▁b", "▁Th"]


@pytest.fixture(scope="session")
def byte_bpe() -> Tokenizer:
    """The committed tiny byte-level BPE (GPT-2 byte table, ~512 ids, KJV merges)."""
    return Tokenizer.from_file(str(TINY_TOKENIZER_JSON))


@pytest.fixture(scope="session")
def unigram() -> Tokenizer:
    """A SentencePiece-style Unigram with `▁` for spaces, prepended to the text."""
    vocab = [("<unk>", 0.0), ("<|endoftext|>", 0.0), ("▁", -4.0)]
    vocab += [(piece, -1.0) for piece in UNIGRAM_PIECES]
    vocab += [(ch, -5.0) for ch in ALPHABET if ch != " " and ch not in UNIGRAM_PIECES]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=0))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return tokenizer


@pytest.fixture(scope="session")
def digit_bpe() -> Tokenizer:
    """A byte-level BPE that splits digits (as SmolLM2 does) and knows a few words."""
    from kd_pipeline.core.cross_tokenizer.token_bytes import byte_level_decoder

    symbols = sorted(byte_level_decoder(), key=lambda ch: byte_level_decoder()[ch])
    merges = [("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e"), ("Ġthe", "i"), ("Ġthei", "r"), ("Ġ", "b"), ("Ġb", "e")]
    vocab = {"<|endoftext|>": 0}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return tokenizer


@pytest.fixture(scope="session")
def wordpiece() -> Tokenizer:
    """A lower-casing BERT-style WordPiece trained on a few strings (spaces are not tokens)."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    texts = ["In the beginning God created the heaven and the earth.", "café crème naïve 東京 😀"] * 20
    trainer = trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[UNK]", "[CLS]", "[SEP]"], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


@pytest.fixture
def chars_in_trained_tokens():
    """Independent count for bits per character: characters whose first byte's offset lies in a
    trained token (token t covers ends[t-1]:ends[t])."""

    def count(text, ends, mask):
        spans = [(int(ends[t - 1]) if t else 0, int(ends[t])) for t in range(len(ends)) if mask[t]]
        total, offset = 0, 0
        for char in text:
            total += any(lo <= offset < hi for lo, hi in spans)
            offset += len(char.encode("utf-8"))
        return total

    return count
