"""Configuration (`KDLossConfig`) and result (`LossOutput`) types shared by the top-k KD losses.

Semantics in one place (both `reference.py` and `fused.py` implement exactly this):

* Student logits `u` (one row per trained token) are multiplied by `logits_scale` for the KD
  term: `z = logits_scale * u`. NeMo-Aligner's scales are *inverse temperatures*, so the student
  temperature is `T = 1 / logits_scale`.
* Teacher targets are stored full-vocabulary log-probs `l_k` of the teacher's top-k ids, the
  log-probs of the stored (capture-temperature) distribution `p`. `target_logits_scale` `s` tempers
  that distribution: `p_s(v) = p(v)**s / Z_s` with the per-row log-normalizer
  `teacher_logz = log Z_s = log sum_v p(v)**s` over the **full** vocabulary, so the tempered
  top-k log-probs are exactly `s * l_k - teacher_logz` (in terms of the teacher's logits `a`,
  `log Z_s = logsumexp(s * a) - s * logsumexp(a)`, i.e. `s*lp + s*logZ(1) - logZ(s)`). The
  artifact stores `log Z_s` per row at a list of temperatures (`core.topk_store`). At `s == 1`
  it is 0.
* `topk_normalization`:
    - `renormalize` (NeMo-Aligner parity): student and teacher are both renormalized over the
      teacher's K ids, `q = softmax_k(z[ids])`, `p = softmax_k(s * l)`. Student mass outside the
      K ids is not seen by the KD term, and `teacher_logz` cancels (not needed at any `s`).
    - `tail_bucket`: K+1 buckets. The student bucket log-probs are its full-vocabulary
      log-softmax gathered at the K ids plus the tail `log sum_{v not in ids} softmax(z)_v`. The
      teacher's buckets are the exact tempered top-k log-probs `s * l_k - teacher_logz` and the
      exact tempered tail `log(1 - sum_k exp(s * l_k - teacher_logz))` (floored at
      `TEACHER_TAIL_MIN_MASS`, so a teacher whose stored top-k mass rounds to 1 still gives
      reverse KL a finite value), renormalized over the K+1 buckets (a no-op up to the floor and
      rounding). `s != 1` therefore needs `teacher_logz`; without it the loss refuses (tempering
      the tail as if it were one token is wrong by up to nats per token). When the ids cover
      the whole vocabulary the tail is empty on both sides and drops out.
* Variable rows (`top_p` / `sampled` artifacts, padded per batch): a slot whose id repeats an
  earlier slot of its row *and* whose teacher log-prob is -inf is padding: it is no bucket on
  either side (the student's log-prob there is -inf too), so variable rows give exactly the loss
  of their stored entries alone.
* Sampled targets (`topk_weights` given, `sampled` artifacts): the K slots are the distinct ids
  of `n` draws from a proposal `r`, and `topk_weights[i, k] = c_k / n * p_s(k) / r(k)` (0 at
  padding), so `sum_k w_k f(k)` is an unbiased estimate of `E_{p_s}[f]` (Anshumann et al. 2025).
  KD is then `sum_k w_k (log p_s(k) - log q(k))` with the student's **full-vocabulary**
  log-softmax `q` (an unbiased estimate of KL(p_s || q)), and its gradient w.r.t. the student
  logits, `(sum_k w_k) softmax(z) - w` at the ids, is an unbiased estimate of the
  full-vocabulary `softmax(z) - p_s`. This estimator is linear in the teacher distribution,
  which only forward KL is: `bwd_kl` and `jsd` are refused, and so is `renormalize` (the
  student renormalized over the drawn ids is biased); `tail_bucket` names the full-vocabulary
  student side here (the estimate already spreads over the whole vocabulary, no tail bucket).
* `kd_loss`: `fwd_kl` = KL(p || q), `bwd_kl` = KL(q || p), `jsd` = the generalized JSD of TRL and
  Liger, `beta * KL(p || m) + (1 - beta) * KL(q || m)` with `m = beta * p + (1 - beta) * q`;
  `beta == 0` is special-cased to `fwd_kl` and `beta == 1` to `bwd_kl` (the general formula
  tends to 0 at both ends).
* SFT: full-vocabulary cross-entropy of the labels (`IGNORE_INDEX` rows give 0), on `z` when
  `scale_sft_logits` (NeMo-Aligner parity) and on the unscaled `u` otherwise.
* Reduction: per-token values are summed with the trainer's `token_weights`,
  `kd = sum_i w_i KD_i`, `sft = sum_i w_i SFT_i`, and
  `loss = kd_loss_weight * kd_factor * kd + sft_loss_weight * sft`, where `kd_factor = T**2`
  if `temperature_squared` else 1 (Hinton's compensation for the `1/T**2` shrinking of soft-target
  gradients). The reported `kd` never contains `kd_factor`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import torch

from kd_pipeline.core.batching import IGNORE_INDEX  # noqa: F401 (re-exported: the loss takes HF labels)
from kd_pipeline.core.params import (
    dataclass_from_params,
    is_number,
    require,
    require_bool,
    require_choice,
    require_int,
)

KD_LOSSES = ("fwd_kl", "bwd_kl", "jsd")
TOPK_NORMALIZATIONS = ("renormalize", "tail_bucket")

TEACHER_TAIL_MIN_MASS = 1e-8
"""Floor on the teacher's tail-bucket mass `1 - sum_k p_k` (`tail_bucket` only).

