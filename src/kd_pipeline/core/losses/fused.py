"""Fused lm_head + top-k KD + SFT loss, chunked over tokens, that never holds [N, V] logits.

Same semantics as `reference.topk_kd_loss_reference` (see `config.py`), but it takes the
student's final hidden states and lm_head instead of logits. For each chunk of C tokens it
computes the [C, V] logits (in the input dtype; the elementwise work runs in float32 on blocks
of rows), the per-token losses and their analytic gradient w.r.t. the logits (in place, in the
same buffer), and immediately turns that gradient into the chunk's
rows of `grad_hidden` and into in-place updates of `grad_weight` / `grad_bias`. The gradients
are thus produced during the forward pass (the pattern of Liger-Kernel's `chunked_loss`);
`backward` only rescales them by the incoming gradient. Peak memory is the two gradients the
caller needs anyway (V*H + N*H) plus one [C, V] buffer of the input dtype and one float32
block of rows (`chunk.BLOCK_ELEMENTS`).

Three faces: `TopKDistillationFunction` (autograd.Function), `fused_topk_kd_loss` (functional),
`TopKDistillationLoss` (nn.Module). The per-chunk math is `chunk.chunk_step`.
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache

import torch
from torch.autograd.function import once_differentiable

from kd_pipeline.core.losses.chunk import IDENTITY_HEAD, ChunkBuffers, chunk_step, compute_dtype, needs_scratch
from kd_pipeline.core.losses.config import (
    KDLossConfig,
    LossOutput,
    check_loss_inputs,
)
from kd_pipeline.core.models.head import HeadTransform

CHUNK_MEMORY_FRACTION = 1 / 8
"""Auto chunk size keeps one [C, V] float32 buffer at about this fraction of the V*H gradient."""

MIN_AUTO_CHUNK = 16
MAX_AUTO_CHUNK = 4096




def auto_chunk_size(num_tokens: int, vocab_size: int, hidden_size: int) -> int:
    """Chunk size used when `KDLossConfig.chunk_size` is None.

    The per-chunk working set is about C*V floats against the unavoidable V*H gradient of the
    lm_head, so C ~ CHUNK_MEMORY_FRACTION * H keeps the peak within ~1.15x of that floor (the
    benchmark goal is 1.25x). Rounded down to a power of two (friendlier matmul shapes) and
    clamped to [MIN_AUTO_CHUNK, MAX_AUTO_CHUNK]; small chunks also keep `grad_weight.addmm_`
    efficient enough because its inner dimension is C.

    Args:
        num_tokens: N.
        vocab_size: V.
        hidden_size: H.

    Returns:
        C, in [1, max(N, 1)].
    """
    del vocab_size  # the ratio C*V / (V*H) does not depend on V
    target = max(1.0, CHUNK_MEMORY_FRACTION * hidden_size)
    chunk = 2 ** int(math.floor(math.log2(target)))
    chunk = min(max(chunk, MIN_AUTO_CHUNK), MAX_AUTO_CHUNK)
    return max(1, min(chunk, num_tokens))


@lru_cache(maxsize=1)
def _compiled_chunk_step():
    # Dynamic shapes: the last chunk is usually ragged, and N differs between batches.
    return torch.compile(chunk_step, dynamic=True)


def _accumulate_chunk(
    step,
    rows: slice,
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
    sums: torch.Tensor,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    grad_bias: torch.Tensor | None,
    head: HeadTransform,
    buffers: ChunkBuffers | None,
    topk_weights: torch.Tensor | None = None,
) -> None:
    """Runs `step` on the chunk `rows` and folds its results into the accumulators in place."""
    hidden_chunk = hidden[rows]  # (C, H)
    extra = {} if buffers is None else {"buffers": buffers}
    grad_logits, chunk_sums = step(
        hidden_chunk,
        weight,
        bias,
        None if topk_ids is None else topk_ids[rows],
        None if topk_logprobs is None else topk_logprobs[rows],
        None if teacher_logz is None else teacher_logz[rows],
        None if labels is None else labels[rows],
        token_weights[rows],
        config,
        compute_grad,
        head,
        topk_weights=None if topk_weights is None else topk_weights[rows],
        **extra,
    )
    sums += chunk_sums
    if grad_logits is None:
        return
    # grad_logits: (C, V) in the input dtype. The first chunk writes grad_weight / grad_bias
    # (allocated empty: no zero fill of the V x H gradient), later ones accumulate into them.
    first = rows.start == 0
    if grad_hidden is not None:
        torch.mm(grad_logits, weight, out=grad_hidden[rows])
    if grad_weight is not None:
        if first:
            torch.mm(grad_logits.t(), hidden_chunk, out=grad_weight)
        else:
            grad_weight.addmm_(grad_logits.t(), hidden_chunk)
    if grad_bias is not None:
        if first:
            torch.sum(grad_logits, 0, out=grad_bias)
        else:
            grad_bias.add_(grad_logits.sum(0))


class TopKDistillationFunction(torch.autograd.Function):
    """autograd.Function computing loss and gradients chunk by chunk in `forward`."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        topk_ids: torch.Tensor | None,
        topk_logprobs: torch.Tensor | None,
        teacher_logz: torch.Tensor | None,
        labels: torch.Tensor | None,
        token_weights: torch.Tensor,
        config: KDLossConfig,
        needs_grad: tuple[bool, bool, bool],
        head: HeadTransform = IDENTITY_HEAD,
        topk_weights: torch.Tensor | None = None,
    ):
        num_tokens, hidden_size = hidden.shape
        vocab_size = weight.shape[0]
        chunk_size = config.chunk_size or auto_chunk_size(num_tokens, vocab_size, hidden_size)
        step = _compiled_chunk_step() if config.compiled else chunk_step
        # The compiled step allocates its own (it must stay a pure function for torch.compile).
        buffers = (None if config.compiled or num_tokens == 0 else
                   ChunkBuffers.allocate(min(chunk_size, num_tokens), vocab_size, hidden.dtype, hidden.device,
                                         needs_scratch(hidden.dtype, head, config)))
        needs_hidden, needs_weight, needs_bias = needs_grad
        compute_grad = any(needs_grad)
        # grad_weight / grad_bias accumulate in the parameter dtype (as autograd would); the
        # per-chunk products are accumulated in float32 inside the matmul.
        grad_hidden = (
            torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
            if needs_hidden
            else None
        )
        # Written by the first chunk (`_accumulate_chunk`); zeros when there is none.
        new_grad = torch.zeros_like if num_tokens == 0 else torch.empty_like
        grad_weight = new_grad(weight) if needs_weight else None
        grad_bias = new_grad(bias) if needs_bias else None

        sums = torch.zeros(5, dtype=torch.float64, device=hidden.device)
        # The loss runs in the dtypes it is given: an ambient autocast would turn the logits
        # matmul to bf16 while the in-place gradient matmuls (out=, addmm_) stay in fp32.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, num_tokens, chunk_size):
                _accumulate_chunk(
                    step, slice(start, min(start + chunk_size, num_tokens)), hidden, weight, bias,
                    topk_ids, topk_logprobs, teacher_logz, labels, token_weights, config, compute_grad,
                    sums, grad_hidden, grad_weight, grad_bias, head, buffers, topk_weights,
                )

        dtype = compute_dtype(hidden.dtype)
        # Separate (non-view) tensors: they become distinct outputs of the Function.
        kd_sum, sft_sum, coverage_sum, mass_sum, weight_sum = (
            value.clone() for value in sums.to(dtype).unbind()
        )

        def nan():
            return torch.full((), math.nan, dtype=dtype, device=hidden.device)

        loss = torch.zeros((), dtype=dtype, device=hidden.device)
        if topk_ids is not None and config.kd_loss_weight > 0:
            loss = loss + config.kd_loss_weight * config.kd_factor * kd_sum
        if labels is not None and config.sft_loss_weight > 0:
            loss = loss + config.sft_loss_weight * sft_sum
        safe_weight_sum = torch.where(weight_sum != 0, weight_sum, 1.0)
        if topk_ids is None:
            kd, coverage, student_mass = nan(), nan(), nan()
        else:
            kd = kd_sum
            coverage = torch.where(weight_sum != 0, coverage_sum / safe_weight_sum, 0.0)
            student_mass = torch.where(weight_sum != 0, mass_sum / safe_weight_sum, 0.0)
        sft = nan() if labels is None else sft_sum

        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        outputs = (loss, kd, sft, coverage, student_mass, weight_sum)
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *unused_metric_grads):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        # The usual caller does loss.backward() (grad_loss == 1): hand the buffers over as they
        # are, so autograd can adopt them as .grad without a copy. Otherwise scale out of place
        # (in place would corrupt a second backward with retain_graph=True).
        if not bool(grad_loss == 1):
            grad_hidden = None if grad_hidden is None else grad_hidden * grad_loss
            grad_weight = None if grad_weight is None else grad_weight * grad_loss
            grad_bias = None if grad_bias is None else grad_bias * grad_loss
        return (
            grad_hidden,
            grad_weight,
            grad_bias,
            None,  # topk_ids
            None,  # topk_logprobs
            None,  # teacher_logz
            None,  # labels
            None,  # token_weights
            None,  # config
            None,  # needs_grad
            None,  # head
            None,  # topk_weights
        )


