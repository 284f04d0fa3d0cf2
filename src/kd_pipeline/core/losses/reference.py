"""Naive top-k KD + SFT loss on materialized [N, V] student logits: the executable spec.

Written from the definitions in `config.py` (docstring) and differentiated by autograd; it shares
no math with `fused.py`, which the tests compare against it in float64. Memory is several [N, V]
tensors, so it is also the "naive" baseline of `benchmarks/bench_loss.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kd_pipeline.core.losses.config import (
    IGNORE_INDEX,
    TEACHER_TAIL_MIN_MASS,
    KDLossConfig,
    LossOutput,
    check_loss_inputs,
)
from kd_pipeline.core.topk_store.codec import padding_slots


def topk_kd_loss_reference(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    labels: torch.Tensor | None,
    token_weights: torch.Tensor,
    config: KDLossConfig,
    *,
    teacher_logz: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
) -> LossOutput:
    """Computes the top-k KD + SFT loss from full student logits.

    Works in the logits' dtype promoted to at least float32 (pass float64 for a reference).

    Args:
        student_logits: (N, V) float, unscaled student logits.
        topk_ids: (N, K) int64 teacher top-k ids; None allowed when `kd_loss_weight == 0`.
        topk_logprobs: (N, K) float teacher full-vocabulary log-probs of `topk_ids`.
        labels: (N,) int64 next-token ids, `IGNORE_INDEX` for none; None allowed when
            `sft_loss_weight == 0`.
        token_weights: (N,) float reduction weights; `loss = sum_i w_i * loss_i`.
        config: loss hyperparameters.
        teacher_logz: (N,) float `log sum_v p(v)**s` of the stored teacher distribution at
            `s = target_logits_scale` (needed by `tail_bucket` when `s != 1`).
        topk_weights: (N, K) sampled-estimator weights (`sampled` artifacts), or None.

    Returns:
        `LossOutput`; `loss` is differentiable w.r.t. `student_logits`.
    """
    num_tokens, vocab_size = student_logits.shape
    check_loss_inputs(
        num_tokens, vocab_size, topk_ids, topk_logprobs, labels, token_weights, config,
        teacher_logz, topk_weights,
    )
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    unscaled = student_logits.to(dtype)
    scaled = config.logits_scale * unscaled
    weights = token_weights.to(dtype)
    nan = torch.tensor(math.nan, dtype=dtype, device=unscaled.device)
    weight_sum = weights.sum()

    kd = sft = coverage = student_mass = nan
    loss = torch.zeros((), dtype=dtype, device=unscaled.device)
    if labels is not None:
        sft_logits = scaled if config.scale_sft_logits else unscaled
        sft_per_token = F.cross_entropy(
            sft_logits, labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        sft = _weighted_sum(weights, sft_per_token)
        if config.sft_loss_weight > 0:
            loss = loss + config.sft_loss_weight * sft
    if topk_ids is not None:
        teacher = topk_logprobs.to(dtype)
        logz = None if teacher_logz is None else teacher_logz.to(dtype)
        if topk_weights is None:
            log_p, log_q = _bucket_logprobs(scaled, topk_ids, teacher, logz, config)
            kd_per_token = _divergence(log_p, log_q, config.effective_kd_loss, config.beta)
        else:
            kd_per_token = _sampled_estimate(scaled, topk_ids, teacher, logz, topk_weights.to(dtype), config)
        kd = _weighted_sum(weights, kd_per_token)
        if config.kd_loss_weight > 0:
            loss = loss + config.kd_loss_weight * config.kd_factor * kd
        in_topk = torch.zeros_like(unscaled, dtype=torch.bool).scatter(1, topk_ids, True)
        mass = (unscaled.softmax(-1) * in_topk).sum(-1)
        coverage = _weighted_mean(weights, teacher.exp().sum(-1), weight_sum)
        student_mass = _weighted_mean(weights, mass, weight_sum)
    return LossOutput(
        loss=loss,
        kd=kd.detach(),
        sft=sft.detach(),
        teacher_coverage=coverage.detach(),
        student_topk_mass=student_mass.detach(),
        weight_sum=weight_sum.detach(),
    )


def _bucket_logprobs(
    scaled_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_logz: torch.Tensor | None,
    config: KDLossConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probs over the buckets the divergence compares.

    Returns:
        (log_p, log_q), each (N, K) for `renormalize` or (N, K+1) for `tail_bucket`.
    """
    target_scale = config.target_logits_scale
    padding = padding_slots(topk_ids, teacher_logprobs)  # variable rows' padding: no bucket
    if config.topk_normalization == "renormalize":
        log_q = scaled_logits.gather(1, topk_ids).masked_fill(padding, -math.inf).log_softmax(-1)
        log_p = (target_scale * teacher_logprobs).log_softmax(-1)
        return log_p, log_q

    log_q_vocab = scaled_logits.log_softmax(-1)
    in_topk = torch.zeros_like(log_q_vocab, dtype=torch.bool).scatter(1, topk_ids, True)
    tail_nonempty = (~in_topk).any(-1)
    # Rows whose ids cover the vocabulary have no tail: give logsumexp a dummy finite row there
    # (its result is discarded by the where) so that autograd does not produce 0 * nan.
    tail_terms = log_q_vocab.masked_fill(in_topk, -math.inf).where(tail_nonempty[:, None], 0.0)
    log_q_tail = torch.where(tail_nonempty, tail_terms.logsumexp(-1), -math.inf)
    log_q = torch.cat([log_q_vocab.gather(1, topk_ids).masked_fill(padding, -math.inf), log_q_tail[:, None]], dim=-1)

    # Exact tempered teacher: p_s = p**s / Z_s over the full vocabulary, known on the K ids.
    tempered = target_scale * teacher_logprobs
    if teacher_logz is not None:
        tempered = tempered - teacher_logz[:, None]
    teacher_tail = (1 - tempered.exp().sum(-1)).clamp_min(TEACHER_TAIL_MIN_MASS)
    log_teacher_tail = torch.where(tail_nonempty, teacher_tail.log(), -math.inf)
    log_p = torch.cat([tempered, log_teacher_tail[:, None]], -1).log_softmax(-1)
    return log_p, log_q