Stored top-k log-probs of a very peaked teacher can sum to 1 after rounding; without a floor the
tail is log(0) and reverse KL / JSD of any student with tail mass would be infinite.
"""


@dataclass(frozen=True)
class KDLossConfig:
    """Hyperparameters of the top-k distillation loss (`distill.loss` params).

    Attributes:
        kd_loss: `fwd_kl` (KL(teacher || student), default), `bwd_kl` (KL(student || teacher))
            or `jsd` (generalized Jensen-Shannon with `beta`).
        beta: JSD mixture weight of the teacher, in [0, 1]: `m = beta*p_teacher + (1-beta)*q`.
            0 gives forward KL, 1 reverse KL (TRL / Liger convention). Used by `jsd` only.
        kd_loss_weight: weight of the KD term, >= 0.
        sft_loss_weight: weight of the SFT (cross-entropy on labels) term, >= 0. At least one of
            the two weights must be > 0.
        logits_scale: multiplies the student logits (inverse student temperature), > 0.
        target_logits_scale: tempers the stored teacher distribution, `p**s / Z_s` (inverse
            teacher temperature relative to the capture temperature), > 0. `tail_bucket` with
            `s != 1` needs the per-row `teacher_logz` at `s`.
        temperature_squared: multiply the KD term of `loss` by `T**2`, `T = 1 / logits_scale`.
        topk_normalization: `renormalize` (over the teacher's K ids, NeMo-Aligner parity) or
            `tail_bucket` (full-vocabulary student, K+1 buckets).
        scale_sft_logits: apply `logits_scale` to the SFT logits too (NeMo-Aligner parity).
        chunk_size: tokens per chunk of the fused loss; None picks one from (N, V, H) so that a
            chunk's logits stay small next to the lm_head gradient (see `fused.auto_chunk_size`).
        compiled: `torch.compile` the fused loss's per-chunk logits/gradient step.
    """

    kd_loss: str = "fwd_kl"
    beta: float = 0.5
    kd_loss_weight: float = 0.5
    sft_loss_weight: float = 1.0
    logits_scale: float = 1.0
    target_logits_scale: float = 1.0
    temperature_squared: bool = False
    topk_normalization: str = "tail_bucket"
    scale_sft_logits: bool = True
    chunk_size: int | None = None
    compiled: bool = False

    def __post_init__(self) -> None:
        what = "distill.loss"
        require_choice(what, "kd_loss", self.kd_loss, KD_LOSSES)
        require_choice(what, "topk_normalization", self.topk_normalization, TOPK_NORMALIZATIONS)
        for name in ("temperature_squared", "scale_sft_logits", "compiled"):
            require_bool(what, name, getattr(self, name))
        for name in ("beta", "kd_loss_weight", "sft_loss_weight", "logits_scale", "target_logits_scale"):
            value = getattr(self, name)
            require(is_number(value) and math.isfinite(value), what, name, "a finite number", value)
        require(0.0 <= self.beta <= 1.0, what, "beta", "in [0, 1]", self.beta)
        for name in ("kd_loss_weight", "sft_loss_weight"):
            require(getattr(self, name) >= 0, what, name, ">= 0", getattr(self, name))
        if self.kd_loss_weight == 0 and self.sft_loss_weight == 0:
            raise ValueError(f"{what}.kd_loss_weight and {what}.sft_loss_weight are both 0: the loss would be "
                             "identically 0")
        for name in ("logits_scale", "target_logits_scale"):
            require(getattr(self, name) > 0, what, name, "> 0 (it is an inverse temperature)", getattr(self, name))
        require_int(what, "chunk_size", self.chunk_size, minimum=1, allow_none=True)

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> KDLossConfig:
        """Builds a config from a params dict (e.g. `params:distill.loss`).

        Args:
            params: field name -> value; missing fields take their defaults.

        Returns:
            The validated config.

        Raises:
            ValueError: on keys that are not fields (all of them are named) or invalid values.
        """
        return dataclass_from_params(cls, params, "distill.loss")

    @property
    def student_temperature(self) -> float:
        """`T = 1 / logits_scale`, the temperature that `temperature_squared` compensates."""
        return 1.0 / self.logits_scale

    @property
    def kd_factor(self) -> float:
        """Factor applied to the KD term inside `loss`: `T**2` or 1."""
        return self.student_temperature**2 if self.temperature_squared else 1.0

    @property
    def effective_kd_loss(self) -> str:
        """`kd_loss` with the JSD endpoints resolved: jsd(beta=0) -> fwd_kl, beta=1 -> bwd_kl."""
        if self.kd_loss == "jsd" and self.beta == 0.0:
            return "fwd_kl"
        if self.kd_loss == "jsd" and self.beta == 1.0:
            return "bwd_kl"
        return self.kd_loss


class LossOutput(NamedTuple):
    """Result of a top-k KD loss call.

    Attributes:
        loss: 0-dim tensor with grad, `kd_loss_weight * kd_factor * kd + sft_loss_weight * sft`.
        kd: detached 0-dim, `sum_i w_i KD_i` (no `kd_factor`); NaN when no KD inputs were given.
        sft: detached 0-dim, `sum_i w_i SFT_i`; NaN when no labels were given.
        teacher_coverage: detached 0-dim, weighted mean over tokens of `sum_k exp(l_k)`, the
            teacher's (unscaled) probability mass on its stored top-k; NaN without KD inputs.
        student_topk_mass: detached 0-dim, weighted mean over tokens of the student's unscaled
            (T = 1) full-vocabulary probability mass on the teacher's top-k ids (each distinct id
            counted once); NaN without KD inputs.
        weight_sum: detached 0-dim, `sum_i w_i`, so that the two weighted means can be combined
            across micro-batches. Both means are 0 when it is 0.
    """

    loss: torch.Tensor
    kd: torch.Tensor
    sft: torch.Tensor
    teacher_coverage: torch.Tensor
    student_topk_mass: torch.Tensor
    weight_sum: torch.Tensor


def require_sampled_support(config: KDLossConfig, what: str = "sampled teacher targets") -> None:
    """Refuse, by name, a loss the sampled (importance-weighted) estimator cannot compute
    without bias (see the module docstring)."""
    if config.effective_kd_loss != "fwd_kl" or config.topk_normalization != "tail_bucket":
        raise ValueError(
            f"{what} support distill.loss.kd_loss 'fwd_kl' with topk_normalization 'tail_bucket' (the "
            f"full-vocabulary student) only, got kd_loss {config.kd_loss!r} (beta {config.beta}) with "
            f"{config.topk_normalization!r}: the unbiased estimate is linear in the teacher distribution, which "
            "bwd_kl and jsd are not, and renormalizing the student over the drawn ids is biased; use a topk or "
            "top_p artifact for those")


def check_loss_inputs(
    num_tokens: int,
    vocab_size: int,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    labels: torch.Tensor | None,
    token_weights: torch.Tensor,
    config: KDLossConfig,
    teacher_logz: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
) -> None:
    """Checks the shapes, dtypes and presence of the non-logit loss inputs (no device sync).

    Args:
        num_tokens: N, rows of the student logits / hidden states.
        vocab_size: V, student vocabulary size.
        topk_ids: (N, K) int64 teacher top-k ids, or None when `kd_loss_weight == 0`.
        topk_logprobs: (N, K) float teacher full-vocabulary log-probs, None iff `topk_ids` is.
        labels: (N,) int64 next-token ids (`IGNORE_INDEX` allowed), or None when
            `sft_loss_weight == 0`.
        token_weights: (N,) float per-token reduction weights.
        config: the loss config.
        teacher_logz: (N,) float `log sum_v p(v)**s` at `s = target_logits_scale`, or None
            (then 0 is assumed at `s == 1`; `tail_bucket` or sampled targets with `s != 1` refuse).
        topk_weights: (N, K) float sampled-estimator weights (`sampled` artifacts), or None.

    Raises:
        ValueError: naming the offending argument.
    """
    if not isinstance(config, KDLossConfig):
        raise ValueError(f"config must be a KDLossConfig, got {type(config).__name__}")
    if tuple(token_weights.shape) != (num_tokens,) or not token_weights.is_floating_point():
        raise ValueError(
            f"token_weights must be a float tensor of shape ({num_tokens},), "
            f"got {token_weights.dtype} {tuple(token_weights.shape)}"
        )
    if (topk_ids is None) != (topk_logprobs is None):
        raise ValueError("topk_ids and topk_logprobs must be given together (or both be None)")
    if topk_ids is None:
        if teacher_logz is not None or topk_weights is not None:
            raise ValueError("teacher_logz / topk_weights were given without topk_ids/topk_logprobs")
        if config.kd_loss_weight > 0:
            raise ValueError("topk_ids/topk_logprobs are None but KDLossConfig.kd_loss_weight > 0")
    else:
        _check_teacher_rows(num_tokens, topk_ids, topk_logprobs, teacher_logz, topk_weights, config)
    if labels is None:
        if config.sft_loss_weight > 0:
            raise ValueError("labels is None but KDLossConfig.sft_loss_weight > 0")
    elif tuple(labels.shape) != (num_tokens,) or labels.dtype != torch.int64:
        raise ValueError(
            f"labels must be an int64 tensor of shape ({num_tokens},), "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    if vocab_size < 1:
        raise ValueError(f"vocabulary size must be >= 1, got {vocab_size}")


def _check_teacher_rows(
    num_tokens: int,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    teacher_logz: torch.Tensor | None,
    topk_weights: torch.Tensor | None,
    config: KDLossConfig,
) -> None:
    """The teacher-side checks of `check_loss_inputs` (its arguments)."""
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens or topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must have shape ({num_tokens}, K) with K >= 1, got {tuple(topk_ids.shape)}")
    if topk_ids.dtype != torch.int64:
        raise ValueError(f"topk_ids must be int64 (torch.long), got {topk_ids.dtype}")
    if tuple(topk_logprobs.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_logprobs shape {tuple(topk_logprobs.shape)} != topk_ids shape {tuple(topk_ids.shape)}")
    if not topk_logprobs.is_floating_point():
        raise ValueError(f"topk_logprobs must be floating point, got {topk_logprobs.dtype}")
    if topk_weights is not None:
        if tuple(topk_weights.shape) != tuple(topk_ids.shape) or not topk_weights.is_floating_point():
            raise ValueError(f"topk_weights must be a float tensor of shape {tuple(topk_ids.shape)}, got "
                             f"{topk_weights.dtype} {tuple(topk_weights.shape)}")
        require_sampled_support(config)
    if teacher_logz is not None:
        if tuple(teacher_logz.shape) != (num_tokens,) or not teacher_logz.is_floating_point():
            raise ValueError(f"teacher_logz must be a float tensor of shape ({num_tokens},), "
                             f"got {teacher_logz.dtype} {tuple(teacher_logz.shape)}")
    elif config.target_logits_scale != 1.0 and topk_weights is not None:
        raise ValueError(
            f"sampled targets (topk_weights) at target_logits_scale {config.target_logits_scale} need "
            "teacher_logz, the teacher's per-row log-normalizer at that temperature: the estimate's tempered "
            "teacher log-probs s * l - teacher_logz are not known without it; pass the artifact's logz column")
    elif config.target_logits_scale != 1.0 and config.topk_normalization == "tail_bucket":
        raise ValueError(
            f"topk_normalization 'tail_bucket' at target_logits_scale "
            f"{config.target_logits_scale} needs teacher_logz, the teacher's per-row "
            "log-normalizer at that temperature (without it the tempered tail mass is not "
            "known); pass the artifact's logz column for it, or use 'renormalize'"
        )
