"""Top-k knowledge-distillation losses: config, naive reference and fused chunked implementation.

Semantics are documented in `kd_pipeline.core.losses.config`.
"""

from kd_pipeline.core.losses.config import (
    IGNORE_INDEX,
    KD_LOSSES,
    TEACHER_TAIL_MIN_MASS,
    TOPK_NORMALIZATIONS,
    KDLossConfig,
    LossOutput,
    require_sampled_support,
)
from kd_pipeline.core.losses.fused import (
    TopKDistillationFunction,
    TopKDistillationLoss,
    auto_chunk_size,
    fused_topk_kd_loss,
)
from kd_pipeline.core.losses.reference import topk_kd_loss_reference
from kd_pipeline.core.losses.sampled import SampledWeights

__all__ = [
    "IGNORE_INDEX",
    "KD_LOSSES",
    "TEACHER_TAIL_MIN_MASS",
    "TOPK_NORMALIZATIONS",
    "KDLossConfig",
    "LossOutput",
    "SampledWeights",
    "TopKDistillationFunction",
    "TopKDistillationLoss",
    "auto_chunk_size",
    "fused_topk_kd_loss",
    "require_sampled_support",
    "topk_kd_loss_reference",
]
