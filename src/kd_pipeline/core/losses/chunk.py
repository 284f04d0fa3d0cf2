"""One chunk of the fused top-k KD + SFT loss: the [C, V] logits of C tokens, their per-token
losses and the analytic gradient w.r.t. the raw logits, computed in one reused buffer.

`fused.py` runs `chunk_step` over the token chunks and turns each chunk's logits gradient into
the gradients of the hidden states and the lm_head. Semantics: `config.py`; the float64
reference it is tested against: `reference.py`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kd_pipeline.core.losses.config import (
    IGNORE_INDEX,
    TEACHER_TAIL_MIN_MASS,
    KDLossConfig,
)
from kd_pipeline.core.models.head import HeadTransform

IDENTITY_HEAD = HeadTransform()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 for bf16/fp16/fp32 inputs, float64 stays float64 (gradcheck).
    return torch.promote_types(dtype, torch.float32)


def _first_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """(C, K) bool, True for the first slot holding each distinct id of a row.

    Duplicate ids only come from degenerate rows (e.g. padding), but the full-vocabulary
    log-partition must count each vocabulary entry once.
    """
    sorted_ids, order = ids.sort(dim=1)
    is_new = torch.ones_like(ids, dtype=torch.bool)
    is_new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    return torch.empty_like(is_new).scatter_(1, order, is_new)


def _padding_slots(first_slot: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """(C, K) bool: padding of a variable row, a repeated id whose teacher log-prob is -inf
    (`config.py`); no bucket on either side."""
    return ~first_slot & (teacher_logprobs == -math.inf)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012, "Accurately
    Computing log(1 - exp(-|a|))")."""
    near_zero = x > -math.log(2.0)
    return torch.where(
        near_zero,
        torch.log(-torch.expm1(x.clamp_max(0.0))),
        torch.log1p(-torch.exp(x.where(~near_zero, -1.0))),
    )


