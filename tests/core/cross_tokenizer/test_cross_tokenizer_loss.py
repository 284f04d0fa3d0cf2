"""Cross-tokenizer loss: identity reduction to the fused same-tokenizer loss, and the chunked
implementation against the naive float64 reference (values and gradients) on a real-looking map.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from kd_pipeline.core.cross_tokenizer.groups import AlignedGroupBatch
from kd_pipeline.core.cross_tokenizer.loss import CrossTokenizerOptions, cross_tokenizer_kd_loss
from kd_pipeline.core.cross_tokenizer.reference import cross_tokenizer_loss_reference
from kd_pipeline.core.cross_tokenizer.vocab_map import VocabMap
from kd_pipeline.core.losses import IGNORE_INDEX, KDLossConfig, fused_topk_kd_loss


@pytest.fixture(autouse=True, scope="module")
def single_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


KD_LOSSES = [("fwd_kl", 0.5), ("bwd_kl", 0.5), ("jsd", 0.3)]
NORMALIZATIONS = ["renormalize", "tail_bucket"]
SCALES = [(1.0, 1.0, True), (0.7, 1.6, True), (1.5, 0.5, False)]


def refuses_tempered_tail(config: KDLossConfig, case) -> bool:
    """tail_bucket at target_logits_scale != 1 needs teacher log-normalizers (the fused loss
    refuses it too without them): checked to be refused by name. True when `config` is such a
    setting; `case` is `run_cross`'s arguments before `config`."""
    if not (config.topk_normalization == "tail_bucket" and config.target_logits_scale != 1.0):
        return False
    hidden, weight, bias, labels, sft_weights, groups, vocab_map = case
    with pytest.raises(ValueError, match=re.escape(
            f"cross_tokenizer_kd_loss: topk_normalization 'tail_bucket' at target_logits_scale "
            f"{config.target_logits_scale:g} is not supported with a student tokenizer")):
        cross_tokenizer_kd_loss(hidden, weight, bias, labels, sft_weights, groups, vocab_map.projection(), config)
    return True


def params(n, h, v, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) / math.sqrt(h)
    bias = torch.randn(v, generator=gen, dtype=torch.float64)
    return gen, hidden, weight, bias


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def run_cross(hidden, weight, bias, labels, sft_weights, groups, vocab_map, config, options):
    h, w, b = leaves(hidden, weight, bias)
    out = cross_tokenizer_kd_loss(h, w, b, labels, sft_weights, groups, vocab_map.projection(), config, options)
    out.loss.backward()
    return out, [h.grad, w.grad, b.grad]


# --- identity: teacher tokenizer == student tokenizer ------------------------------------------


def identity_case(seed=0, n=23, h=8, v=31, k=5):
    gen, hidden, weight, bias = params(n, h, v, seed)
    teacher = (2 * torch.randn(n, v, generator=gen, dtype=torch.float64)).log_softmax(-1)
    topk_logprobs, topk_ids = teacher.topk(k, dim=-1)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::6] = IGNORE_INDEX
    weights = torch.rand(n, generator=gen, dtype=torch.float64) / n
    weights[3::7] = 0.0
    rows = torch.arange(n)
    groups = AlignedGroupBatch(rows, rows + 1, topk_ids, topk_logprobs, torch.zeros(n, dtype=torch.float64), weights)
    identity = VocabMap(np.arange(v), np.arange(v), {})
    return hidden, weight, bias, topk_ids, topk_logprobs, labels, weights, groups, identity


