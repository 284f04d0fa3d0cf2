"""One chunk of the fused top-k KD + SFT loss: the [C, V] logits of C tokens, their per-token
losses and the analytic gradient w.r.t. the raw logits, computed in one reused buffer of the
input dtype, with the elementwise work done in float32 on blocks of rows (`BLOCK_ELEMENTS`).

`fused.py` runs `chunk_step` over the token chunks and turns each chunk's logits gradient into
the gradients of the hidden states and the lm_head. Semantics: `config.py`; the float64
reference it is tested against: `reference.py`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from kd_pipeline.core.losses.config import (
    IGNORE_INDEX,
    TEACHER_TAIL_MIN_MASS,
    KDLossConfig,
)
from kd_pipeline.core.models.head import HeadTransform
from kd_pipeline.core.topk_store.codec import first_occurrence, padding_given_first_slots

IDENTITY_HEAD = HeadTransform()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 for bf16/fp16/fp32 inputs, float64 stays float64 (gradcheck).
    return torch.promote_types(dtype, torch.float32)


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


LOG2E = 1.0 / math.log(2.0)

BLOCK_ELEMENTS = 1 << 22
"""The elementwise passes over a chunk's [C, V] bf16 logits run on blocks of rows of at most
this many values (16 MiB in float32), widened into one reused scratch buffer: a block stays in
the cache (32 MiB L3 here) through its six or seven passes, so only the widening read and the
gradient's write-back touch memory, and the chunk's own buffer stays in bf16."""


def block_rows(rows: int, vocab_size: int) -> int:
    """Rows per elementwise block of a chunk of `rows` rows: the fewest blocks within
    BLOCK_ELEMENTS, of equal size (a chunk of 64 rows is one block, not 42 + 22)."""
    most = max(1, BLOCK_ELEMENTS // max(vocab_size, 1))
    blocks = -(-rows // most)
    return max(1, -(-rows // max(blocks, 1)))


def needs_scratch(dtype: torch.dtype, head: HeadTransform, config: KDLossConfig) -> bool:
    """Whether a chunk's two passes need the float32 block scratch and recompute exp(z - shift)
    in the second: when the logits buffer is narrower than the compute dtype (bf16), or the
    gradient needs the logits again (the head's soft-cap slope, SFT on the unscaled logits).
    Otherwise (float32 / float64, plain head) the buffer itself holds exp(z - shift) between the
    passes, as one block: no copy, no second exp, no scratch."""
    sft_on_scaled = config.scale_sft_logits or config.logits_scale == 1.0
    return compute_dtype(dtype) != dtype or not head.is_identity or not sft_on_scaled


class ChunkBuffers(NamedTuple):
    """Flat buffers that every chunk of one loss call reuses, sized for the largest chunk.

    On CPU a fresh [C, V] tensor per chunk is a fresh mmap (glibc serves blocks this large from
    the kernel and returns them on free), and its page faults and zeroing cost about as much as
    an elementwise pass over it; reused, each chunk's buffers are already resident.
    """

    logits: torch.Tensor  # (C*V,) input dtype: the GEMM's logits, then their gradient
    scratch: torch.Tensor | None  # (R*V,) compute dtype: one block of R rows (`needs_scratch`)

    @classmethod
    def allocate(cls, rows: int, vocab_size: int, dtype: torch.dtype, device, scratch: bool,
                 block: int | None = None) -> "ChunkBuffers":
        block = block_rows(rows, vocab_size) if block is None else block
        scratch_buffer = (torch.empty(block * vocab_size, dtype=compute_dtype(dtype), device=device)
                          if scratch else None)
        return cls(torch.empty(rows * vocab_size, dtype=dtype, device=device), scratch_buffer)


def _vocab_major(hidden: torch.Tensor) -> bool:
    # MKL's float32/float64 GEMMs compute (V, H) @ (H, C) 10-20% faster than (C, H) @ (H, V) at
    # C = 64-128 (it packs the large operand differently), and the later `grad_weight.addmm_`
    # then reads the gradient as a contiguous (V, C) matrix. oneDNN's bf16 GEMMs show no such
    # asymmetry, and the row-major layout makes each block of rows contiguous, which the
    # elementwise passes run 1.5x faster on. On GPU the row-major layout is kept (no asymmetry).
    return hidden.device.type == "cpu" and hidden.dtype in (torch.float32, torch.float64)


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(C, V) logits of a chunk; for float CPU inputs a transposed view of a vocabulary-major
    (V, C) buffer (`_vocab_major`). `out`: a flat buffer of the input dtype with room for C*V
    values, written instead of a new one."""
    rows, vocab_size = hidden.shape[0], weight.shape[0]
    if not _vocab_major(hidden):
        out = None if out is None else out[: rows * vocab_size].view(rows, vocab_size)
        if bias is None:
            return torch.mm(hidden, weight.t(), out=out)
        return torch.addmm(bias, hidden, weight.t(), out=out)
    out = None if out is None else out[: rows * vocab_size].view(vocab_size, rows)
    if bias is None:
        return torch.mm(weight, hidden.t(), out=out).t()
    return torch.addmm(bias.unsqueeze(1), weight, hidden.t(), out=out).t()


def _dense_like(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A dense (n, V) view of the front of `flat` in the memory order of the (n, V) `like`."""
    rows, vocab_size = like.shape
    strides = (vocab_size, 1) if like.stride(1) == 1 else (1, rows)
    return flat[: rows * vocab_size].as_strided((rows, vocab_size), strides)


def _row_blocks(logits: torch.Tensor, scratch: torch.Tensor | None):
    """Yields (rows, block, widened): each block of rows of `logits` and a copy of it in the
    compute dtype, in `scratch` (overwritten by the next block); without a scratch, the whole
    of `logits` as one block, in place."""
    num_rows, vocab_size = logits.shape
    if scratch is None:
        yield slice(0, num_rows), logits, logits
        return
    step = max(1, scratch.numel() // vocab_size)
    for start in range(0, num_rows, step):
        rows = slice(start, min(start + step, num_rows))
        block = logits[rows]
        yield rows, block, _dense_like(scratch, block).copy_(block)


def _exp_shifted_(values: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """values <- exp(values - shift[:, None]) in place.

    As exp2 of the log2(e)-scaled difference: ATen's float exp runs through MKL VML here, 4x
    slower than the vectorized exp2; subtracting first keeps the rounding of the product
    relative to `values - shift` (1 ulp each of the product and of exp2, vs 1 ulp of exp).
    """
    return values.sub_(shift.unsqueeze(1)).mul_(LOG2E).exp2_()


class _Plan(NamedTuple):
    """Which elementwise work a chunk needs, from the config and the inputs present."""

    scale: float  # logits_scale: z = scale * u
    sft_on_scaled: bool  # SFT on the scaled logits (scale_sft_logits, or scale == 1)
    tail_mode: bool  # tail_bucket top-k targets: the partition of the entries outside the ids
    unscaled_lse: bool  # the T = 1 log-partition is needed (the metric, SFT without scaling)

    @classmethod
    def of(cls, config: KDLossConfig, has_kd: bool, has_sft: bool, sampled: bool) -> "_Plan":
        scale = config.logits_scale
        # SFT on the unscaled logits needs a second softmax; when scale == 1 both are the same.
        sft_on_scaled = config.scale_sft_logits or scale == 1.0
        tail_mode = has_kd and config.topk_normalization == "tail_bucket" and not sampled  # sampled: no tail
        unscaled_lse = scale != 1.0 and (has_kd or (has_sft and not sft_on_scaled))
        return cls(scale, sft_on_scaled, tail_mode, unscaled_lse)


class _LogitReads(NamedTuple):
    """What the chunk step reads from the (head-transformed, unscaled) logits."""

    topk_logits: torch.Tensor | None  # (C, K) unscaled logits at the teacher ids
    first_slot: torch.Tensor | None  # (C, K) bool, first slot of each distinct id
    label_valid: torch.Tensor | None  # (C,) bool, label != IGNORE_INDEX
    safe_labels: torch.Tensor | None  # (C, 1) labels with IGNORE_INDEX replaced by 0
    label_logits: torch.Tensor | None  # (C,) unscaled logit of the label


class _Partition(NamedTuple):
    """Log-partitions of a chunk's scaled logits `z`."""

    scaled_lse: torch.Tensor  # (C,) logsumexp(z) over the vocabulary
    exp_sum: torch.Tensor  # (C,) sum of exp(z - shift) over the entries partitioned (tail: outside the ids)
    shift: torch.Tensor  # (C,) their max, 0 where there are none
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


class _GradTerms(NamedTuple):
    """d loss / d z of a chunk, in row terms: row_coef * exp(z - shift) on the partitioned
    entries, top-k entries set to topk_value (tail mode), plus topk_add at the ids and label_add
    at the label; SFT without scaling adds unscaled_coef * (softmax(u) - onehot(label))."""

    row_coef: torch.Tensor  # (C,)
    topk_value: torch.Tensor | None  # (C, K)
    topk_add: torch.Tensor | None  # (C, K)
    label_add: torch.Tensor | None  # (C,)
    unscaled_coef: torch.Tensor | None  # (C,)
    unscaled_lse: torch.Tensor | None  # (C,)

    def rows(self, rows: slice) -> "_GradTerms":
        return _GradTerms(*(None if value is None else value[rows] for value in self))


def _scan_block(
    widened: torch.Tensor,
    topk_ids: torch.Tensor | None,
    safe_labels: torch.Tensor | None,
    head: HeadTransform,
    plan: _Plan,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The reads and the log-partition of one block of rows (consumes `widened`).

    Returns (topk_logits, label_logits, unscaled_lse, shift, exp_sum) of its rows. Tail mode
    partitions only the entries outside the ids (set to -inf), shifted by their own max, so
    neither part underflows.
    """
    if not head.is_identity:
        head.apply_(widened)
    topk_logits = None if topk_ids is None else widened.gather(1, topk_ids)
    label_logits = None if safe_labels is None else widened.gather(1, safe_labels).squeeze(1)
    unscaled_lse = torch.logsumexp(widened, dim=1) if plan.unscaled_lse else None
    if plan.scale != 1.0:
        widened.mul_(plan.scale)
    if plan.tail_mode:
        widened.scatter_(1, topk_ids, -math.inf)
    row_max = widened.amax(dim=1)  # tail mode: -inf when the ids cover the vocabulary
    shift = torch.where(torch.isfinite(row_max), row_max, 0.0)
    exp_sum = _exp_shifted_(widened, shift).sum(dim=1)
    return topk_logits, label_logits, unscaled_lse, shift, exp_sum


def _scan_chunk(logits, scratch, topk_ids, safe_labels, head, plan):
    """`_scan_block` over the blocks of rows of `logits`, joined; None stays None."""
    parts = []
    for rows, _, widened in _row_blocks(logits, scratch):
        parts.append(_scan_block(widened, None if topk_ids is None else topk_ids[rows],
                                 None if safe_labels is None else safe_labels[rows], head, plan))
    return [None if values[0] is None else torch.cat(values) for values in zip(*parts)]


def _partition(
    shift: torch.Tensor,
    exp_sum: torch.Tensor,
    scaled_topk: torch.Tensor | None,
    first_slot: torch.Tensor | None,
    tail_mode: bool,
) -> _Partition:
    lse = shift + exp_sum.log()  # tail mode: of the tail, -inf when it is empty
    if not tail_mode:
        return _Partition(lse, exp_sum, shift, None, None)
    topk_lse = scaled_topk.masked_fill(~first_slot, -math.inf).logsumexp(dim=1)
    return _Partition(torch.logaddexp(lse, topk_lse), exp_sum, shift, lse, exp_sum > 0)


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


def _coverage_and_mass(
    reads: _LogitReads, unscaled_lse: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sums of the teacher's top-k mass and of the student's (T = 1) mass on the ids."""
    coverage_sum = _weighted_sum(weights, teacher.exp().sum(1))
    unique_topk_lse = reads.topk_logits.masked_fill(~reads.first_slot, -math.inf).logsumexp(dim=1)
    return coverage_sum, _weighted_sum(weights, (unique_topk_lse - unscaled_lse).exp())


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
    coverage_sum, mass_sum = _coverage_and_mass(reads, unscaled_lse, teacher, weights)
    log_p = _teacher_bucket_logprobs(teacher, teacher_logz, part.tail_nonempty, config)
    student_topk = scaled_topk.masked_fill(padding_given_first_slots(reads.first_slot, teacher), -math.inf)
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
    coverage_sum, mass_sum = _coverage_and_mass(reads, unscaled_lse, teacher, weights)
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


def _grad_terms(
    part: _Partition,
    scaled_topk: torch.Tensor | None,
    kd: _KDTerms | None,
    grad_scaled_lse: torch.Tensor,
    sft_coef: torch.Tensor | None,
    unscaled_lse: torch.Tensor,
    plan: _Plan,
) -> _GradTerms:
    """d loss / d z = grad_scaled_lse * softmax(z) [+ grad_tail_lse * softmax_tail(z)]
                      + scatter(grad_topk at ids) - scatter(sft_coef at label), in row terms."""
    topk_value = None
    if part.tail_lse is not None:
        # softmax(z)_v = exp(z_v - shift) / exp_sum * Q_tail on the tail, with
        # Q_tail = exp(tail_lse - lse) <= 1, and softmax_tail(z)_v = exp(z_v - shift) / exp_sum.
        tail_coef = grad_scaled_lse * (part.tail_lse - part.scaled_lse).exp()
        if kd is not None and kd.grad_tail_lse is not None:
            tail_coef = tail_coef + kd.grad_tail_lse
        row_coef = tail_coef / torch.where(part.tail_nonempty, part.exp_sum, 1.0)
        topk_value = grad_scaled_lse[:, None] * (scaled_topk - part.scaled_lse[:, None]).exp()
    else:
        row_coef = grad_scaled_lse / part.exp_sum
    topk_add = None if kd is None else kd.grad_topk
    on_scaled = sft_coef is not None and plan.sft_on_scaled
    unscaled = sft_coef is not None and not plan.sft_on_scaled
    return _GradTerms(row_coef, topk_value, topk_add, -sft_coef if on_scaled else None,
                      sft_coef if unscaled else None, unscaled_lse if unscaled else None)


def _grad_block(
    widened: torch.Tensor,
    topk_ids: torch.Tensor | None,
    safe_labels: torch.Tensor | None,
    head: HeadTransform,
    plan: _Plan,
    shift: torch.Tensor,
    terms: _GradTerms,
    recompute: bool,
) -> torch.Tensor:
    """d loss / d raw logits of one block of rows, in place in `widened`.

    With `recompute`, `widened` holds the block's raw logits and its exp(z - shift) is computed
    again (cheaper than keeping a [C, V] float32 copy of the chunk: the block is in the cache);
    otherwise it holds exp(z - shift) already (`needs_scratch`). Then `terms` are applied, and
    the chain rule through the scale (z = scale * u) and the head transform.
    """
    slope = unscaled = None
    if recompute:
        if not head.is_identity:
            head.apply_(widened)
            slope = head.softcap_slope(widened)  # a (rows, V) temporary, soft-capped models only
        unscaled = None if terms.unscaled_coef is None else widened.clone()
        if plan.scale != 1.0:
            widened.mul_(plan.scale)
        if plan.tail_mode:
            widened.scatter_(1, topk_ids, -math.inf)
        _exp_shifted_(widened, shift)
    widened.mul_(terms.row_coef.unsqueeze(1))
    if terms.topk_value is not None:  # top-k entries are 0: assignment counts duplicates once
        widened.scatter_(1, topk_ids, terms.topk_value)
    if terms.topk_add is not None:
        widened.scatter_add_(1, topk_ids, terms.topk_add)
    if terms.label_add is not None:
        widened.scatter_add_(1, safe_labels, terms.label_add[:, None])
    if plan.scale != 1.0:
        widened.mul_(plan.scale)
    if unscaled is not None:
        coef = terms.unscaled_coef.unsqueeze(1)
        _exp_shifted_(unscaled, terms.unscaled_lse).mul_(coef).scatter_add_(1, safe_labels, -coef)
        widened.add_(unscaled)
    if slope is not None:
        widened.mul_(slope)
    if head.linear_factor != 1.0:
        widened.mul_(head.linear_factor)
    return widened


def _id_reads(topk_ids: torch.Tensor | None, labels: torch.Tensor | None):
    """(first_slot, label_valid, safe_labels): what the chunk needs from the ids alone."""
    first_slot = None if topk_ids is None else first_occurrence(topk_ids)
    if labels is None:
        return first_slot, None, None
    label_valid = labels != IGNORE_INDEX
    return first_slot, label_valid, torch.where(label_valid, labels, 0).unsqueeze(1)


def _chunk_sums(
    reads: _LogitReads,
    scaled_topk: torch.Tensor | None,
    part: _Partition,
    unscaled_lse: torch.Tensor,
    topk_logprobs: torch.Tensor | None,
    teacher_logz: torch.Tensor | None,
    topk_weights: torch.Tensor | None,
    weights: torch.Tensor,
    kd_coef: torch.Tensor | None,
    sft_coef: torch.Tensor | None,
    config: KDLossConfig,
    plan: _Plan,
) -> tuple[torch.Tensor, _KDTerms | None, torch.Tensor]:
    """(sums, KD terms, d loss / d scaled_lse) of a chunk; sums as in `chunk_step`."""
    sums = torch.zeros(5, dtype=torch.float64, device=weights.device)
    sums[4] = weights.sum()
    grad_scaled_lse = torch.zeros_like(part.scaled_lse)
    kd = None
    if scaled_topk is not None:
        kd = _kd_terms(reads, scaled_topk, part, unscaled_lse, topk_logprobs, teacher_logz, weights,
                       kd_coef, config, topk_weights)
        sums[0], sums[2], sums[3] = kd.kd_sum, kd.coverage_sum, kd.mass_sum
        if kd.grad_scaled_lse is not None:
            grad_scaled_lse = grad_scaled_lse + kd.grad_scaled_lse
    if reads.label_logits is not None:
        sft_logits = reads.label_logits * plan.scale if plan.sft_on_scaled else reads.label_logits
        per_token = (part.scaled_lse if plan.sft_on_scaled else unscaled_lse) - sft_logits
        sums[1] = _weighted_sum(weights, torch.where(reads.label_valid, per_token, 0.0))
        if sft_coef is not None and plan.sft_on_scaled:
            grad_scaled_lse = grad_scaled_lse + sft_coef
    return sums, kd, grad_scaled_lse


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

    The [C, V] logits are computed in the input dtype, then read twice block by block of rows
    (`_row_blocks`): once for the log-partitions and the reads, once for the gradient, which
    overwrites them (`needs_scratch`: without a scratch, in place in one block). Without
    `buffers` a pure function of its inputs (it allocates its own, one block), so it can be
    wrapped in `torch.compile`; with them the returned gradient is a view of `buffers.logits`,
    valid until the next chunk. Shapes as in `fused_topk_kd_loss`, with C rows.

    Returns:
        (grad_logits, sums): grad_logits is (C, V) in the input dtype (d loss / d raw logits
        `hidden @ weight.T + bias`, through the head transform, already weighted) or None; sums
        is (5,) float64:
        [sum w*KD, sum w*SFT, sum w*coverage, sum w*student_topk_mass, sum w].
    """
    has_kd, has_sft = topk_ids is not None, labels is not None
    plan = _Plan.of(config, has_kd, has_sft, topk_weights is not None)
    weights = token_weights.to(compute_dtype(hidden.dtype))
    first_slot, label_valid, safe_labels = _id_reads(topk_ids, labels)
    kd_coef = sft_coef = None
    if compute_grad and has_kd and config.kd_loss_weight > 0:
        kd_coef = weights * (config.kd_loss_weight * config.kd_factor)
    if compute_grad and has_sft and config.sft_loss_weight > 0:
        sft_coef = torch.where(label_valid, weights * config.sft_loss_weight, 0.0)
    if buffers is None:
        buffers = ChunkBuffers.allocate(hidden.shape[0], weight.shape[0], hidden.dtype, hidden.device,
                                        needs_scratch(hidden.dtype, head, config), block=hidden.shape[0])
    logits = _chunk_logits(hidden, weight, bias, out=buffers.logits)

    topk_logits, label_logits, unscaled_lse, shift, exp_sum = _scan_chunk(
        logits, buffers.scratch, topk_ids, safe_labels, head, plan)
    reads = _LogitReads(topk_logits, first_slot, label_valid, safe_labels, label_logits)
    scaled_topk = topk_logits * plan.scale if has_kd else None
    part = _partition(shift, exp_sum, scaled_topk, first_slot, plan.tail_mode)
    if unscaled_lse is None:
        unscaled_lse = part.scaled_lse
    sums, kd, grad_scaled_lse = _chunk_sums(reads, scaled_topk, part, unscaled_lse, topk_logprobs,
                                            teacher_logz, topk_weights, weights, kd_coef, sft_coef,
                                            config, plan)
    if not compute_grad:
        return None, sums

    terms = _grad_terms(part, scaled_topk, kd, grad_scaled_lse, sft_coef, unscaled_lse, plan)
    recompute = buffers.scratch is not None
    for rows, block, widened in _row_blocks(logits, buffers.scratch):
        grad = _grad_block(widened, None if topk_ids is None else topk_ids[rows],
                           None if safe_labels is None else safe_labels[rows], head, plan,
                           part.shift[rows], terms.rows(rows), recompute)
        if recompute:
            block.copy_(grad)  # rounded to the input dtype for the two gradient GEMMs
    return logits, sums
