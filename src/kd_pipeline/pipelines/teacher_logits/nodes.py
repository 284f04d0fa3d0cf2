"""Nodes of teacher_logits: thin calls into kd_pipeline.core.extraction (imported inside the
nodes, so that Kedro's startup, which imports every pipeline, does not load torch)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from kd_pipeline.core.corpus import TokenizedCorpus


def extract_teacher_topk_node(teacher_model: Path, tokenized_corpus: TokenizedCorpus,
                              params: dict) -> Callable[[Path], None]:
    """The artifact writer that `DirectoryDataset.save` runs on data/04_feature/teacher_topk, in
    place (resumable: a re-run skips samples in finished shards and rebuilds corrupt ones)."""
    from kd_pipeline.core.distributed import distributed_from_env
    from kd_pipeline.core.extraction.config import ExtractionConfig
    from kd_pipeline.core.extraction.run import extract_teacher_topk

    config = ExtractionConfig.from_params(params)

    def write_artifact(out_dir: Path) -> None:
        # Under `torchrun --nproc-per-node N kedro run ...` every rank extracts its share.
        rank, world_size = distributed_from_env(config.resolved_device().type)
        extract_teacher_topk(Path(teacher_model), tokenized_corpus, out_dir, config, rank=rank, world_size=world_size)

    return write_artifact


def teacher_logits_report(teacher_topk: Path) -> dict:
    """Tokens, throughput of the last run, top-k coverage and bytes per trained token."""
    from kd_pipeline.core.extraction.report import artifact_report

    return artifact_report(teacher_topk)
