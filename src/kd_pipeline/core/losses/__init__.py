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
)
from kd_pipeline.core.losses.fused import (
    TopKDistillationFunction,
    TopKDistillationLoss,
    auto_chunk_size,
    fused_topk_kd_loss,
)
from kd_pipeline.core.losses.reference import topk_kd_loss_reference

__all__ = [
    "IGNORE_INDEX",
    "KD_LOSSES",
    "TEACHER_TAIL_MIN_MASS",
    "TOPK_NORMALIZATIONS",
    "KDLossConfig",
    "LossOutput",
    "TopKDistillationFunction",
    "TopKDistillationLoss",
    "auto_chunk_size",
    "fused_topk_kd_loss",
    "topk_kd_loss_reference",
]
