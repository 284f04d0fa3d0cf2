"""Byte ends of tokens and byte-boundary groups for really different tokenizers."""

from __future__ import annotations

import pytest

from kd_pipeline.core.cross_tokenizer.alignment import align_by_byte_ends, encode_with_byte_ends, token_byte_ends
from kd_pipeline.core.cross_tokenizer.token_bytes import detect_kind, token_bytes

TEXT = "In the beginning God created 2024 東京 😀 café\nnew line."


def groups_as_bytes(teacher, student, text):
    t_pieces, s_pieces = token_bytes(teacher), token_bytes(student)
    t_ids, t_ends = encode_with_byte_ends(teacher, text, pieces=t_pieces)
    s_ids, s_ends = encode_with_byte_ends(student, text, pieces=s_pieces)
    groups = align_by_byte_ends(t_ends, s_ends)
    pairs = [
        ([t_pieces.pieces[t_ids[i]] for i in t_rows], [s_pieces.pieces[s_ids[j]] for j in s_rows])
        for t_rows, s_rows in groups.pairs()
    ]
    return groups, pairs, (t_ids, t_ends), (s_ids, s_ends)


def assert_groups_partition_the_text(groups, t_ends, s_ends, text):
    """Groups are consecutive, cover every token, and both sides end on each group's byte."""
    assert groups.teacher_start[0] == 0 and groups.student_start[0] == 0
    assert (groups.teacher_start[1:] == groups.teacher_stop[:-1]).all()
    assert (groups.student_start[1:] == groups.student_stop[:-1]).all()
    assert groups.teacher_stop[-1] == len(t_ends) and groups.student_stop[-1] == len(s_ends)
    assert groups.byte_end[-1] == len(text.encode("utf-8"))
    previous = 0
    for g in range(groups.num_groups):
        end = groups.byte_end[g]
        for ends, first, stop in ((t_ends, groups.teacher_start[g], groups.teacher_stop[g]),
                                  (s_ends, groups.student_start[g], groups.student_stop[g])):
            assert ends[stop - 1] == end
            assert all(previous <= e <= end for e in ends[first:stop])
            # Smallest groups: no common boundary strictly inside.
        inner_t = set(t_ends[groups.teacher_start[g]:groups.teacher_stop[g] - 1].tolist())
        inner_s = set(s_ends[groups.student_start[g]:groups.student_stop[g] - 1].tolist())
        assert not (inner_t & inner_s) - {previous}
        previous = end


def test_tokenizer_kinds_are_recognized(byte_bpe, unigram, digit_bpe, wordpiece):
    assert [detect_kind(t) for t in (byte_bpe, unigram, digit_bpe, wordpiece)] == [
        "byte_level", "metaspace", "byte_level", "wordpiece",
    ]


def test_byte_level_pieces_of_one_character_get_consecutive_byte_ends(byte_bpe):
    text = "東 😀 é"
    ids, ends = encode_with_byte_ends(byte_bpe, text)
    # 東 = 3 bytes cut into 3 tokens, emoji = 4 bytes into 4, é = 2 bytes into 2 (with spaces).
    assert ends.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    pieces = token_bytes(byte_bpe)
    assert b"".join(pieces.pieces[i] for i in ids) == text.encode("utf-8")


def test_metaspace_prefix_reported_on_the_first_letter_ends_before_it(unigram):
    ids, ends = encode_with_byte_ends(unigram, "In the")
    pieces = token_bytes(unigram)
    assert [pieces.pieces[i] for i in ids] == [b" ", b"I", b"n", b" the"]
    assert ends.tolist() == [0, 1, 2, 6]


def test_zero_width_special_tokens_end_with_the_previous_token_and_join_its_group():
    # "ab" + EOS on both sides; the post-processor reports the EOS at (0, 0).
    teacher_ends = token_byte_ends("ab", [(0, 1), (1, 2), (0, 0)], [1, 1, 0])
    student_ends = token_byte_ends("ab", [(0, 2), (0, 0)], [2, 0])
    assert teacher_ends.tolist() == [1, 2, 2] and student_ends.tolist() == [2, 2]
    assert align_by_byte_ends(teacher_ends, student_ends).pairs() == [([0, 1, 2], [0, 1])]


