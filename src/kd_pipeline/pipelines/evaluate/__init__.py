"""evaluate: validation metrics of the student against the teacher artifact, generations, plots."""

from kd_pipeline.pipelines.evaluate.pipeline import create_pipeline

__all__ = ["create_pipeline"]