def _teacher_tail_logmass(teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """(C,) log(max(1 - sum_k exp(l_k), TEACHER_TAIL_MIN_MASS)).

    The top term is split off the log-sum-exp and the rest goes through log1p, so that a tail
    of 1e-6 next to a top-1 probability of ~1 keeps its relative precision in float32.
    """
    top, top_slot = teacher_logprobs.max(dim=1, keepdim=True)  # (C, 1)
    safe_top = torch.where(torch.isfinite(top), top, 0.0)
    rest = teacher_logprobs.scatter(1, top_slot, -math.inf)
    log_mass = top.squeeze(1) + torch.log1p((rest - safe_top).exp().sum(1))
    return _log1mexp(log_mass.clamp_max(0.0)).clamp_min(math.log(TEACHER_TAIL_MIN_MASS))


def _divergence_and_grad(
    log_p: torch.Tensor, log_q: torch.Tensor, kind: str, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token divergence and its gradient w.r.t. the student bucket log-probs `log_q`.

    With q = exp(log_q) treated as a function of log_q:
      fwd_kl  sum p (log p - log q)                      d/dlog_q = -p
      bwd_kl  sum q (log q - log p)                      d/dlog_q = q (log q - log p + 1)
      jsd     b KL(p||m) + (1-b) KL(q||m), m = b p + (1-b) q
                                                         d/dlog_q = (1-b) q (log q - log m)
    (for jsd the terms through m cancel because sum_b d m_b = 0 weighted by p/m and q/m).

    Args:
        log_p: (C, B) teacher bucket log-probs (may hold -inf).
        log_q: (C, B) student bucket log-probs (may hold -inf).
        kind: `fwd_kl`, `bwd_kl` or `jsd` (endpoints already resolved).
        beta: jsd teacher weight in (0, 1).

    Returns:
        (per_token (C,), grad_log_q (C, B)).
    """
    p, q = log_p.exp(), log_q.exp()
    if kind == "fwd_kl":
        per_token = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(1)
        return per_token, -p
    if kind == "bwd_kl":
        log_ratio = torch.where(q > 0, log_q - log_p, 0.0)
        return (q * log_ratio).sum(1), q * (log_ratio + 1.0)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    teacher_term = torch.where(p > 0, p * (log_p - log_m), 0.0).sum(1)
    student_log_ratio = torch.where(q > 0, log_q - log_m, 0.0)
    per_token = beta * teacher_term + (1.0 - beta) * (q * student_log_ratio).sum(1)
    return per_token, (1.0 - beta) * q * student_log_ratio


def _weighted_sum(weights: torch.Tensor, per_token: torch.Tensor) -> torch.Tensor:
    # Zero-weight (padding) rows contribute exactly 0 even if their value is not finite.
    return torch.where(weights != 0, weights * per_token, 0.0).sum()


def _scale_rows(coef: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """coef[:, None] * values, exactly 0 on rows with coef == 0 (padding may be non-finite)."""
    coef = coef.unsqueeze(1) if values.dim() == 2 else coef
    return torch.where(coef != 0, coef * values, 0.0)


class ChunkBuffers(NamedTuple):
    """Flat buffers that every chunk of one loss call reuses, sized for the largest chunk.

    On CPU a fresh [C, V] tensor per chunk is a fresh mmap (glibc serves blocks this large from
    the kernel and returns them on free), and its page faults and zeroing cost about as much as
    an elementwise pass over it; reused, each chunk's buffers are already resident.
    """

    work: torch.Tensor  # (C*V,) compute dtype: the logits, then exp-shifted, then their gradient
    gemm: torch.Tensor | None  # (C*V,) input dtype when it is not the compute dtype (bf16): the
    # GEMM's logits, later the gradient rounded for the two gradient GEMMs

    @classmethod
    def allocate(cls, rows: int, vocab_size: int, dtype: torch.dtype, device) -> "ChunkBuffers":
        size = rows * vocab_size
        work_dtype = compute_dtype(dtype)
        gemm = None if work_dtype == dtype else torch.empty(size, dtype=dtype, device=device)
        return cls(torch.empty(size, dtype=work_dtype, device=device), gemm)


def buffer_like(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A view of the front of `flat` with the shape and (dense) strides of `like`."""
    return flat.as_strided(like.shape, like.stride())


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(C, V) logits of a chunk; on CPU a transposed view of a vocabulary-major (V, C) buffer.

    For a few dozen rows, MKL computes (V, H) @ (H, C) about 1.5x faster than (C, H) @ (H, V)
    (it packs the large operand differently), and the later `grad_weight.addmm_` then reads the
    gradient as a contiguous (V, C) matrix. The elementwise steps work on either layout. On GPU
    the row-major layout is kept (cuBLAS has no such asymmetry; reductions stay row-contiguous).
    `out`: a flat buffer of the result dtype with room for C*V values, written instead of a new one.
    """
    rows, vocab_size = hidden.shape[0], weight.shape[0]
    if hidden.device.type != "cpu":
        if out is None:
            return F.linear(hidden, weight, bias)
        out = out[: rows * vocab_size].view(rows, vocab_size)
        if bias is None:
            return torch.mm(hidden, weight.t(), out=out)
        return torch.addmm(bias, hidden, weight.t(), out=out)
    out = None if out is None else out[: rows * vocab_size].view(vocab_size, rows)
    if bias is None:
        return torch.mm(weight, hidden.t(), out=out).t()
    return torch.addmm(bias.unsqueeze(1), weight, hidden.t(), out=out).t()


class _LogitReads(NamedTuple):
    """What the chunk step reads from the raw logits before the buffer is overwritten."""

    topk_logits: torch.Tensor | None  # (C, K) unscaled logits at the teacher ids
    first_slot: torch.Tensor | None  # (C, K) bool, first slot of each distinct id
    label_valid: torch.Tensor | None  # (C,) bool, label != IGNORE_INDEX
    safe_labels: torch.Tensor | None  # (C, 1) labels with IGNORE_INDEX replaced by 0
    label_logits: torch.Tensor | None  # (C,) unscaled logit of the label


class _Partition(NamedTuple):
    """Log-partitions of a chunk's scaled logits `z`; `work` then holds exp-shifted logits."""

    scaled_lse: torch.Tensor  # (C,) logsumexp(z) over the vocabulary
    exp_sum: torch.Tensor  # (C,) sum of the exp-shifted entries left in `work`
    tail_lse: torch.Tensor | None  # (C,) logsumexp of z outside the ids (tail mode), -inf if empty
    tail_nonempty: torch.Tensor | None  # (C,) bool (tail mode)


class _KDTerms(NamedTuple):
    """KD sums of a chunk and the gradient pieces they send back to the student logits."""

    kd_sum: torch.Tensor
    coverage_sum: torch.Tensor
    mass_sum: torch.Tensor
    grad_topk: torch.Tensor | None  # (C, K) d loss / d scaled top-k logits
    grad_tail_lse: torch.Tensor | None  # (C,) d loss / d tail_lse (tail mode)
    grad_scaled_lse: torch.Tensor | None  # (C,) d loss / d scaled_lse from the KD term


def _read_logits(work: torch.Tensor, topk_ids: torch.Tensor | None, labels: torch.Tensor | None) -> _LogitReads:
    topk_logits = first_slot = label_valid = safe_labels = label_logits = None
    if topk_ids is not None:
        topk_logits = work.gather(1, topk_ids)
        first_slot = _first_occurrence(topk_ids)
    if labels is not None:
        label_valid = labels != IGNORE_INDEX
        safe_labels = torch.where(label_valid, labels, 0).unsqueeze(1)
        label_logits = work.gather(1, safe_labels).squeeze(1)
    return _LogitReads(topk_logits, first_slot, label_valid, safe_labels, label_logits)


def _partition_in_place(
    work: torch.Tensor,
    topk_ids: torch.Tensor | None,
    scaled_topk: torch.Tensor | None,
    first_slot: torch.Tensor | None,
    tail_mode: bool,
) -> _Partition:
    """Full-vocabulary log-partition of the scaled logits in `work` (exp-shifted in place).

    Tail mode also needs the partition of the entries outside the top-k: the top-k entries are
    set to 0 and the tail is shifted by its own max, so neither part underflows.
    """
    if not tail_mode:
        row_max = work.amax(dim=1)
        work.sub_(row_max.unsqueeze(1)).exp_()  # exp(z - max)
        exp_sum = work.sum(dim=1)
        return _Partition(row_max + exp_sum.log(), exp_sum, None, None)
    work.scatter_(1, topk_ids, -math.inf)
    tail_max = work.amax(dim=1)  # -inf when the ids cover the vocabulary
    tail_nonempty = torch.isfinite(tail_max)
    tail_shift = torch.where(tail_nonempty, tail_max, 0.0)
    work.sub_(tail_shift.unsqueeze(1)).exp_()  # tail: exp(z - tail_max); top-k: 0
    exp_sum = work.sum(dim=1)
    tail_lse = tail_shift + exp_sum.log()  # -inf for an empty tail
    topk_lse = scaled_topk.masked_fill(~first_slot, -math.inf).logsumexp(dim=1)
    return _Partition(torch.logaddexp(tail_lse, topk_lse), exp_sum, tail_lse, tail_nonempty)


def _teacher_bucket_logprobs(
    teacher: torch.Tensor,
    teacher_logz: torch.Tensor | None,
    tail_nonempty: torch.Tensor | None,
    config: KDLossConfig,
) -> torch.Tensor:
    """(C, K) renormalized or (C, K+1) exact tempered teacher log-probs `s*l - log Z_s` + tail."""
    tempered = config.target_logits_scale * teacher
    if tail_nonempty is None:
        return tempered.log_softmax(1)  # log Z_s cancels
    if teacher_logz is not None:
        tempered = tempered - teacher_logz.to(teacher.dtype).unsqueeze(1)
    tail = torch.where(tail_nonempty, _teacher_tail_logmass(tempered), -math.inf)
    return torch.cat([tempered, tail[:, None]], 1).log_softmax(1)


def _kd_terms(
    reads: _LogitReads,
    scaled_topk: torch.Tensor,
    part: _Partition,
    unscaled_lse: torch.Tensor,
    topk_logprobs: torch.Tensor,
    teacher_logz: torch.Tensor | None,
    weights: torch.Tensor,
    kd_coef: torch.Tensor | None,
    config: KDLossConfig,
    topk_weights: torch.Tensor | None = None,
) -> _KDTerms:
    if topk_weights is not None:  # sampled targets: the importance-weighted estimator
        return _sampled_kd_terms(reads, scaled_topk, part, unscaled_lse, topk_logprobs, teacher_logz,
                                 topk_weights, weights, kd_coef, config)
    teacher = topk_logprobs.to(weights.dtype)
    coverage_sum = _weighted_sum(weights, teacher.exp().sum(1))
    unique_topk_lse = reads.topk_logits.masked_fill(~reads.first_slot, -math.inf).logsumexp(dim=1)
    mass_sum = _weighted_sum(weights, (unique_topk_lse - unscaled_lse).exp())
    log_p = _teacher_bucket_logprobs(teacher, teacher_logz, part.tail_nonempty, config)
    student_topk = scaled_topk.masked_fill(_padding_slots(reads.first_slot, teacher), -math.inf)
    if part.tail_lse is not None:
        log_q = torch.cat([student_topk, part.tail_lse[:, None]], 1) - part.scaled_lse[:, None]
    else:
        log_q = student_topk.log_softmax(1)
    per_token, grad_log_q = _divergence_and_grad(log_p, log_q, config.effective_kd_loss, config.beta)
    kd_sum = _weighted_sum(weights, per_token)
    if kd_coef is None:
        return _KDTerms(kd_sum, coverage_sum, mass_sum, None, None, None)
    grad_log_q = _scale_rows(kd_coef, grad_log_q)
    if part.tail_lse is not None:
        # log_q_k = z_k - lse, log_q_tail = tail_lse - lse.
        return _KDTerms(kd_sum, coverage_sum, mass_sum, grad_log_q[:, :-1], grad_log_q[:, -1],
                        -grad_log_q.sum(1))
    # log_q = log_softmax over the K slots: the Jacobian is (I - q 1^T).
    grad_topk = grad_log_q - log_q.exp() * grad_log_q.sum(1, keepdim=True)
    return _KDTerms(kd_sum, coverage_sum, mass_sum, grad_topk, None, None)


def _sampled_kd_terms(
    reads: _LogitReads,
    scaled_topk: torch.Tensor,
    part: _Partition,
    unscaled_lse: torch.Tensor,
    topk_logprobs: torch.Tensor,
    teacher_logz: torch.Tensor | None,
    topk_weights: torch.Tensor,
    weights: torch.Tensor,
    kd_coef: torch.Tensor | None,
    config: KDLossConfig,
) -> _KDTerms:
    """The sampled estimator (`config.py`): KD = sum_k w_k (log p_s(k) - log q(k)) with the
    full-vocabulary student `log q = z - lse`; d/d log q_k = -w_k, so d/dz = (sum w) softmax(z)
    - w at the ids (through `grad_scaled_lse` and `grad_topk`)."""
    teacher = topk_logprobs.to(weights.dtype)
    estimator = topk_weights.to(weights.dtype)
    coverage_sum = _weighted_sum(weights, teacher.exp().sum(1))
    unique_topk_lse = reads.topk_logits.masked_fill(~reads.first_slot, -math.inf).logsumexp(dim=1)
    mass_sum = _weighted_sum(weights, (unique_topk_lse - unscaled_lse).exp())
    log_p = config.target_logits_scale * teacher
    if teacher_logz is not None:
        log_p = log_p - teacher_logz.to(weights.dtype).unsqueeze(1)
    log_q = scaled_topk - part.scaled_lse[:, None]
    per_token = torch.where(estimator != 0, estimator * (log_p - log_q), 0.0).sum(1)
    kd_sum = _weighted_sum(weights, per_token)
    if kd_coef is None:
        return _KDTerms(kd_sum, coverage_sum, mass_sum, None, None, None)
    grad_topk = _scale_rows(kd_coef, -estimator)
    return _KDTerms(kd_sum, coverage_sum, mass_sum, grad_topk, None, -grad_topk.sum(1))


def _logits_grad_in_place(
    work: torch.Tensor,
    part: _Partition,
    topk_ids: torch.Tensor | None,
    scaled_topk: torch.Tensor | None,
    kd: _KDTerms | None,
    grad_scaled_lse: torch.Tensor,
    sft_scaled_coef: torch.Tensor | None,
    safe_labels: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Turns the exp-shifted `work` into d loss / d z, then d loss / d u (u = z / scale).

    d loss / d z = grad_scaled_lse * softmax(z) [+ grad_tail_lse * softmax_tail(z)]
                   + scatter(grad_topk at ids) - scatter(sft_coef at label)
    """
    if part.tail_lse is not None:
        # Tail entries of `work` hold exp(z - tail_max); softmax(z)_v = work_v / exp_sum * Q_tail
        # with Q_tail = exp(tail_lse - lse) <= 1, and softmax_tail(z)_v = work_v / exp_sum.
        tail_coef = grad_scaled_lse * (part.tail_lse - part.scaled_lse).exp()
        if kd is not None and kd.grad_tail_lse is not None:
            tail_coef = tail_coef + kd.grad_tail_lse
        safe_exp_sum = torch.where(part.tail_nonempty, part.exp_sum, 1.0)
        work.mul_((tail_coef / safe_exp_sum).unsqueeze(1))
        # Top-k entries are 0 in `work`; assignment (not add) counts duplicate ids once.
        topk_softmax = (scaled_topk - part.scaled_lse[:, None]).exp()
        work.scatter_(1, topk_ids, grad_scaled_lse[:, None] * topk_softmax)
    else:
        work.mul_((grad_scaled_lse / part.exp_sum).unsqueeze(1))
    if kd is not None and kd.grad_topk is not None:
        work.scatter_add_(1, topk_ids, kd.grad_topk)
    if sft_scaled_coef is not None:
        work.scatter_add_(1, safe_labels, -sft_scaled_coef[:, None])
    if scale != 1.0:
        work.mul_(scale)  # z = scale * u
    return work


def _apply_head_in_place(work: torch.Tensor, head: HeadTransform) -> torch.Tensor | None:
    """Raw logits -> the model's logits, in place (the model's own `HeadTransform.apply_`);
    returns the soft-cap's slope (a (C, V) buffer) for the backward, or None."""
    if head.is_identity:
        return None
    head.apply_(work)
    return head.softcap_slope(work)


def _head_backward_in_place(grad: torch.Tensor, head: HeadTransform, slope: torch.Tensor | None) -> torch.Tensor:
    """d loss / d u -> d loss / d r, the chain rule through `_apply_head_in_place`."""
    if slope is not None:
        grad.mul_(slope)
    if head.linear_factor != 1.0:
        grad.mul_(head.linear_factor)
    return grad


def chunk_step(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    teacher_logz: torch.Tensor | None,
    labels: torch.Tensor | None,
    token_weights: torch.Tensor,
    config: KDLossConfig,
    compute_grad: bool,
    head: HeadTransform = IDENTITY_HEAD,
    buffers: ChunkBuffers | None = None,
    topk_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Loss sums of one chunk and the gradient of the weighted loss w.r.t. its raw logits.

    Without `buffers` a pure function of its inputs (in-place ops touch only its own
    temporaries), so it can be wrapped in `torch.compile`; with them, the [C, V] work is done in
    `buffers` (the returned gradient is a view of `buffers.work`, valid until the next chunk).
    Shapes as in `fused_topk_kd_loss`, with C rows.

    Returns:
        (grad_logits, sums): grad_logits is (C, V) in the compute dtype (d loss / d raw logits
        `hidden @ weight.T + bias`, through the head transform, already weighted) or None; sums
        is (5,) float64:
        [sum w*KD, sum w*SFT, sum w*coverage, sum w*student_topk_mass, sum w].
    """
    scale = config.logits_scale
    has_kd, has_sft = topk_ids is not None, labels is not None
    # SFT on the unscaled logits needs a second softmax; when scale == 1 both are the same.
    sft_on_scaled = config.scale_sft_logits or scale == 1.0
    weights = token_weights.to(compute_dtype(hidden.dtype))
    kd_coef = sft_coef = None
    if compute_grad and has_kd and config.kd_loss_weight > 0:
        kd_coef = weights * (config.kd_loss_weight * config.kd_factor)

    # (C, V) buffer: logits, then exp-shifted logits, then the gradient, all in place.
    if buffers is None:
        work = _chunk_logits(hidden, weight, bias).to(weights.dtype)  # .to keeps the layout
    elif buffers.gemm is None:  # the GEMM computes in the compute dtype: straight into `work`
        work = _chunk_logits(hidden, weight, bias, out=buffers.work)
    else:
        logits = _chunk_logits(hidden, weight, bias, out=buffers.gemm)
        work = buffer_like(buffers.work, logits).copy_(logits)
    head_slope = _apply_head_in_place(work, head)
    reads = _read_logits(work, topk_ids, labels)
    if compute_grad and has_sft and config.sft_loss_weight > 0:
        sft_coef = torch.where(reads.label_valid, weights * config.sft_loss_weight, 0.0)
    unscaled_lse = unscaled_copy = None
    if scale != 1.0 and (has_kd or (has_sft and not sft_on_scaled)):
        # The metric (and SFT without scaling) use the T = 1 distribution.
        unscaled_lse = torch.logsumexp(work, dim=1)
        if sft_coef is not None and not sft_on_scaled:
            unscaled_copy = work.clone()
    if scale != 1.0:
        work.mul_(scale)
    scaled_topk = reads.topk_logits * scale if has_kd else None
    tail_mode = has_kd and config.topk_normalization == "tail_bucket" and topk_weights is None  # sampled: no tail
    part = _partition_in_place(work, topk_ids, scaled_topk, reads.first_slot, tail_mode)
    if unscaled_lse is None:
        unscaled_lse = part.scaled_lse

    sums = torch.zeros(5, dtype=torch.float64, device=hidden.device)
    sums[4] = weights.sum()
    grad_scaled_lse = torch.zeros_like(part.scaled_lse)
    kd = None
    if has_kd:
        kd = _kd_terms(reads, scaled_topk, part, unscaled_lse, topk_logprobs, teacher_logz, weights,
                       kd_coef, config, topk_weights)
        sums[0], sums[2], sums[3] = kd.kd_sum, kd.coverage_sum, kd.mass_sum
        if kd.grad_scaled_lse is not None:
            grad_scaled_lse = grad_scaled_lse + kd.grad_scaled_lse
    if has_sft:
        sft_logits = reads.label_logits * scale if sft_on_scaled else reads.label_logits
        per_token = (part.scaled_lse if sft_on_scaled else unscaled_lse) - sft_logits
        sums[1] = _weighted_sum(weights, torch.where(reads.label_valid, per_token, 0.0))
        if sft_coef is not None and sft_on_scaled:
            grad_scaled_lse = grad_scaled_lse + sft_coef
    if not compute_grad:
        return None, sums

    sft_scaled_coef = sft_coef if sft_on_scaled else None
    work = _logits_grad_in_place(work, part, topk_ids, scaled_topk, kd, grad_scaled_lse,
                                 sft_scaled_coef, reads.safe_labels, scale)
    if unscaled_copy is not None:
        unscaled_copy.sub_(unscaled_lse.unsqueeze(1)).exp_().mul_(sft_coef.unsqueeze(1))
        unscaled_copy.scatter_add_(1, reads.safe_labels, -sft_coef[:, None])
        work.add_(unscaled_copy)
    return _head_backward_in_place(work, head, head_slope), sums
