"""Vocabulary map: exact matches across spellings, first-piece projection of multi-token
entries (numerals), specials, identity, and the stored file (atomic, hashed, verified)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_pipeline.core.cross_tokenizer.token_bytes import token_bytes
from kd_pipeline.core.cross_tokenizer.vocab_map import VocabMap, build_vocab_map, first_piece


def class_members(vocab_map, teacher, student, cls):
    t_pieces, s_pieces = token_bytes(teacher), token_bytes(student)
    t = sorted(t_pieces.pieces[i] or b"<special>" for i in np.flatnonzero(vocab_map.teacher_class == cls))
    s = sorted(s_pieces.pieces[i] or b"<special>" for i in np.flatnonzero(vocab_map.student_class == cls))
    return t, s


def cls_of(vocab_map, tokenizer, token, side):
    token_id = tokenizer.token_to_id(token)
    assert token_id is not None, token
    return int((vocab_map.teacher_class if side == "teacher" else vocab_map.student_class)[token_id])


def test_exact_matches_across_byte_level_and_sentencepiece_spellings(byte_bpe, unigram):
    vocab_map = build_vocab_map(byte_bpe, unigram)
    # Ġthe (byte-level) and ▁the (SentencePiece) are the bytes b" the".
    assert cls_of(vocab_map, byte_bpe, "Ġthe", "teacher") == cls_of(vocab_map, unigram, "▁the", "student")
    assert cls_of(vocab_map, byte_bpe, "Ċ", "teacher") == cls_of(vocab_map, unigram, "\n", "student")
    assert cls_of(vocab_map, byte_bpe, "Ġ", "teacher") == cls_of(vocab_map, unigram, "▁", "student")
    # The special token of both sides is paired by content.
    assert cls_of(vocab_map, byte_bpe, "<|endoftext|>", "teacher") == cls_of(vocab_map, unigram, "<|endoftext|>", "student")
    # Different bytes, different classes.
    assert cls_of(vocab_map, byte_bpe, "Ġthe", "teacher") != cls_of(vocab_map, unigram, "▁God", "student")


def test_student_entries_join_the_class_of_their_first_teacher_piece(byte_bpe, unigram):
    vocab_map = build_vocab_map(byte_bpe, unigram)
    # é = c3 a9: the teacher spells it with two byte tokens, the first being Ã (= c3).
    assert cls_of(vocab_map, unigram, "é", "student") == cls_of(vocab_map, byte_bpe, "Ã", "teacher")
    # 東京 is 6 byte tokens of the teacher; its first byte e6 is the teacher's "æ".
    assert cls_of(vocab_map, unigram, "東京", "student") == cls_of(vocab_map, byte_bpe, "æ", "teacher")
    matched = vocab_map.matched_student_ids()
    assert matched[unigram.token_to_id("é")] and matched[unigram.token_to_id("東京")]


def test_numerals_of_a_merging_student_are_matched_against_a_digit_splitting_teacher(digit_bpe, unigram):
    vocab_map = build_vocab_map(digit_bpe, unigram)
    two = cls_of(vocab_map, digit_bpe, "2", "teacher")
    assert cls_of(vocab_map, unigram, "2024", "student") == two
    assert cls_of(vocab_map, unigram, "2", "student") == two  # the exact match shares the class
    t, s = class_members(vocab_map, digit_bpe, unigram, two)
    assert t == [b"2"] and s == [b"2", b"2024"]
    # The teacher spells " 2024" as a space and four digits (its pre-tokenizer splits digits),
    # so "▁2024" joins the teacher's space class: 5 pieces, within the default cap of 8 ...
    assert cls_of(vocab_map, unigram, "▁2024", "student") == cls_of(vocab_map, digit_bpe, "Ġ", "teacher")
    # ... and unmatched with X-Token's 4-piece cap.
    capped = build_vocab_map(digit_bpe, unigram, max_pieces=4)
    assert not capped.matched_student_ids()[unigram.token_to_id("▁2024")]


def test_teacher_entries_longer_than_any_student_entry_join_its_first_student_piece(digit_bpe, unigram):
    vocab_map = build_vocab_map(digit_bpe, unigram)
    # Teacher " their": the student re-tokenizes it as "▁the" + "ir"-pieces.
    their = cls_of(vocab_map, digit_bpe, "Ġtheir", "teacher")
    assert their == cls_of(vocab_map, unigram, "▁the", "student")
    assert their == cls_of(vocab_map, digit_bpe, "Ġthe", "teacher")
    # Teacher " be" vs the student's "▁b" + "e".
    assert cls_of(vocab_map, digit_bpe, "Ġbe", "teacher") == cls_of(vocab_map, unigram, "▁b", "student")


def test_exact_only_map_leaves_multi_token_entries_unmatched(byte_bpe, unigram):
    vocab_map = build_vocab_map(byte_bpe, unigram, max_pieces=1)
    assert not vocab_map.matched_student_ids()[unigram.token_to_id("東京")]
    assert vocab_map.matched_student_ids()[unigram.token_to_id("▁the")]


def test_first_piece_prefers_fewest_pieces_then_the_longest_first():
    vocabulary = {b"a": 0, b"ab": 1, b"abc": 2, b"bcd": 3, b"c": 4, b"d": 5, b"cd": 6}
    # abc+d, ab+cd and a+bcd all take 2 pieces: the longest first piece wins.
    assert first_piece(b"abcd", vocabulary, 4, 3) == b"abc"
    assert first_piece(b"acd", vocabulary, 4, 3) == b"a"  # a+cd (2) beats a+c+d (3)
    assert first_piece(b"abcd", vocabulary, 1, 3) is None
    assert first_piece(b"xyz", vocabulary, 4, 3) is None


def test_same_tokenizer_gives_the_identity_map(byte_bpe):
    vocab_map = build_vocab_map(byte_bpe, byte_bpe)
    assert vocab_map.is_identity
    projection = vocab_map.projection()
    assert bool(projection.class_matched.all()) and not bool(projection.student_unmatched.any())


def test_projection_tensors_are_consistent_with_the_classes(byte_bpe, unigram):
    vocab_map = build_vocab_map(byte_bpe, unigram)
    projection = vocab_map.projection()
    for cls in range(vocab_map.num_classes):
        lo, hi = projection.class_student_ptr[cls], projection.class_student_ptr[cls + 1]
        members = sorted(projection.class_student_ids[lo:hi].tolist())
        assert members == np.flatnonzero(vocab_map.student_class == cls).tolist()
    has_t = np.isin(np.arange(vocab_map.num_classes), vocab_map.teacher_class)
    has_s = np.isin(np.arange(vocab_map.num_classes), vocab_map.student_class)
    assert torch.equal(projection.class_matched, torch.as_tensor(has_t & has_s))
    assert int(vocab_map.metadata["num_matched_classes"]) == int((has_t & has_s).sum())


def test_saved_map_reads_back_with_its_hash_and_detects_tampering(tmp_path, byte_bpe, unigram):
    vocab_map = build_vocab_map(byte_bpe, unigram)
    path = tmp_path / "maps" / "vocab_map.safetensors"
    digest = vocab_map.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["vocab_map.safetensors"]  # no temp left
    loaded = VocabMap.load(path)
    assert loaded.content_hash == digest == vocab_map.content_hash
    assert np.array_equal(loaded.teacher_class, vocab_map.teacher_class)
    assert np.array_equal(loaded.student_class, vocab_map.student_class)
    assert loaded.metadata == vocab_map.metadata
    # The hash is a function of the content: the same build gives the same hash.
    assert build_vocab_map(byte_bpe, unigram).content_hash == digest
    assert build_vocab_map(byte_bpe, unigram, max_pieces=2).content_hash != digest

    from safetensors.torch import save_file

    tampered = dict(vocab_map.metadata, content_hash=digest)
    classes = torch.as_tensor(vocab_map.teacher_class).clone()
    classes[0] = classes[1]
    save_file({"teacher_class": classes, "student_class": torch.as_tensor(vocab_map.student_class)},
              str(path), metadata=tampered)
    with pytest.raises(ValueError, match=rf"vocabulary map {path}: content hash .* does not match"):
        VocabMap.load(path)
