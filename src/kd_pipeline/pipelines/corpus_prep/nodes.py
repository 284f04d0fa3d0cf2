"""Nodes of corpus_prep: thin calls into kd_pipeline.core."""

from __future__ import annotations

import functools
from pathlib import Path

from kd_pipeline.core import modeling
from kd_pipeline.core.corpus import CorpusConfig, TokenizedCorpus, build_corpus
from kd_pipeline.core.corpus_sources import source_rows


def prepare_teacher_model(teacher: dict):
    """The teacher as a plain HF folder (converted once from GGUF for the embedded default)."""
    source = modeling.TeacherSource.from_params(teacher)
    return functools.partial(modeling.prepare_teacher, source)


def tokenize_corpus(teacher_model: Path, params: dict) -> tuple[TokenizedCorpus, dict]:
    """Rows from the configured source -> tokenized samples with loss masks, ids and split."""
    settings = {key: value for key, value in params.items() if key not in ("source", "teacher")}
    tokenizer = modeling.load_tokenizer(teacher_model)
    corpus = build_corpus(source_rows(params["source"]), tokenizer, modeling.tokenizer_hash(tokenizer),
                          CorpusConfig.from_params(settings))
    return corpus, {"fingerprint": corpus.fingerprint, **corpus.meta["stats"], **corpus.meta["report"]}
