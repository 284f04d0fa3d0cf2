"""Naive cross-tokenizer loss on materialized [N, V] student logits: the executable spec.

Written in probability space with a Python loop over groups, from the definitions in
`loss.py`'s docstring, and differentiated by autograd; it shares no code with `loss.py` (which
works in log space, vectorized and chunked). The tests compare the two in float64.
"""

from __future__ import annotations

import math

import torch

from kd_pipeline.core.cross_tokenizer.groups import AlignedGroupBatch
from kd_pipeline.core.cross_tokenizer.loss import CrossTokenizerOptions
from kd_pipeline.core.cross_tokenizer.vocab_map import VocabMap
from kd_pipeline.core.losses.config import IGNORE_INDEX, TEACHER_TAIL_MIN_MASS, KDLossConfig


def _divergence(p: torch.Tensor, q: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    def kl(a, b):
        return sum(a[i] * torch.log(a[i] / b[i]) for i in range(len(a)) if a[i] > 0)

    if kind == "fwd_kl":
        return kl(p, q)
    if kind == "bwd_kl":
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def cross_tokenizer_loss_reference(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    sft_weights: torch.Tensor,
    groups: AlignedGroupBatch,
    vocab_map: VocabMap,
    config: KDLossConfig,
    options: CrossTokenizerOptions = CrossTokenizerOptions(),
) -> dict[str, torch.Tensor]:
    """{"loss", "kd", "uld", "sft"} of the aligned loss on (N, V) unscaled student logits."""
    z = config.logits_scale * student_logits
    probs = torch.softmax(z, dim=-1)
    sft_logits = z if config.scale_sft_logits else student_logits
    sft_probs = torch.softmax(sft_logits, dim=-1)
    zero = student_logits.sum() * 0
    sft = zero
    for r in range(student_logits.shape[0]):
        if labels[r] != IGNORE_INDEX and sft_weights[r] != 0:
            sft = sft - sft_weights[r] * torch.log(sft_probs[r, labels[r]])

    student_class = vocab_map.student_class
    has_teacher = vocab_map.class_has_teacher()
    has_student = vocab_map.class_has_student()
    unmatched_student_ids = [w for w in range(len(student_class)) if not has_teacher[student_class[w]]]
    kd = uld = zero
    ts = config.target_logits_scale
    observed = options.span_merge == "observed"
    for g in range(groups.num_groups):
        w = groups.weights[g]
        r0, r1 = int(groups.row_start[g]), int(groups.row_stop[g])
        chain_s = zero
        chain_t = zero
        if observed:
            for r in range(r0 + 1, r1):
                chain_s = chain_s + torch.log(probs[r, labels[r]])
            chain_t = chain_t + groups.teacher_chain[g]
        teacher_mass: dict[int, torch.Tensor] = {}
        unmatched_teacher = []
        entries = _row_entries(groups.topk_ids[g].tolist(), groups.topk_logprobs[g])
        for tid, logprob in entries:
            cls = int(vocab_map.teacher_class[tid])
            if has_student[cls]:
                teacher_mass[cls] = teacher_mass.get(cls, zero) + torch.exp(logprob.to(z.dtype))
            else:
                unmatched_teacher.append(torch.exp(ts * (logprob.to(z.dtype) + chain_t)))
        classes = sorted(teacher_mass)
        if classes:
            big_p = torch.stack([teacher_mass[c] for c in classes]) * torch.exp(chain_t)
            big_q = torch.stack(
                [probs[r0, torch.as_tensor((student_class == c).nonzero()[0])].sum() for c in classes]
            ) * torch.exp(chain_s)
            members = sum(int((student_class == c).sum()) for c in classes)
            if config.topk_normalization == "renormalize":
                p = big_p**ts / (big_p**ts).sum()
                q = big_q / big_q.sum()
            elif members < len(student_class):
                tail_p = torch.clamp(1 - big_p.sum(), min=TEACHER_TAIL_MIN_MASS)
                p = torch.cat([big_p, tail_p[None]]) ** ts
                p = p / p.sum()
                q = torch.cat([big_q, (1 - big_q.sum())[None]])
            else:
                p = big_p**ts / (big_p**ts).sum()
                q = big_q
            kd = kd + w * _divergence(p, q, config.effective_kd_loss, config.beta)
        k = len(entries)  # ULD compares the row's ranks
        p_sorted = sorted(unmatched_teacher, key=lambda v: -float(v.detach())) + [zero] * (k - len(unmatched_teacher))
        q_values = probs[r0, unmatched_student_ids] * torch.exp(chain_s) if unmatched_student_ids else zero[None][:0]
        q_sorted = list(torch.sort(q_values, descending=True).values[:k]) if len(q_values) else []
        q_sorted += [zero] * (k - len(q_sorted))
        uld = uld + w * sum(torch.abs(a - b) for a, b in zip(p_sorted, q_sorted))
    loss = zero
    if config.kd_loss_weight > 0:
        loss = loss + config.kd_loss_weight * config.kd_factor * kd
    if options.uld_loss_weight > 0:
        loss = loss + options.uld_loss_weight * uld
    if config.sft_loss_weight > 0:
        loss = loss + config.sft_loss_weight * sft
    return {"loss": loss, "kd": kd, "uld": uld, "sft": sft}


def _row_entries(row_ids: list[int], logprobs: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(id, log-prob) of a teacher row's entries: a variable row's padding (an earlier slot's id
    again, at -inf) is none."""
    return [(tid, logprob) for slot, (tid, logprob) in enumerate(zip(row_ids, logprobs))
            if not (tid in row_ids[:slot] and logprob == -math.inf)]
