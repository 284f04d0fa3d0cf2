"""Cross-tokenizer KD + ULD + SFT loss on aligned spans, chunked over student rows.

Inputs are per *group* (`alignment.py`: the smallest teacher and student token runs that end on
the same byte) and per student row:

- The teacher side of group g is the stored top-k row of its first teacher token (ids in the
  teacher vocabulary, full-vocabulary log-probs `l_k`) and `teacher_chain[g]`, the sum of the
  stored realized log-probs (`target_logprobs`) of the group's later teacher tokens.
- The student side is its full distribution at the group's first student row and, for the
  chain, the log-probs of the realized labels of the group's later rows.

**Span merge** (`span_merge`):

- `observed` (default, GOLD's `uld_token_merge_strategy="observed"`): each side's row is
  multiplied by the probability of its realized continuation chain, `exp(chain)`. The realized
  first token then carries exactly the probability of the whole span's text; the other entries
  are scaled by the same factor (the approximation: "had another token come first, the
  continuation would have been as likely"), so the rows are unnormalized and the missing
  `1 - exp(chain) * mass` is probability of leaving the span.
- `first_token`: no chain, the two next-token distributions at the span start are compared as
  they are. The alternative GOLD offers, `bayesian` (the *last* position's distribution times
  the earlier tokens' probabilities), needs the teacher's distribution at the last position,
  which the artifact does have, but its events ("the span ends with x") are not those of the
  student's first row, so it is not offered.

With `renormalize` the KD term is invariant to the merge (both rows are renormalized); it acts
through the tail bucket and the ULD term.

**Terms.** The vocabulary map (`vocab_map.py`) puts every id into a class; a class with ids on
both sides is *matched*. For group g:

- KD (exact, on the mapped mass): the teacher's top-k slots are summed per matched class
  (`P_c = chain_T + log sum_{k in c} exp(l_k)`), the student's probability is summed over the
  class's student ids (`Q_c = chain_S + log sum_{w in c} q_w`), and the divergence of
  `KDLossConfig` is taken over those buckets with its `topk_normalization`: `renormalize`
  (softmax over the buckets on both sides, teacher scaled by `target_logits_scale`) or
  `tail_bucket` (one more bucket, `1 - sum` on each side; teacher floored at
  `TEACHER_TAIL_MIN_MASS`). Student logits are scaled by `logits_scale` everywhere.
- ULD (on the unmatched rest, Boizard et al. 2024): the teacher's unmatched slots'
  probabilities `exp(target_logits_scale * (l_k + chain_T))` and the student's top-K
  probabilities among its unmatched ids `exp(log q_w + chain_S)`, each sorted descending (zeros
  pad the teacher's), compared by the L1 sum over the row's K ranks (a `top_p` row: as many
  as it has entries; its padding is no entry). Beyond them the teacher is unknown (only its
  top-k is stored), so those ranks are left out.
- Capture modes: `topk` and `top_p` rows (`train_student` refuses `sampled` ones: their
  draws need the importance weights only the same-tokenizer loss applies).
- SFT: the student's cross-entropy on every row with a label (as in `losses/config.py`).

`loss = kd_loss_weight * kd_factor * sum_g w_g KD_g + uld_loss_weight * sum_g w_g ULD_g
+ sft_loss_weight * sum_r v_r SFT_r`. With the identity map and one-token groups (teacher
tokenizer = student tokenizer) every slot is its own matched bucket, chains are 0 and the ULD
term is empty, so this is `fused_topk_kd_loss` (tested).

**Chunking.** Rows are processed in chunks that never split a group (so a group's chain lies in
its chunk). Each chunk's [C, V] logits are recomputed; what the loss reads of them (each row's
log-sum-exp, the logits at the label, at the matched classes' student ids of a group's first row,
at its top-K unmatched ids, and the log-sum-exp of the rest) is gathered without autograd, the
loss is differentiated by autograd w.r.t. those small tensors only, and `_logits_grad` assembles
the [C, V] gradient from them in one buffer (softmax times the log-sum-exp's gradient, the
gathers' gradients scattered back), folded into `grad_hidden` / `grad_weight` / `grad_bias` at
once (the pattern of `losses/fused.py`). So no [N, V] tensor is kept for the backward and a
chunk holds the logits, the gradient and the first rows' outside-the-buckets copy, not an
autograd graph of a dozen [C, V] tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from kd_pipeline.core.cross_tokenizer.groups import AlignedGroupBatch, check_group_batch, chunk_bounds, later_row_mask
from kd_pipeline.core.cross_tokenizer.vocab_map import ProjectionTensors
from kd_pipeline.core.losses.chunk import _chunk_logits, _log1mexp, _teacher_tail_logmass
from kd_pipeline.core.losses.chunk import compute_dtype as _compute_dtype
from kd_pipeline.core.losses.config import IGNORE_INDEX, KDLossConfig
from kd_pipeline.core.losses.fused import auto_chunk_size
from kd_pipeline.core.losses.reference import _divergence
from kd_pipeline.core.params import dataclass_from_params, require, require_choice, require_number
from kd_pipeline.core.topk_store.codec import padding_slots

SPAN_MERGES = ("observed", "first_token")


@dataclass(frozen=True)
class CrossTokenizerOptions:
    """Cross-tokenizer specifics of the loss (`distill.cross_tokenizer` params, loss part).

    Attributes:
        uld_loss_weight: weight of the sorted-probability L1 term on unmatched mass, >= 0.
        span_merge: `observed` (GOLD) or `first_token` (see the module docstring).
    """

    uld_loss_weight: float = 1.0
    span_merge: str = "observed"

    def __post_init__(self) -> None:
        require_choice("distill.cross_tokenizer", "span_merge", self.span_merge, SPAN_MERGES)
        require_number("distill.cross_tokenizer", "uld_loss_weight", self.uld_loss_weight, minimum=0)
        require(math.isfinite(self.uld_loss_weight), "distill.cross_tokenizer", "uld_loss_weight", "finite",
                self.uld_loss_weight)

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> CrossTokenizerOptions:
        return dataclass_from_params(cls, params, "distill.cross_tokenizer")


class CrossTokenizerLossOutput(NamedTuple):
    """Result of `cross_tokenizer_kd_loss`.

    Attributes:
        loss: 0-dim with grad.
        kd: detached `sum_g w_g KD_g` (no `kd_factor`).
        uld: detached `sum_g w_g ULD_g`.
        sft: detached `sum_r v_r SFT_r`.
        matched_mass: detached weighted mean over groups of the teacher's (T = 1, unmerged)
            probability on matched classes.
        agreement: detached weighted mean over groups of [the teacher's and the student's most
            probable matched class agree] (groups without a matched class count as 0).
        group_weight_sum: detached `sum_g w_g`.
    """

    loss: torch.Tensor
    kd: torch.Tensor
    uld: torch.Tensor
    sft: torch.Tensor
    matched_mass: torch.Tensor
    agreement: torch.Tensor
    group_weight_sum: torch.Tensor


def _segment_logsumexp(values: torch.Tensor, segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    """log sum exp of `values` per segment id (-inf for empty segments); differentiable."""
    fill = torch.full((num_segments,), -math.inf, dtype=values.dtype, device=values.device)
    seg_max = fill.scatter_reduce(0, segments, values.detach(), reduce="amax", include_self=True)
    shift = torch.where(torch.isfinite(seg_max), seg_max, 0.0)
    sums = torch.zeros(num_segments, dtype=values.dtype, device=values.device)
    sums = sums.index_add(0, segments, (values - shift[segments]).exp())
    return shift + sums.log()


class _MatchedBuckets(NamedTuple):
    """A chunk's KD buckets: the distinct (group, matched class) pairs, padded per group.

    Attributes:
        teacher: (G, B) teacher log-mass per bucket (before the span merge), -inf padding.
        position: (B,) each bucket's column in the padded (G, B) matrices.
        bucket_group: (B,) its group.
        has_bucket: (G,) whether the group has a matched class at all.
        slot_matched: (G, K) whether each teacher top-k slot is in a matched class.
        member_bucket: (M,) bucket of each (bucket, student id) member.
        member_group: (M,) its group.
        member_ids: (M,) its student id.
        row_entries: (G,) entries of each group's teacher row (K, fewer for a variable row:
            its padding, `topk_store.codec.padding_slots`, is no entry).
    """

    teacher: torch.Tensor
    position: torch.Tensor
    bucket_group: torch.Tensor
    has_bucket: torch.Tensor
    slot_matched: torch.Tensor
    member_bucket: torch.Tensor
    member_group: torch.Tensor
    member_ids: torch.Tensor
    row_entries: torch.Tensor


class _RowValues(NamedTuple):
    """What the loss reads of a chunk's (C, V) student logits z (scaled by `logits_scale`),
    gathered without an autograd graph; the loss is differentiated w.r.t. these small tensors
    and the (C, V) gradient is assembled from theirs (`_logits_grad`).

    Attributes:
        lse: (C,) log sum exp z.
        label: (C,) z at the label (0 where none).
        members: (M,) z at the first row of each bucket member's group, at its id.
        tail_lse: (G,) log sum exp of the first row's z outside its group's matched buckets
            (-inf when no id is outside), or None (`renormalize`).
        uld: (G, K') z at the first row's top-K' unmatched student ids, or None (no ULD term).
        uld_ids: (G, K') those ids, or None.
        raw_lse, raw_label: the same of the unscaled logits, for an unscaled SFT term (else None).
    """

    lse: torch.Tensor
    label: torch.Tensor
    members: torch.Tensor
    tail_lse: torch.Tensor | None
    uld: torch.Tensor | None
    uld_ids: torch.Tensor | None
    raw_lse: torch.Tensor | None
    raw_label: torch.Tensor | None


def _matched_buckets(topk_ids: torch.Tensor, teacher: torch.Tensor, projection: ProjectionTensors) -> _MatchedBuckets:
    """The teacher's top-k slots summed per matched class of each group, and the student ids of
    those classes (their mass is summed by `_student_buckets`)."""
    num_groups, k = teacher.shape
    dtype, device = teacher.dtype, teacher.device
    slot_class = projection.teacher_class[topk_ids]  # (G, K)
    slot_matched = projection.class_matched[slot_class]
    num_classes = projection.num_classes

    # Buckets: distinct (group, matched class) pairs, sorted by group then class.
    slot_group = torch.arange(num_groups, device=device).unsqueeze(1).expand(-1, k)
    keys = (slot_group * num_classes + slot_class)[slot_matched]
    bucket_keys, slot_bucket = torch.unique(keys, sorted=True, return_inverse=True)
    num_buckets = int(bucket_keys.shape[0])
    bucket_group = bucket_keys // num_classes
    bucket_class = bucket_keys % num_classes
    teacher_bucket = _segment_logsumexp(teacher[slot_matched], slot_bucket, num_buckets)  # (B,)

    # Every student id of every bucket's class (CSR lists of the projection).
    ptr = projection.class_student_ptr
    member_counts = ptr[bucket_class + 1] - ptr[bucket_class]
    member_bucket = torch.repeat_interleave(torch.arange(num_buckets, device=device), member_counts)
    member_offset = torch.arange(member_bucket.shape[0], device=device) - torch.repeat_interleave(
        member_counts.cumsum(0) - member_counts, member_counts
    )
    member_ids = projection.class_student_ids[ptr[bucket_class][member_bucket] + member_offset]

    # Padded (G, Bmax) teacher matrix.
    per_group = torch.bincount(bucket_group, minlength=num_groups)
    width = max(int(per_group.max()) if num_buckets else 0, 1)
    position = torch.arange(num_buckets, device=device) - (per_group.cumsum(0) - per_group)[bucket_group]
    padded = torch.full((num_groups, width), -math.inf, dtype=dtype, device=device)
    padded = padded.index_put((bucket_group, position), teacher_bucket)
    row_entries = (~padding_slots(topk_ids, teacher)).sum(1)
    return _MatchedBuckets(padded, position, bucket_group, per_group > 0, slot_matched, member_bucket,
                           bucket_group[member_bucket], member_ids, row_entries)


@torch.no_grad()
def _gather_row_values(
    logits: torch.Tensor, labels: torch.Tensor, start: torch.Tensor, buckets: _MatchedBuckets | None,
    projection: ProjectionTensors, k: int, config: KDLossConfig, options: CrossTokenizerOptions,
) -> tuple[_RowValues, torch.Tensor, torch.Tensor | None]:
    """(`_RowValues`, scaled logits z, the first rows' z with -inf at bucket members or None).

    z and the masked first rows are returned for the gradient's softmaxes (`_logits_grad`).
    """
    scale = config.logits_scale
    z = logits * scale if scale != 1.0 else logits
    safe_labels = torch.where(labels != IGNORE_INDEX, labels, 0).unsqueeze(1)
    lse = z.logsumexp(1)
    label = z.gather(1, safe_labels).squeeze(1)
    raw_lse = raw_label = None
    if not (config.scale_sft_logits or scale == 1.0):
        raw_lse, raw_label = logits.logsumexp(1), logits.gather(1, safe_labels).squeeze(1)
    if buckets is None:
        return _RowValues(lse, label, label[:0], None, None, None, raw_lse, raw_label), z, None
    members = z[start[buckets.member_group], buckets.member_ids]
    uld = uld_ids = None
    if options.uld_loss_weight > 0:
        unmatched = z[start].masked_fill_(~projection.student_unmatched.unsqueeze(0), -math.inf)
        uld, uld_ids = unmatched.topk(min(k, z.shape[1]), dim=1)
        del unmatched
    tail_lse = outside = None
    if config.topk_normalization != "renormalize":
        outside = z[start]
        outside[buckets.member_group, buckets.member_ids] = -math.inf
        tail_lse = outside.logsumexp(1)  # -inf when every id is a member
    return _RowValues(lse, label, members, tail_lse, uld, uld_ids, raw_lse, raw_label), z, outside


def _sft_sum(values: _RowValues, labels: torch.Tensor, sft_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(`sum_r v_r SFT_r`, the (C,) student log-probs of the labels under z)."""
    label_log_q = values.label - values.lse
    sft_log_q = label_log_q if values.raw_lse is None else values.raw_label - values.raw_lse
    sft_w = torch.where(labels != IGNORE_INDEX, sft_weights.to(values.lse.dtype), 0.0)
    return torch.where(sft_w != 0, -sft_w * sft_log_q, 0.0).sum(), label_log_q


def _chains(
    label_log_q: torch.Tensor, start: torch.Tensor, stop: torch.Tensor, teacher_chain: torch.Tensor,
    options: CrossTokenizerOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(student chain, teacher chain) per group: the realized log-probs of each group's later
    tokens under `observed` (0 for one-token groups), zeros under `first_token`."""
    num_rows, num_groups = int(label_log_q.shape[0]), int(start.shape[0])
    dtype, device = label_log_q.dtype, label_log_q.device
    if options.span_merge != "observed":
        zeros = torch.zeros(num_groups, dtype=dtype, device=device)
        return zeros, zeros
    later = later_row_mask(start, stop, num_rows)
    group_of_row = torch.bucketize(torch.arange(num_rows, device=device), start, right=True) - 1
    chain_s = torch.zeros(num_groups, dtype=dtype, device=device).index_add(0, group_of_row[later], label_log_q[later])
    return chain_s, teacher_chain.to(dtype)


def _student_buckets(values: _RowValues, buckets: _MatchedBuckets, first_lse: torch.Tensor) -> torch.Tensor:
    """(G, B) student log-mass per bucket at the group's first row, -inf padding."""
    num_buckets = int(buckets.position.shape[0])
    summed = _segment_logsumexp(values.members, buckets.member_bucket, num_buckets) - first_lse[buckets.bucket_group]
    padded = torch.full(buckets.teacher.shape, -math.inf, dtype=summed.dtype, device=summed.device)
    return padded.index_put((buckets.bucket_group, buckets.position), summed)


def _student_tail(tail_lse: torch.Tensor, first_lse: torch.Tensor, chain_s: torch.Tensor) -> torch.Tensor:
    """(G,) log of the student's merged mass outside the group's matched buckets,
    `log(1 - e^c (1 - r))` with r the first row's mass outside them (-inf when no id is outside)."""
    tail_nonempty = torch.isfinite(tail_lse)
    rest_lse = torch.where(tail_nonempty, tail_lse - first_lse, -math.inf)
    # log(1 - e^c (1 - r)) = logaddexp(log(1 - e^c), c + log r); exactly r when c == 0.
    chained = chain_s < 0
    safe_chain = torch.where(chained, chain_s, -1.0)
    student_tail = torch.where(chained, torch.logaddexp(_log1mexp(safe_chain), safe_chain + rest_lse), rest_lse)
    return torch.where(tail_nonempty, student_tail, -math.inf)


def _kd_per_group(
    student: torch.Tensor, buckets: _MatchedBuckets, tail: torch.Tensor | None, chain_s: torch.Tensor,
    chain_t: torch.Tensor, config: KDLossConfig,
) -> torch.Tensor:
    """(G,) KD divergence over the merged matched buckets (+ the tail bucket), 0 without any."""
    has = buckets.has_bucket.unsqueeze(1)
    merged_p = buckets.teacher + chain_t.unsqueeze(1)
    merged_q = student + chain_s.unsqueeze(1)
    target_scale = config.target_logits_scale
    if tail is None:  # renormalize
        bucket_log_p = (target_scale * torch.where(has, merged_p, 0.0)).log_softmax(1)
        bucket_log_q = torch.where(has, merged_q, 0.0).log_softmax(1)
    else:
        teacher_tail = torch.where(torch.isfinite(tail), _teacher_tail_logmass(merged_p), -math.inf)
        bucket_log_p = (target_scale * torch.cat([merged_p, teacher_tail[:, None]], 1)).log_softmax(1)
        bucket_log_q = torch.cat([merged_q, tail[:, None]], 1)
    kd_per_group = _divergence(bucket_log_p, bucket_log_q, config.effective_kd_loss, config.beta)
    return torch.where(buckets.has_bucket, kd_per_group, 0.0)


def _uld_per_group(
    q_top: torch.Tensor, teacher: torch.Tensor, row_entries: torch.Tensor, slot_matched: torch.Tensor,
    chain_s: torch.Tensor, chain_t: torch.Tensor, target_scale: float,
) -> torch.Tensor:
    """(G,) L1 distance of the sorted unmatched probabilities over each teacher row's ranks, as
    many as it has entries (`row_entries`: K, or fewer for a variable row, whose padding is no
    rank); `q_top`: the student's top unmatched log-probs, descending."""
    k = teacher.shape[1]
    teacher_unmatched = torch.where(slot_matched, -math.inf, target_scale * (teacher + chain_t[:, None]))
    p_sorted = teacher_unmatched.sort(dim=1, descending=True).values.exp()
    q_sorted = (q_top + chain_s[:, None]).exp()
    if q_sorted.shape[1] < k:
        q_sorted = torch.nn.functional.pad(q_sorted, (0, k - q_sorted.shape[1]))
    ranks = torch.arange(k, device=teacher.device)[None, :] < row_entries[:, None]
    return torch.where(ranks, (p_sorted - q_sorted).abs(), 0.0).sum(1)


def _group_terms(
    values: _RowValues,
    labels: torch.Tensor,
    sft_weights: torch.Tensor,
    start: torch.Tensor,
    stop: torch.Tensor,
    buckets: _MatchedBuckets | None,
    teacher: torch.Tensor,
    teacher_chain: torch.Tensor,
    group_weights: torch.Tensor,
    config: KDLossConfig,
    options: CrossTokenizerOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted loss of one chunk (differentiable in `values`' tensors) and its metric sums.

    `values` are the chunk's rows' (`_gather_row_values`), `start`/`stop` its groups' rows
    (relative to the chunk). Returns (loss, sums) with sums (6,) float64:
    [sum w KD, sum w ULD, sum v SFT, sum w matched_mass, sum w agreement, sum w].
    """
    dtype = values.lse.dtype
    sums = torch.zeros(6, dtype=torch.float64, device=values.lse.device)
    loss = torch.zeros((), dtype=dtype, device=values.lse.device)
    sft_sum, label_log_q = _sft_sum(values, labels, sft_weights)
    sums[2] = sft_sum.detach()
    if config.sft_loss_weight > 0:
        loss = loss + config.sft_loss_weight * sft_sum
    if buckets is None:
        return loss, sums
    w = group_weights.to(dtype)
    sums[5] = w.sum()

    chain_s, chain_t = _chains(label_log_q, start, stop, teacher_chain, options)
    first_lse = values.lse[start]
    student = _student_buckets(values, buckets, first_lse)
    with torch.no_grad():
        sums[3] = (w * buckets.teacher.exp().sum(1)).sum()
        agree = buckets.has_bucket & (buckets.teacher.argmax(1) == student.argmax(1))
        sums[4] = (w * agree.to(dtype)).sum()

    tail = None if values.tail_lse is None else _student_tail(values.tail_lse, first_lse, chain_s)
    kd_sum = torch.where(w != 0, w * _kd_per_group(student, buckets, tail, chain_s, chain_t, config), 0.0).sum()
    sums[0] = kd_sum.detach()
    if config.kd_loss_weight > 0:
        loss = loss + config.kd_loss_weight * config.kd_factor * kd_sum
    if values.uld is not None:
        q_top = values.uld - first_lse[:, None]
        uld = _uld_per_group(q_top, teacher, buckets.row_entries, buckets.slot_matched, chain_s, chain_t,
                             config.target_logits_scale)
        uld_sum = torch.where(w != 0, w * uld, 0.0).sum()
        sums[1] = uld_sum.detach()
        loss = loss + options.uld_loss_weight * uld_sum
    return loss, sums


def _logits_grad(
    logits: torch.Tensor, z: torch.Tensor, outside: torch.Tensor | None, values: _RowValues,
    grads: _RowValues, labels: torch.Tensor, start: torch.Tensor, buckets: _MatchedBuckets | None,
    scale: float,
) -> torch.Tensor:
    """d loss / d logits (C, V) from the gradients w.r.t. the gathered values: d lse / dz is
    softmax(z), d tail_lse / dz the softmax over the outside ids, the gathers scatter back."""
    grad = (z - values.lse[:, None]).exp_().mul_(grads.lse[:, None])  # the only (C, V) buffer
    safe_labels = torch.where(labels != IGNORE_INDEX, labels, 0)
    rows = torch.arange(z.shape[0], device=z.device)
    grad.index_put_((rows, safe_labels), grads.label, accumulate=True)
    if buckets is not None:
        grad.index_put_((start[buckets.member_group], buckets.member_ids), grads.members, accumulate=True)
        if grads.tail_lse is not None:
            finite = torch.isfinite(values.tail_lse)
            safe_tail = torch.where(finite, values.tail_lse, 0.0)
            weight = torch.where(finite, grads.tail_lse, 0.0)
            grad.index_add_(0, start, outside.sub_(safe_tail[:, None]).exp_().mul_(weight[:, None]))  # consumes it
        if grads.uld is not None:
            grad.index_put_((start[:, None].expand_as(values.uld_ids), values.uld_ids), grads.uld, accumulate=True)
    if scale != 1.0:
        grad.mul_(scale)
    if grads.raw_lse is not None:  # the unscaled SFT term
        grad.add_((logits - values.raw_lse[:, None]).exp_().mul_(grads.raw_lse[:, None]))
        grad.index_put_((rows, safe_labels), grads.raw_label, accumulate=True)
    return grad


def _chunk_loss(
    logits: torch.Tensor, labels: torch.Tensor, sft_weights: torch.Tensor, start: torch.Tensor, stop: torch.Tensor,
    topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, teacher_chain: torch.Tensor, group_weights: torch.Tensor,
    projection: ProjectionTensors, config: KDLossConfig, options: CrossTokenizerOptions, compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(metric sums (6,), d loss / d logits or None) of one chunk's (C, V) logits.

    The (C, V) work runs without autograd (`_gather_row_values`); autograd differentiates the
    loss w.r.t. the gathered (C,)/(G, K)-sized values only, and `_logits_grad` turns that into
    the logits' gradient, so a chunk holds ~3 (C, V) buffers instead of a graph of a dozen.
    """
    teacher = topk_logprobs.to(logits.dtype)
    buckets = _matched_buckets(topk_ids, teacher, projection) if start.numel() else None
    values, z, outside = _gather_row_values(logits, labels, start, buckets, projection, teacher.shape[1],
                                            config, options)
    leaves = _RowValues(*(None if v is None or not v.is_floating_point() else v.detach().requires_grad_(compute_grad)
                          for v in values))
    leaves = leaves._replace(uld_ids=values.uld_ids)
    with torch.enable_grad():
        loss, sums = _group_terms(leaves, labels, sft_weights, start, stop, buckets, teacher, teacher_chain,
                                  group_weights, config, options)
        if not (compute_grad and loss.requires_grad):
            return sums, None
        inputs = [(name, v) for name, v in leaves._asdict().items() if v is not None and v.requires_grad]
        found = torch.autograd.grad(loss, [v for _, v in inputs], allow_unused=True)
    grads = {name: (torch.zeros_like(v) if g is None else g) for (name, v), g in zip(inputs, found)}
    grads = _RowValues(**{name: grads.get(name) for name in _RowValues._fields})
    return sums, _logits_grad(logits, z, outside, values, grads, labels, start, buckets, config.logits_scale)


class CrossTokenizerDistillationFunction(torch.autograd.Function):
    """autograd.Function computing the loss and its gradients chunk by chunk in `forward`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, sft_weights, groups, projection, config, options, needs_grad):
        num_rows, hidden_size = hidden.shape
        vocab = weight.shape[0]
        # The fused loss's automatic chunk: a quarter of it cut the peak by only ~15% and doubled
        # the CPU time (benchmarks/bench_cross_tokenizer_loss.py, docs/benchmarks.md).
        chunk_size = config.chunk_size or auto_chunk_size(num_rows, vocab, hidden_size)
        needs_hidden, needs_weight, needs_bias = needs_grad
        compute_grad = any(needs_grad)
        dtype = _compute_dtype(hidden.dtype)
        grad_hidden = torch.zeros_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight) if needs_weight else None
        grad_bias = torch.zeros_like(bias) if needs_bias else None
        sums = torch.zeros(6, dtype=torch.float64, device=hidden.device)
        start, stop = groups.row_start, groups.row_stop
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for first, end in chunk_bounds(start, stop, num_rows, chunk_size):
                lo = int(torch.searchsorted(start, torch.tensor(first, device=start.device)))
                hi = int(torch.searchsorted(start, torch.tensor(end, device=start.device)))
                hidden_chunk = hidden[first:end]
                with torch.no_grad():
                    logits = _chunk_logits(hidden_chunk, weight, bias).to(dtype).contiguous()
                chunk_sums, grad_logits = _chunk_loss(
                    logits, labels[first:end], sft_weights[first:end], start[lo:hi] - first, stop[lo:hi] - first,
                    groups.topk_ids[lo:hi], groups.topk_logprobs[lo:hi], groups.teacher_chain[lo:hi],
                    groups.weights[lo:hi], projection, config, options, compute_grad,
                )
                sums += chunk_sums
                del logits
                if grad_logits is not None:
                    grad_logits = grad_logits.to(weight.dtype)
                    if grad_hidden is not None:
                        grad_hidden[first:end] = grad_logits @ weight
                    if grad_weight is not None:
                        grad_weight.addmm_(grad_logits.t(), hidden_chunk)
                    if grad_bias is not None:
                        grad_bias.add_(grad_logits.sum(0))
        kd, uld, sft, mass, agree, weight_sum = (value.clone() for value in sums.to(dtype).unbind())
        loss = torch.zeros((), dtype=dtype, device=hidden.device)
        if config.kd_loss_weight > 0:
            loss = loss + config.kd_loss_weight * config.kd_factor * kd
        if options.uld_loss_weight > 0:
            loss = loss + options.uld_loss_weight * uld
        if config.sft_loss_weight > 0:
            loss = loss + config.sft_loss_weight * sft
        safe = torch.where(weight_sum != 0, weight_sum, 1.0)
        mass = torch.where(weight_sum != 0, mass / safe, 0.0)
        agree = torch.where(weight_sum != 0, agree / safe, 0.0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        outputs = (loss, kd, uld, sft, mass, agree, weight_sum)
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *unused):
        grads = []
        for grad in ctx.saved_tensors:
            grads.append(None if grad is None else (grad if bool(grad_loss == 1) else grad * grad_loss))
        return (*grads, None, None, None, None, None, None, None)


def require_supported_loss(config: KDLossConfig, where: str = "cross_tokenizer_kd_loss") -> None:
    """Refuse a KD setting this loss cannot compute exactly: `tail_bucket` at a teacher
    temperature other than the capture's (`target_logits_scale != 1`) needs the teacher's per-row
    log-normalizers at that temperature (the fused loss reads them from the artifact), which the
    aligned groups do not carry.

    Raises:
        ValueError: naming the setting.
    """
    if config.kd_loss_weight > 0 and config.topk_normalization == "tail_bucket" and config.target_logits_scale != 1.0:
        raise ValueError(f"{where}: topk_normalization 'tail_bucket' at target_logits_scale "
                         f"{config.target_logits_scale:g} is not supported with a student tokenizer (the tempered "
                         "tail needs the teacher's log-normalizers, which the aligned groups do not carry); use "
                         "target_logits_scale 1.0 or topk_normalization 'renormalize'")


def cross_tokenizer_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    sft_weights: torch.Tensor,
    groups: AlignedGroupBatch,
    projection: ProjectionTensors,
    config: KDLossConfig,
    options: CrossTokenizerOptions = CrossTokenizerOptions(),
) -> CrossTokenizerLossOutput:
    """Cross-tokenizer KD + ULD + SFT loss of `hidden @ weight.T + bias` (module docstring).

    Args:
        hidden: (N, H) student final hidden states of its trained rows.
        weight: (V_s, H) student lm_head weight (same dtype as `hidden`).
        bias: (V_s,) or None.
        labels: (N,) int64 student next-token ids (`IGNORE_INDEX` = no SFT term).
        sft_weights: (N,) float SFT reduction weights.
        groups: the aligned groups of these rows (`AlignedGroupBatch`).
        projection: the pair's `VocabMap.projection()`.
        config: KD hyperparameters (`kd_loss`, weights, scales, `topk_normalization`,
            `chunk_size`; `compiled` is ignored).
        options: ULD weight and span merge.

    Returns:
        `CrossTokenizerLossOutput`; `loss` is differentiable w.r.t. hidden, weight and bias
        (gradients computed in this call, only when grad mode is on).

    Raises:
        ValueError: on inconsistent shapes or group structure (names the field).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be (N, H) and weight (V, H), got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError("hidden, weight and bias must share a dtype")
    num_rows = hidden.shape[0]
    if tuple(labels.shape) != (num_rows,) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be an int64 tensor of shape ({num_rows},), got {labels.dtype} {tuple(labels.shape)}")
    if tuple(sft_weights.shape) != (num_rows,) or not sft_weights.is_floating_point():
        raise ValueError(f"sft_weights must be a float tensor of shape ({num_rows},), got {tuple(sft_weights.shape)}")
    if int(projection.student_unmatched.shape[0]) != weight.shape[0]:
        raise ValueError(
            f"the vocabulary map's student vocabulary ({int(projection.student_unmatched.shape[0])}) "
            f"!= the lm_head's ({weight.shape[0]})"
        )
    check_group_batch(groups, labels, num_rows, int(projection.teacher_class.shape[0]))
    require_supported_loss(config)
    grad_on = torch.is_grad_enabled()
    needs_grad = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    outputs = CrossTokenizerDistillationFunction.apply(
        hidden, weight, bias, labels, sft_weights, groups, projection, config, options, needs_grad
    )
    return CrossTokenizerLossOutput(*outputs)