@pytest.mark.parametrize("scales", SCALES, ids=lambda s: f"a{s[0]}-s{s[1]}-sft{'s' if s[2] else 'u'}")
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("kd_loss", KD_LOSSES, ids=lambda kd: kd[0])
@pytest.mark.parametrize("span_merge", ["observed", "first_token"])
def test_identity_map_reduces_to_the_fused_same_tokenizer_loss(kd_loss, normalization, scales, span_merge):
    hidden, weight, bias, topk_ids, topk_logprobs, labels, weights, groups, identity = identity_case()
    config = KDLossConfig(
        kd_loss=kd_loss[0], beta=kd_loss[1], kd_loss_weight=0.8, sft_loss_weight=0.6,
        logits_scale=scales[0], target_logits_scale=scales[1], scale_sft_logits=scales[2],
        topk_normalization=normalization, temperature_squared=True, chunk_size=4,
    )
    options = CrossTokenizerOptions(uld_loss_weight=2.0, span_merge=span_merge)
    if refuses_tempered_tail(config, (hidden, weight, bias, labels, weights, groups, identity)):
        return
    cross, cross_grads = run_cross(hidden, weight, bias, labels, weights, groups, identity, config, options)
    h, w, b = leaves(hidden, weight, bias)
    fused = fused_topk_kd_loss(h, w, b, topk_ids, topk_logprobs, labels, weights, config)
    fused.loss.backward()
    tight = dict(rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(cross.loss, fused.loss, **tight)
    torch.testing.assert_close(cross.kd, fused.kd, **tight)
    torch.testing.assert_close(cross.sft, fused.sft, **tight)
    assert cross.uld.item() == 0.0  # no unmatched id on either side
    torch.testing.assert_close(cross.matched_mass, fused.teacher_coverage, **tight)
    for grad, ref in zip(cross_grads, [h.grad, w.grad, b.grad]):
        torch.testing.assert_close(grad, ref, **tight)


def test_identity_reduction_in_float32_to_rounding():
    hidden, weight, bias, topk_ids, topk_logprobs, labels, weights, groups, identity = identity_case(seed=3)
    config = KDLossConfig(kd_loss_weight=1.0, sft_loss_weight=0.5, topk_normalization="tail_bucket")
    f32 = [t.float() for t in (hidden, weight, bias)]
    cross, grads = run_cross(*f32, labels, weights.float(), groups, identity, config, CrossTokenizerOptions())
    h, w, b = leaves(*f32)
    fused = fused_topk_kd_loss(h, w, b, topk_ids, topk_logprobs.float(), labels, weights.float(), config)
    fused.loss.backward()
    torch.testing.assert_close(cross.loss, fused.loss, rtol=2e-6, atol=1e-7)
    for grad, ref in zip(grads, [h.grad, w.grad, b.grad]):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-7)


# --- a real cross-tokenizer case against the naive reference -----------------------------------


def cross_case(seed=0):
    """Teacher vocab 30, student vocab 26; classes with several ids per side, teacher-only and
    student-only classes; groups of 1-3 student rows with teacher chains."""
    rng = np.random.default_rng(seed)
    v_t, v_s, n, h, k = 30, 26, 19, 6, 6
    # 14 shared classes, then 6 teacher-only and 4 student-only ones.
    teacher_class = np.concatenate([rng.integers(0, 14, 20), np.arange(14, 20), rng.integers(0, 14, 4)])
    student_class = np.concatenate([np.arange(14), rng.integers(0, 14, 8), np.arange(20, 24)])
    vocab_map = VocabMap(teacher_class, student_class, {})
    gen, hidden, weight, bias = params(n, h, v_s, seed)
    labels = torch.randint(0, v_s, (n,), generator=gen)
    sizes = [1, 2, 1, 3, 1, 2, 2, 1]  # rows 0..12 in groups; 13..18 SFT only (row 15 no label)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    stops = starts + np.array(sizes)
    labels[15] = IGNORE_INDEX
    g = len(sizes)
    teacher = (2 * torch.randn(g, v_t, generator=gen, dtype=torch.float64)).log_softmax(-1)
    topk_logprobs, topk_ids = teacher.topk(k, dim=-1)
    chains = -torch.rand(g, generator=gen, dtype=torch.float64) * 2
    chains[0] = 0.0
    weights = torch.rand(g, generator=gen, dtype=torch.float64)
    weights[4] = 0.0
    groups = AlignedGroupBatch(
        torch.as_tensor(starts), torch.as_tensor(stops), topk_ids, topk_logprobs, chains, weights
    )
    sft_weights = torch.rand(n, generator=gen, dtype=torch.float64)
    return hidden, weight, bias, labels, sft_weights, groups, vocab_map


