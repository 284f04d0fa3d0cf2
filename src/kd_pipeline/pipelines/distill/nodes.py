"""Nodes of distill: thin calls into kd_pipeline.core.training.run, plus what the MLflow run
records (kd_pipeline.tracking): tags, per-step metrics (our callback; HF's MLflow integration is
off) and the student as an MLflow model."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from kd_pipeline import tracking
from kd_pipeline.core.params import require_choice, require_int
from kd_pipeline.core.topk_store import VERIFY_MODES, manifest_sha256

if TYPE_CHECKING:
    from kd_pipeline.core.corpus import TokenizedCorpus

# The rest of the core is imported inside the nodes: Kedro imports every pipeline at startup,
# and torch and transformers cost seconds that the other stages need not pay.

_PARAM_GROUPS = ("student_init", "loss", "trainer", "k", "topk_verify", "tracking", "cross_tokenizer")
VOCAB_MAP_SUMMARY = tracking.VOCAB_MAP_SUMMARY


def build_vocab_map(teacher_model: Path, cross_tokenizer: dict | None) -> Callable[[Path], None]:
    """The writer of the vocab_map folder: the (teacher, student tokenizer) pair's map and its
    summary (content hash, counts); for a student sharing the teacher's tokenizer the summary
    only says so."""
    from kd_pipeline.core.cross_tokenizer import vocab_map as vocab_maps
    from kd_pipeline.core.cross_tokenizer.config import CrossTokenizerConfig
    from kd_pipeline.core.models.loading import load_tokenizer

    config = CrossTokenizerConfig.from_params(cross_tokenizer)

    def write(directory: Path) -> None:
        from kd_pipeline.core.atomic import write_json_atomic

        directory.mkdir(parents=True, exist_ok=True)
        (directory / vocab_maps.VOCAB_MAP_FILE).unlink(missing_ok=True)
        summary: dict[str, Any] = {"cross_tokenizer": None}
        if config is not None:
            vocab_map = vocab_maps.build_vocab_map(load_tokenizer(teacher_model), load_tokenizer(config.student_tokenizer),
                                                   max_pieces=config.max_pieces)
            summary = {"cross_tokenizer": asdict(config), "content_hash": vocab_map.save(directory / vocab_maps.VOCAB_MAP_FILE),
                       **vocab_map.metadata}
        write_json_atomic(directory / VOCAB_MAP_SUMMARY, summary)  # the marker: written last

    return write


def train_student(tokenized_corpus: TokenizedCorpus, teacher_topk: Path, teacher_model: Path,
                  params: dict, vocab_map: Path | None = None) -> Callable[[Path], None]:
    """The writer of the student folder that `DirectoryDataset.save` runs: trains into it
    (checkpoints beside it, so a killed run resumes); its `training_summary.json` is the summary.

    Args:
        tokenized_corpus: the corpus (train split trained on, validation split evaluated).
        teacher_topk: the top-k artifact folder (not read when `loss.kd_loss_weight` is 0).
        teacher_model: the teacher HF folder (tokenizer; layers for `prune_teacher`).
        params: `distill` parameters: student_init, loss, trainer, k, topk_verify, tracking,
            cross_tokenizer.
        vocab_map: the vocab_map folder (`build_vocab_map`), read when `cross_tokenizer` is set.
    """
    from kd_pipeline.core.cross_tokenizer.config import CrossTokenizerConfig
    from kd_pipeline.core.cross_tokenizer.vocab_map import VOCAB_MAP_FILE
    from kd_pipeline.core.losses import KDLossConfig
    from kd_pipeline.core.models.student import StudentInit
    from kd_pipeline.core.training.config import TrainConfig
    from kd_pipeline.core.training.run import train_student as run_training

    unknown = sorted(set(params) - set(_PARAM_GROUPS))
    if unknown:
        raise ValueError(f"unknown distill parameter(s) {unknown}; allowed: {list(_PARAM_GROUPS)}")
    k = params.get("k")
    require_int("distill", "k", k, minimum=1, allow_none=True)  # before any work
    topk_verify = params.get("topk_verify", "auto")
    require_choice("distill", "topk_verify", topk_verify, VERIFY_MODES)
    loss = KDLossConfig.from_dict(params.get("loss") or {})
    student_init = StudentInit.from_params(params.get("student_init"))
    train = TrainConfig.from_dict(params.get("trainer"))
    kd = loss.kd_loss_weight > 0
    cross = CrossTokenizerConfig.from_params(params.get("cross_tokenizer"))
    tags = {"teacher_topk_manifest_sha256": (manifest_sha256(teacher_topk) or "missing") if kd else "none (SFT only)",
            "git_commit": tracking.git_commit(), "kd_run_kind": "KD+SFT" if kd else "SFT-only"}
    map_path = None
    if cross is not None:
        map_path = Path(vocab_map) / VOCAB_MAP_FILE
        tags.update({"cross_tokenizer_pair": f"{teacher_model} -> {cross.student_tokenizer}",
                     **tracking.vocab_map_tags(vocab_map, params.get("cross_tokenizer"))})
    tracking.set_tags(tags, "distill")

    def write_student(directory: Path) -> None:
        run_training(teacher_dir=teacher_model, corpus=tokenized_corpus, student_init=student_init, loss=loss,
                     train=train, output_dir=directory, topk_dir=teacher_topk if kd else None,
                     k=k, topk_verify=topk_verify, callbacks=tracking.training_callbacks(),
                     cross_tokenizer=cross, vocab_map_path=map_path)

    return write_student


def summarize_training(student_model: Path, tracking_params: dict) -> dict[str, Any]:
    """The training summary (losses, steps, tokens/s, log history) from the student folder; logs
    the loss curve and, when `tracking.log_student`, the student as an MLflow model (registered
    as `tracking.register_as` when set)."""
    from kd_pipeline.core.training.run import LOSS_CURVE_FILE, SUMMARY_FILE

    summary = json.loads((Path(student_model) / SUMMARY_FILE).read_text())
    tracking.log_artifacts(Path(student_model) / LOSS_CURVE_FILE, "distill")
    tracking_params = tracking_params or {}
    if tracking_params.get("log_student", True):
        tracking.log_student_model(student_model, tracking_params.get("register_as"))
    elif tracking_params.get("register_as"):
        raise ValueError("distill.tracking.register_as needs log_student: true (the registered model is the logged one)")
    return summary
