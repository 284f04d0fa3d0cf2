"""From two tokenizations of a text and stored teacher rows to the loss inputs, end to end on
real tokenizers (byte-level BPE teacher, Unigram student)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from kd_pipeline.core.cross_tokenizer.alignment import encode_with_byte_ends, trained_byte_count
from kd_pipeline.core.cross_tokenizer.evaluation import trained_char_count
from kd_pipeline.core.cross_tokenizer.loss import CrossTokenizerOptions, cross_tokenizer_kd_loss
from kd_pipeline.core.cross_tokenizer.reference import cross_tokenizer_loss_reference
from kd_pipeline.core.cross_tokenizer.targets import collate_groups, sample_groups
from kd_pipeline.core.cross_tokenizer.token_bytes import token_bytes
from kd_pipeline.core.cross_tokenizer.vocab_map import build_vocab_map
from kd_pipeline.core.losses import KDLossConfig

TEXT = "In the beginning God created 2024 東京 😀 café\nnew line."


def encoded(tokenizer, text):
    ids, ends = encode_with_byte_ends(tokenizer, text)
    mask = np.ones(len(ids), dtype=np.int8)
    mask[0] = 0  # text rows: every token but the first is trained
    return ids, ends, mask


def test_groups_keep_rows_and_chains_of_the_stored_teacher_rows(byte_bpe, unigram):
    t_ids, t_ends, t_mask = encoded(byte_bpe, TEXT)
    s_ids, s_ends, s_mask = encoded(unigram, TEXT)
    target = -(np.arange(int(t_mask.sum())) + 1) / 10.0  # row r has log-prob -(r+1)/10
    groups = sample_groups(t_ends, t_mask, target, s_ends, s_mask, "s1")
    t_pieces, s_pieces = token_bytes(byte_bpe), token_bytes(unigram)
    # The first group holds the untrained first tokens: skipped.
    assert groups.num_groups == groups.num_distilled + 1
    by_text = {}
    for start, stop, row, chain in zip(groups.student_row_start, groups.student_row_stop,
                                       groups.teacher_row, groups.teacher_chain):
        student_text = b"".join(s_pieces.pieces[s_ids[r + 1]] for r in range(start, stop))  # row r = token r+1
        by_text[student_text] = (int(row), float(chain), int(stop - start))
    # " beginning": one student row; teacher tokens " be","g","in","n","ing" = tokens 3..7 = rows 2..6.
    row, chain, size = by_text[b" beginning"]
    assert (row, size) == (2, 1)
    assert chain == pytest.approx(-(4 + 5 + 6 + 7) / 10.0)
    assert t_pieces.pieces[t_ids[row + 1]] == b" be"
    # " cr"+"eated" (2 student rows) against " c","re","at","ed".
    row, chain, size = by_text[b" created"]
    assert size == 2 and t_pieces.pieces[t_ids[row + 1]] == b" c"
    assert by_text[b" the"][1] == 0.0  # one teacher token: no chain


def test_byte_counts_for_bits_per_byte_agree_across_tokenizers(byte_bpe, unigram):
    _, t_ends, t_mask = encoded(byte_bpe, TEXT)
    _, s_ends, s_mask = encoded(unigram, TEXT)
    total = len(TEXT.encode("utf-8"))
    assert trained_byte_count(t_ends, t_mask) == total - 1  # all but the untrained "I"
    assert trained_byte_count(s_ends, s_mask) == total - 0  # the student's first token is "▁" (0 bytes)
    with pytest.raises(ValueError, match="sample s2: 3 teacher target_logprobs for"):
        sample_groups(t_ends, t_mask, np.zeros(3), s_ends, s_mask, "s2")


def test_char_counts_for_bits_per_char(byte_bpe, unigram, chars_in_trained_tokens):
    _, t_ends, t_mask = encoded(byte_bpe, TEXT)
    _, s_ends, s_mask = encoded(unigram, TEXT)
    assert trained_char_count(TEXT, t_ends, t_mask) == len(TEXT) - 1  # all but the untrained "I"
    assert trained_char_count(TEXT, s_ends, s_mask) == len(TEXT)
    # The byte-level BPE cuts inside multi-byte characters (CJK, emoji): each still counts once.
    data = TEXT.encode("utf-8")
    assert any(end < len(data) and data[end] & 0xC0 == 0x80 for end in t_ends)
    for ends, mask in ((t_ends, t_mask), (s_ends, s_mask)):
        for first in range(3):  # untrain every third token
            sparse = mask.copy()
            sparse[first::3] = 0
            assert trained_char_count(TEXT, ends, sparse) == chars_in_trained_tokens(TEXT, ends, sparse)


def test_aligned_loss_on_real_tokenizers_matches_the_reference(byte_bpe, unigram):
    vocab_map = build_vocab_map(byte_bpe, unigram)
    t_ids, t_ends, t_mask = encoded(byte_bpe, TEXT)
    s_ids, s_ends, s_mask = encoded(unigram, TEXT)
    gen = torch.Generator().manual_seed(0)
    rows_t = int(t_mask.sum())
    teacher = (3 * torch.randn(rows_t, 512, generator=gen, dtype=torch.float64)).log_softmax(-1)
    topk_logprobs, topk_ids = teacher.topk(8, dim=-1)
    realized = torch.as_tensor(t_ids[1:])
    target = teacher.gather(1, realized[:, None]).squeeze(1).numpy()
    groups = sample_groups(t_ends, t_mask, target, s_ends, s_mask)
    batch = collate_groups([groups], [int(s_mask.sum())], [topk_ids.numpy()], [topk_logprobs.numpy()])
    n, v, h = int(s_mask.sum()), int(len(vocab_map.student_class)), 8
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) / 3
    labels = torch.as_tensor(s_ids[1:])
    sft_weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
    batch = replace(batch, topk_logprobs=batch.topk_logprobs.double(), teacher_chain=batch.teacher_chain.double(),
                    weights=torch.full((batch.num_groups,), 1.0 / batch.num_groups, dtype=torch.float64))
    config = KDLossConfig(kd_loss_weight=1.0, sft_loss_weight=1.0, topk_normalization="tail_bucket", chunk_size=4)
    options = CrossTokenizerOptions(uld_loss_weight=1.0)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = cross_tokenizer_kd_loss(h1, w1, None, labels, sft_weights, batch, vocab_map.projection(), config, options)
    out.loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = cross_tokenizer_loss_reference(h2 @ w2.t(), labels, sft_weights, batch, vocab_map, config, options)
    ref["loss"].backward()
    for name in ("loss", "kd", "uld", "sft"):
        torch.testing.assert_close(getattr(out, name), ref[name], rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-9, atol=1e-12)
    assert out.uld.item() > 0 and 0 < out.matched_mass.item() <= 1


def test_student_sample_trains_the_bytes_the_teacher_trains(byte_bpe, unigram):
    from kd_pipeline.core.cross_tokenizer.data import student_sample

    prompt, response = "In the beginning", " God created 2024."
    text = prompt + response
    t_ids, t_ends = encode_with_byte_ends(byte_bpe, text)
    t_pieces = token_bytes(byte_bpe)
    # Teacher: train the response tokens, then a zero-width EOS (id 0), trained.
    t_mask = (t_ends > len(prompt.encode())).astype(np.int8)
    t_ends = np.append(t_ends, t_ends[-1])
    t_mask = np.append(t_mask, 1)
    eos = unigram.token_to_id("<|endoftext|>")
    student = student_sample(unigram, text, t_ends, t_mask, eos_id=eos)
    s_pieces = token_bytes(unigram)
    trained = [s_pieces.pieces[i] for i, m in zip(student.input_ids, student.loss_mask) if m and i != eos]
    assert b"".join(trained) == response.encode()
    assert student.input_ids[-1] == eos and student.loss_mask[-1] == 1
    assert b"".join(t_pieces.pieces[i] for i in t_ids) == text.encode()

    # A teacher sample truncated inside "created": student tokens past its last byte are dropped.
    cut = int(np.searchsorted(t_ends, len("In the beginning God cr".encode())))
    short = student_sample(unigram, text, t_ends[:cut], t_mask[:cut], eos_id=eos)
    assert short.byte_ends[-1] <= t_ends[cut - 1] and short.input_ids[-1] != eos
