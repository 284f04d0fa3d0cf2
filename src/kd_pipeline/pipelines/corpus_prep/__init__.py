"""corpus_prep: the teacher as a plain HF folder, and the tokenized, split corpus."""

from kd_pipeline.pipelines.corpus_prep.pipeline import create_pipeline

__all__ = ["create_pipeline"]
