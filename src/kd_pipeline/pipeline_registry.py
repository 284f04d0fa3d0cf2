"""Project pipelines, registered by name; `__default__` runs every stage in order."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from kd_pipeline.pipelines import corpus_prep, distill, evaluate, teacher_logits

STAGES = ("corpus_prep", "teacher_logits", "distill", "evaluate")


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = {
        "corpus_prep": corpus_prep.create_pipeline(),
        "teacher_logits": teacher_logits.create_pipeline(),
        "distill": distill.create_pipeline(),
        "evaluate": evaluate.create_pipeline(),
    }
    pipelines["__default__"] = sum((pipelines[name] for name in STAGES), Pipeline([]))
    return pipelines