def _sampled_estimate(scaled_logits: torch.Tensor, topk_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                      teacher_logz: torch.Tensor | None, estimator: torch.Tensor, config: KDLossConfig) -> torch.Tensor:
    """(N,) `sum_k w_k (log p_s(k) - log_softmax(z)(k))`: the sampled estimate of KL(p_s || q)."""
    log_p = config.target_logits_scale * teacher_logprobs
    if teacher_logz is not None:
        log_p = log_p - teacher_logz[:, None]
    log_q = scaled_logits.log_softmax(-1).gather(1, topk_ids)
    return torch.where(estimator != 0, estimator * (log_p - log_q), 0.0).sum(-1)


def _divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Per-token divergence between teacher `p` and student `q` (both (N, B) log-probs).

    Uses 0 * log(0 / x) = 0; the `where` is applied to the log-ratio before the product so that
    buckets with zero probability get zero (not NaN) gradients.
    """
    p, q = log_p.exp(), log_q.exp()
    if kind == "fwd_kl":
        return _kl(p, log_p, log_q)
    if kind == "bwd_kl":
        return _kl(q, log_q, log_p)
    mixture = beta * p + (1 - beta) * q
    log_mixture = torch.where(mixture > 0, mixture, 1.0).log()
    return beta * _kl(p, log_p, log_mixture) + (1 - beta) * _kl(q, log_q, log_mixture)


def _kl(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_b a_b * (log a_b - log b_b) over the last dim, with 0 where a_b == 0."""
    log_ratio = torch.where(a > 0, log_a - log_b, 0.0)
    return (a * log_ratio).sum(-1)


def _weighted_sum(weights: torch.Tensor, per_token: torch.Tensor) -> torch.Tensor:
    # Zero-weight (padding) rows contribute exactly 0 even if their value is not finite.
    return torch.where(weights != 0, weights * per_token, 0.0).sum()


def _weighted_mean(weights: torch.Tensor, values: torch.Tensor, weight_sum: torch.Tensor) -> torch.Tensor:
    total = _weighted_sum(weights, values)
    return torch.where(weight_sum != 0, total / torch.where(weight_sum != 0, weight_sum, 1.0), 0.0)
