"""Nodes of distill: thin calls into kd_pipeline.core.training, plus the MLflow run's tags and
artifacts (the only place MLflow is called; per-step metrics come from the HF Trainer's MLflow
callback, which logs into kedro-mlflow's active run)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

from kd_pipeline.core import training
from kd_pipeline.core.atomic import sha256_file
from kd_pipeline.core.corpus import TokenizedCorpus
from kd_pipeline.core.losses import KDLossConfig
from kd_pipeline.core.modeling import StudentInit
from kd_pipeline.paths import project_root

logger = logging.getLogger(__name__)

_PARAM_GROUPS = ("student_init", "loss", "trainer", "k", "tracking")
# HF's MLflow callback opens its own run when these are set; the run must be kedro-mlflow's.
_SECOND_RUN_ENV = ("MLFLOW_NESTED_RUN", "MLFLOW_RUN_ID")


def train_student(tokenized_corpus: TokenizedCorpus, teacher_topk: Path, teacher_model: Path,
                  params: dict) -> Callable[[Path], dict]:
    """A writer of the student folder: trains (resuming from checkpoints) when the catalog saves it.

    Args:
        tokenized_corpus: the corpus (train split trained on, validation split evaluated).
        teacher_topk: the top-k artifact folder (not read when `loss.kd_loss_weight` is 0).
        teacher_model: the teacher HF folder (tokenizer; layers for `prune_teacher`).
        params: `distill` parameters: student_init, loss, trainer, k, tracking.

    Returns:
        `write(directory) -> summary`, for `DirectoryDataset.save`.
    """
    unknown = sorted(set(params) - set(_PARAM_GROUPS))
    if unknown:
        raise ValueError(f"unknown distill parameter(s) {unknown}; allowed: {list(_PARAM_GROUPS)}")
    loss = KDLossConfig.from_dict(params.get("loss") or {})
    kd = loss.kd_loss_weight > 0
    _tag_run({"teacher_topk_manifest_sha256": _manifest_sha256(teacher_topk) if kd else "none (SFT only)",
              "git_commit": _git_commit(), "kd_run_kind": "KD+SFT" if kd else "SFT-only"})
    return functools.partial(
        _train_into,
        teacher_dir=teacher_model,
        corpus=tokenized_corpus,
        student_init=StudentInit.from_params(params.get("student_init")),
        loss=loss,
        train=training.TrainConfig.from_dict(params.get("trainer")),
        topk_dir=teacher_topk if kd else None,
        k=params.get("k"),
    )


def summarize_training(student_model: Path, tracking: dict) -> dict[str, Any]:
    """The training summary (losses, steps, tokens/s, log history); logs the loss curve and, when
    `tracking.log_student`, the student folder as MLflow artifacts."""
    summary = json.loads((Path(student_model) / training.SUMMARY_FILE).read_text())
    import mlflow

    if mlflow.active_run() is not None and _is_main_process():
        curve = Path(student_model) / training.LOSS_CURVE_FILE
        if curve.is_file():
            mlflow.log_artifact(str(curve), artifact_path="distill")
        if (tracking or {}).get("log_student", True):
            mlflow.log_artifacts(str(student_model), artifact_path="distill/student_model")
    return summary


def _train_into(directory: Path, **kwargs) -> dict:
    import mlflow

    report_to = ["mlflow"] if mlflow.active_run() is not None else []
    with _one_mlflow_run():
        return training.train_student(output_dir=directory, report_to=report_to, **kwargs)


@contextlib.contextmanager
def _one_mlflow_run() -> Iterator[None]:
    """Unset the variables that make HF's MLflowCallback start a second (nested) run."""
    saved = {name: os.environ.pop(name) for name in _SECOND_RUN_ENV if name in os.environ}
    if saved:
        logger.warning("distill: ignoring %s so that the Trainer logs into the kedro-mlflow run", sorted(saved))
    try:
        yield
    finally:
        os.environ.update(saved)


def _is_main_process() -> bool:
    """Rank 0 under `torchrun --nproc-per-node N kedro run ...` (every rank runs the nodes)."""
    return int(os.environ.get("RANK", "0")) == 0


def _tag_run(tags: dict[str, str]) -> None:
    import mlflow

    if mlflow.active_run() is not None and _is_main_process():
        mlflow.set_tags(tags)
    logger.info("distill: run tags %s", tags)


def _manifest_sha256(teacher_topk: Path) -> str:
    manifest = Path(teacher_topk) / "manifest.json"
    return sha256_file(manifest) if manifest.is_file() else "missing"


def _git_commit() -> str:
    """HEAD of the project's git repository, with `-dirty` when there are uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=project_root(), capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        dirty = False
    return f"{commit}-dirty" if dirty else commit
