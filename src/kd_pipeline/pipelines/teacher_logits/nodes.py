"""Nodes of teacher_logits: thin calls into kd_pipeline.core.extraction."""

from __future__ import annotations

import functools
from pathlib import Path

from kd_pipeline.core.corpus import TokenizedCorpus
from kd_pipeline.core.extraction import ExtractionConfig, distributed_from_env, extract_teacher_topk, last_runs
from kd_pipeline.core.topk_store import MANIFEST_NAME, Manifest


def _write_topk(out_dir: Path, teacher_model: Path, corpus: TokenizedCorpus, config: ExtractionConfig) -> dict:
    # Under `torchrun --nproc-per-node N kedro run ...` every rank extracts its share.
    rank, world_size = distributed_from_env(config.resolved_device().type)
    return extract_teacher_topk(teacher_model, corpus, out_dir, config, rank=rank, world_size=world_size)


def extract_teacher_topk_node(teacher_model: Path, tokenized_corpus: TokenizedCorpus, params: dict):
    """The artifact writer: `DirectoryDataset.save` runs it on data/04_feature/teacher_topk
    (resumable: a re-run skips samples in finished shards and rebuilds corrupt ones)."""
    config = ExtractionConfig.from_params(params)
    return functools.partial(_write_topk, teacher_model=Path(teacher_model), corpus=tokenized_corpus, config=config)


def teacher_logits_report(teacher_topk: Path) -> dict:
    """Tokens, throughput of the last run, top-k coverage and bytes per trained token."""
    teacher_topk = Path(teacher_topk)
    manifest = Manifest.read(teacher_topk / MANIFEST_NAME)
    latest, measured = last_runs(teacher_topk)
    tokens = manifest.num_trained_tokens
    source = manifest.source
    return {
        "samples": manifest.num_samples,
        "trained_tokens": tokens,
        "shards": len(manifest.shards),
        "bytes": manifest.num_bytes,
        "bytes_per_trained_token": round(manifest.num_bytes / tokens, 2) if tokens else None,
        "k": source.k,
        "codec": manifest.codec_name,
        "codec_settings": dict(manifest.codec_settings),
        "capture_dtype": source.capture_dtype,
        "capture_temperature": source.capture_temperature,
        "vocab_size": source.vocab_size,
        "topk_coverage": manifest.topk_coverage(),
        # The latest run (a re-run with nothing to do computes no tokens) and the latest run
        # that computed tokens (its throughput and the teacher's target statistics).
        "last_run": _pick(latest, ("finished_at", "samples_computed", "samples_skipped_done", "repaired_shards",
                                   "restarted", "tokens", "seconds")),
        "throughput": _pick(measured, ("finished_at", "device", "capture_dtype", "world_size", "tokens",
                                       "trained_tokens", "seconds", "tokens_per_second", "trained_tokens_per_second",
                                       "target_in_topk_rate", "teacher_target_nll")),
    }


def _pick(run: dict | None, keys: tuple[str, ...]) -> dict | None:
    return None if run is None else {key: run.get(key) for key in keys}
