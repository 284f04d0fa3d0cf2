"""teacher_logits: the teacher's top-k next-token log-probs at every trained position."""

from kd_pipeline.pipelines.teacher_logits.pipeline import create_pipeline

__all__ = ["create_pipeline"]