def run_reference(hidden, weight, bias, labels, sft_weights, groups, vocab_map, config, options):
    h, w, b = leaves(hidden, weight, bias)
    ref = cross_tokenizer_loss_reference(h @ w.t() + b, labels, sft_weights, groups, vocab_map, config, options)
    ref["loss"].backward()
    return ref, [h.grad, w.grad, b.grad]


@pytest.mark.parametrize("span_merge", ["observed", "first_token"])
@pytest.mark.parametrize("scales", SCALES[:2], ids=lambda s: f"a{s[0]}-s{s[1]}")
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("kd_loss", KD_LOSSES, ids=lambda kd: kd[0])
def test_chunked_loss_matches_the_naive_reference_values_and_gradients(kd_loss, normalization, scales, span_merge):
    case = cross_case()
    config = KDLossConfig(
        kd_loss=kd_loss[0], beta=kd_loss[1], kd_loss_weight=0.9, sft_loss_weight=0.4,
        logits_scale=scales[0], target_logits_scale=scales[1], topk_normalization=normalization,
        chunk_size=3,  # chunks must grow past the 3-row group
    )
    options = CrossTokenizerOptions(uld_loss_weight=0.7, span_merge=span_merge)
    if refuses_tempered_tail(config, case):
        return
    out, grads = run_cross(*case, config, options)
    ref, ref_grads = run_reference(*case, config, options)
    assert ref["uld"].item() > 0.01 and ref["kd"].item() > 0.01  # both terms are exercised
    for name in ("loss", "kd", "uld", "sft"):
        torch.testing.assert_close(getattr(out, name), ref[name], rtol=1e-10, atol=1e-12, msg=name)
    for index, (grad, ref_grad) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-11, msg=f"grad {index}")


def test_observed_merge_changes_the_tail_bucket_loss_but_not_renormalized_kd():
    case = cross_case(seed=1)
    results = {}
    for normalization in NORMALIZATIONS:
        for merge in ("observed", "first_token"):
            config = KDLossConfig(kd_loss_weight=1.0, topk_normalization=normalization)
            out = cross_tokenizer_kd_loss(
                *case[:6], case[6].projection(), config, CrossTokenizerOptions(span_merge=merge)
            )
            results[normalization, merge] = out
    torch.testing.assert_close(results["renormalize", "observed"].kd, results["renormalize", "first_token"].kd)
    assert abs(results["tail_bucket", "observed"].kd - results["tail_bucket", "first_token"].kd) > 1e-3
    assert abs(results["renormalize", "observed"].uld - results["renormalize", "first_token"].uld) > 1e-4


def test_chunk_size_does_not_change_the_result():
    case = cross_case(seed=2)
    options = CrossTokenizerOptions()
    outs = []
    for chunk in (1, 2, 5, 64):
        config = KDLossConfig(kd_loss_weight=1.0, sft_loss_weight=1.0, topk_normalization="tail_bucket", chunk_size=chunk)
        outs.append(run_cross(*case, config, options))
    for out, grads in outs[1:]:
        torch.testing.assert_close(out.loss, outs[0][0].loss, rtol=1e-12, atol=1e-13)
        for grad, ref in zip(grads, outs[0][1]):
            torch.testing.assert_close(grad, ref, rtol=1e-11, atol=1e-13)


def test_no_grad_evaluation_gives_the_same_values():
    case = cross_case()
    config = KDLossConfig(kd_loss_weight=1.0, sft_loss_weight=1.0)
    with_grad, _ = run_cross(*case, config, CrossTokenizerOptions())
    with torch.no_grad():
        without = cross_tokenizer_kd_loss(*case[:6], case[6].projection(), config)
    torch.testing.assert_close(without.loss, with_grad.loss.detach(), rtol=0, atol=0)
    assert 0.0 <= without.agreement.item() <= 1.0 and 0.0 < without.matched_mass.item() < 1.0


