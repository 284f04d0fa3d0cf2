"""Nodes of corpus_prep: thin calls into kd_pipeline.core.

The core is imported inside the nodes: Kedro imports every pipeline's nodes at startup, and
torch/transformers cost seconds that a stage which does not run these nodes need not pay.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from kd_pipeline.core.corpus import TokenizedCorpus


def prepare_teacher_model(teacher: dict) -> Callable[[Path], None]:
    """The writer of the teacher folder that `DirectoryDataset.save` runs (a plain HF folder,
    converted once from GGUF for the embedded default; reused when its source is unchanged)."""
    from kd_pipeline.core.models.teacher import TeacherSource, prepare_teacher

    source = TeacherSource.from_params(teacher)

    def write_teacher(directory: Path) -> None:
        prepare_teacher(source, directory)

    return write_teacher


def tokenize_corpus(teacher_model: Path, params: dict) -> tuple[TokenizedCorpus, dict]:
    """Rows from the configured source -> tokenized samples with loss masks, ids and split."""
    from kd_pipeline.core.corpus import CorpusConfig, build_corpus
    from kd_pipeline.core.corpus_sources import source_rows
    from kd_pipeline.core.models.identity import tokenizer_hash
    from kd_pipeline.core.models.loading import load_tokenizer

    settings = {key: value for key, value in params.items() if key not in ("source", "teacher")}
    tokenizer = load_tokenizer(teacher_model)
    corpus = build_corpus(source_rows(params["source"]), tokenizer, tokenizer_hash(tokenizer),
                          CorpusConfig.from_params(settings))
    return corpus, {"fingerprint": corpus.fingerprint, **corpus.meta["stats"], **corpus.meta["report"]}