def test_lengths_that_do_not_add_up_put_the_whole_cluster_in_one_group():
    ends = token_byte_ends("é", [(0, 1), (0, 1)], [1, 3])  # 4 bytes claimed for 2
    assert ends.tolist() == [2, 2]


def test_offsets_that_go_backwards_are_an_error_naming_the_token():
    with pytest.raises(ValueError, match="token 1: byte end 2 is before the previous token's end 6"):
        token_byte_ends("abcdef", [(4, 6), (0, 2)], [2, 2])
    with pytest.raises(ValueError, match=r"token 0: character offsets \(0, 9\) outside the text \(length 3\)"):
        token_byte_ends("abc", [(0, 9)], [3])


def test_byte_bpe_teacher_against_unigram_student(byte_bpe, unigram):
    groups, pairs, (_, t_ends), (_, s_ends) = groups_as_bytes(byte_bpe, unigram, TEXT)
    assert_groups_partition_the_text(groups, t_ends, s_ends, TEXT)
    expected = [
        ([b"I"], [b" ", b"I"]),  # SentencePiece's prepended space, zero bytes of the text
        ([b" the"], [b" the"]),
        ([b" be", b"g", b"in", b"n", b"ing"], [b" beginning"]),  # several teacher tokens
        ([b" c", b"re", b"at", b"ed"], [b" cr", b"eated"]),  # crossing boundaries
        ([b" ", b"2", b"0", b"2", b"4"], [b" 2024"]),  # numeral
        ([b"\xe6", b"\x9d", b"\xb1", b"\xe4", b"\xba", b"\xac"], ["東京".encode()]),  # CJK bytes
        ([b"\xf0", b"\x9f", b"\x98", b"\x80"], ["😀".encode()]),  # emoji bytes
        ([b"\xc3", b"\xa9"], ["é".encode()]),  # accent
        ([b"\n"], [b"\n"]),  # newline
        ([b"e", b"w"], [b"ew"]),
        ([b"ine", b"."], [b"in", b"e."]),
    ]
    for pair in expected:
        assert pair in pairs, pair
    for t_pieces, s_pieces in pairs[1:]:  # the same bytes on both sides after the first group
        assert b"".join(t_pieces) == b"".join(s_pieces)


def test_unigram_teacher_against_digit_splitting_byte_bpe_student(unigram, digit_bpe):
    groups, pairs, (_, t_ends), (_, s_ends) = groups_as_bytes(unigram, digit_bpe, TEXT)
    assert_groups_partition_the_text(groups, t_ends, s_ends, TEXT)
    # Now the student has the several tokens.
    assert ([b" beginning"], [b" be", b"g", b"i", b"n", b"n", b"i", b"n", b"g"]) in pairs
    assert ([b" 2024"], [b" ", b"2", b"0", b"2", b"4"]) in pairs
    assert ([b" God"], [b" ", b"G", b"o", b"d"]) in pairs
    assert (["東京".encode()], [b"\xe6", b"\x9d", b"\xb1", b"\xe4", b"\xba", b"\xac"]) in pairs


def test_wordpiece_student_without_space_tokens(byte_bpe, wordpiece):
    groups, pairs, (_, t_ends), (_, s_ends) = groups_as_bytes(byte_bpe, wordpiece, TEXT)
    assert_groups_partition_the_text(groups, t_ends, s_ends, TEXT)
    # The teacher's space tokens fall into the following word's group.
    assert ([b"I", b"n"], [b" in"]) in pairs
    assert ([b" the"], [b" the"]) in pairs
    assert ([b" ", b"\xe6", b"\x9d", b"\xb1"], [b" \xe6\x9d\xb1"]) in pairs
