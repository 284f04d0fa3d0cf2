"""distill: the student trained from the teacher's top-k artifact (fused top-k KD + SFT), tracked in MLflow."""

from kd_pipeline.pipelines.distill.pipeline import create_pipeline

__all__ = ["create_pipeline"]