def fused_topk_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    labels: torch.Tensor | None,
    token_weights: torch.Tensor,
    config: KDLossConfig,
    *,
    teacher_logz: torch.Tensor | None = None,
    head: HeadTransform | None = None,
    topk_weights: torch.Tensor | None = None,
) -> LossOutput:
    """Top-k KD + SFT loss of the student logits `head(hidden @ weight.T + bias)`, chunked over tokens.

    Args:
        hidden: (N, H) float student final hidden states of the trained tokens.
        weight: (V, H) lm_head weight, same dtype as `hidden`.
        bias: (V,) lm_head bias or None.
        topk_ids: (N, K) int64 teacher top-k ids; None allowed when `kd_loss_weight == 0`.
        topk_logprobs: (N, K) float teacher full-vocabulary log-probs of `topk_ids`.
        labels: (N,) int64 next-token ids (`IGNORE_INDEX` = no SFT term); None allowed when
            `sft_loss_weight == 0`.
        token_weights: (N,) float reduction weights; `loss = sum_i w_i * loss_i`.
        config: loss hyperparameters (`chunk_size`, `compiled` are used here).
        teacher_logz: (N,) float `log sum_v p(v)**s`, the stored teacher distribution's
            log-normalizer at `s = target_logits_scale` (the artifact's column for that
            temperature); needed by `tail_bucket` when `s != 1`, ignored by `renormalize`.
        head: the model's logit transform (`models.head.head_transform(model, len(tokenizer))`:
            soft-cap, scaling, real vocabulary size), so the loss scores what
            `model(...).logits` would; None = the plain linear head.
        topk_weights: (N, K) float, for `sampled` artifacts: the unbiased estimator's weight of
            each slot (`c / n * p_s / r`, 0 at padding; `core.losses.sampled.SampledWeights`); None
            for top-k / top-p rows. Needs fwd_kl with `tail_bucket` (`config.py`).

    Returns:
        `LossOutput`; `loss` is differentiable w.r.t. `hidden`, `weight` and `bias`. The
        gradients are computed in this call (only for inputs that require grad, and only when
        grad mode is on), so calling it under `torch.no_grad()` is a cheap evaluation.

    Raises:
        ValueError: on inconsistent shapes, dtypes or missing inputs.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be (N, H) and weight (V, H), got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(
            f"hidden, weight and bias must share a dtype, got {hidden.dtype}, {weight.dtype}, "
            f"{None if bias is None else bias.dtype}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    head = IDENTITY_HEAD if head is None else head
    if head.vocab_size is not None:
        if not 1 <= head.vocab_size <= weight.shape[0]:
            raise ValueError(f"head.vocab_size must be in [1, {weight.shape[0]}] (the head's rows), "
                             f"got {head.vocab_size}")
        # Rows past the tokenizer are not tokens: without them they get no mass, and autograd
        # gives their weight rows a zero gradient.
        weight = weight[: head.vocab_size]
        bias = None if bias is None else bias[: head.vocab_size]
        head = dataclasses.replace(head, vocab_size=None)
    check_loss_inputs(
        hidden.shape[0], weight.shape[0], topk_ids, topk_logprobs, labels, token_weights, config,
        teacher_logz, topk_weights,
    )
    grad_on = torch.is_grad_enabled()
    needs_grad = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    outputs = TopKDistillationFunction.apply(
        hidden, weight, bias, topk_ids, topk_logprobs, teacher_logz, labels, token_weights, config,
        needs_grad, head, topk_weights,
    )
    return LossOutput(*outputs)


class TopKDistillationLoss(torch.nn.Module):
    """nn.Module holding a `KDLossConfig`; `forward` calls `fused_topk_kd_loss`."""

    def __init__(self, config: KDLossConfig | None = None):
        super().__init__()
        self.config = config if config is not None else KDLossConfig()

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        topk_ids: torch.Tensor | None,
        topk_logprobs: torch.Tensor | None,
        labels: torch.Tensor | None,
        token_weights: torch.Tensor,
        teacher_logz: torch.Tensor | None = None,
        head: HeadTransform | None = None,
        topk_weights: torch.Tensor | None = None,
    ) -> LossOutput:
        """See `fused_topk_kd_loss`; shapes (N, H), (V, H), (V,), (N, K), (N, K), (N,), (N,), (N,)."""
        return fused_topk_kd_loss(
            hidden, weight, bias, topk_ids, topk_logprobs, labels, token_weights, self.config,
            teacher_logz=teacher_logz, head=head, topk_weights=topk_weights,
        )

    def extra_repr(self) -> str:
        return repr(self.config)