def test_bad_group_structure_is_reported_by_field():
    hidden, weight, bias, labels, sft_weights, groups, vocab_map = cross_case()
    config = KDLossConfig()
    overlapping = AlignedGroupBatch(
        torch.tensor([0, 1]), torch.tensor([2, 3]), groups.topk_ids[:2], groups.topk_logprobs[:2],
        groups.teacher_chain[:2], groups.weights[:2],
    )
    with pytest.raises(ValueError, match=r"group 1: rows \[1, 3\) .* overlap the previous group"):
        cross_tokenizer_kd_loss(hidden, weight, bias, labels, sft_weights, overlapping, vocab_map.projection(), config)
    unlabeled = labels.clone()
    unlabeled[1] = IGNORE_INDEX  # row 1 is the later row of group 1 (rows 1-2)
    with pytest.raises(ValueError, match="row 2: a later row of a multi-token group has no label"):
        unlabeled[1], unlabeled[2] = labels[1], IGNORE_INDEX
        cross_tokenizer_kd_loss(hidden, weight, bias, unlabeled, sft_weights, groups, vocab_map.projection(), config)
    with pytest.raises(ValueError, match=r"student vocabulary \(26\) != the lm_head's \(25\)"):
        cross_tokenizer_kd_loss(hidden, weight[:25], bias[:25], labels, sft_weights, groups, vocab_map.projection(), config)
    with pytest.raises(ValueError, match="span_merge must be one of"):
        CrossTokenizerOptions(span_merge="bayesian")


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("kd_loss", KD_LOSSES, ids=lambda kd: kd[0])
def test_variable_rows_padding_is_no_bucket(kd_loss, normalization):
    """`top_p` rows padded as the reader pads them (the row's first id again, log-prob -inf) give
    each group exactly the loss and gradients of its stored entries alone (KD, and ULD over the
    row's own ranks), and the naive reference agrees on the padded batch: cross-tokenizer
    training supports `top_p` artifacts."""
    hidden, weight, bias, labels, sft_weights, groups, vocab_map = cross_case(seed=4)
    config = KDLossConfig(kd_loss=kd_loss[0], beta=kd_loss[1], kd_loss_weight=0.9, sft_loss_weight=0.4,
                          topk_normalization=normalization, chunk_size=3)
    options = CrossTokenizerOptions(uld_loss_weight=0.7)
    k = groups.topk_ids.shape[1]
    lengths = [2, k, 1, 4, 3, 5, 1, 2]
    cols = torch.arange(k)[None, :] >= torch.tensor(lengths)[:, None]
    whole = AlignedGroupBatch(groups.row_start, groups.row_stop, torch.where(cols, groups.topk_ids[:, :1], groups.topk_ids),
                              groups.topk_logprobs.masked_fill(cols, -math.inf), groups.teacher_chain, groups.weights)
    out, grads = run_cross(hidden, weight, bias, labels, sft_weights, whole, vocab_map, config, options)
    ref, ref_grads = run_reference(hidden, weight, bias, labels, sft_weights, whole, vocab_map, config, options)
    assert ref["uld"].item() > 0.01
    for name in ("loss", "kd", "uld", "sft"):
        torch.testing.assert_close(getattr(out, name), ref[name], rtol=1e-10, atol=1e-12, msg=name)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-11)
    for g, length in enumerate(lengths):
        one = slice(g, g + 1)
        fields = dict(row_start=groups.row_start[one], row_stop=groups.row_stop[one],
                      teacher_chain=groups.teacher_chain[one], weights=groups.weights[one] + 0.5)
        ids, logprobs = groups.topk_ids[one].clone(), groups.topk_logprobs[one].clone()
        ids[:, length:], logprobs[:, length:] = ids[:, :1], -math.inf
        padded = AlignedGroupBatch(topk_ids=ids, topk_logprobs=logprobs, **fields)
        cut = AlignedGroupBatch(topk_ids=ids[:, :length], topk_logprobs=logprobs[:, :length], **fields)
        out, grads = run_cross(hidden, weight, bias, labels, sft_weights, padded, vocab_map, config, options)
        ref, ref_grads = run_cross(hidden, weight, bias, labels, sft_weights, cut, vocab_map, config, options)
        for name in ("loss", "kd", "uld", "matched_mass"):
            torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-12, atol=1e-13,
                                       msg=f"group {g} {name}")
        for grad, ref_grad in zip(grads, ref_grads):
            torch.testing.assert_close(grad, ref_grad, rtol=1e-11, atol=1e-13, msg=f"group {g}")
        assert ref.kd.item() != 0.0 or length == 1
