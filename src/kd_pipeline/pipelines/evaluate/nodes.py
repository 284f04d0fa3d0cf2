"""Nodes of evaluate: thin calls into kd_pipeline.core.evaluation, plus the MLflow run's tags."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from kd_pipeline.core import evaluation, modeling
from kd_pipeline.core.atomic import sha256_file, write_json_atomic
from kd_pipeline.core.corpus import TokenizedCorpus
from kd_pipeline.paths import home_project_root, project_root

logger = logging.getLogger(__name__)

KD_LABEL, SFT_LABEL = "KD+SFT", "SFT-only"


def evaluate_student(student_model: Path, tokenized_corpus: TokenizedCorpus, teacher_topk: Path,
                     params: dict) -> dict[str, float]:
    """Validation metrics of the student: NLL/perplexity, KL to the teacher, agreement, overlap."""
    from kd_pipeline.core.topk_store import TopKReader

    config = evaluation.EvalConfig.from_params(params)
    model = modeling.load_causal_lm(student_model, device=evaluation.resolve_device(config.device))
    metrics = evaluation.evaluate_student(model, tokenized_corpus.split(config.split), TopKReader(teacher_topk),
                                          config)
    logger.info("evaluate: %s", ", ".join(f"{key}={value:.4g}" for key, value in metrics.items()))
    return metrics


def generate_samples(student_model: Path, teacher_model: Path, params: dict) -> str:
    """Greedy completions of the fixed chat prompts by the student (and the teacher), as text."""
    config = evaluation.GenerationConfig.from_params(params)
    folders = {"student": student_model, **({"teacher": teacher_model} if config.include_teacher else {})}
    completions = {}
    for name, folder in folders.items():
        model, tokenizer = modeling.load_causal_lm(folder), modeling.load_tokenizer(folder)
        completions[name] = evaluation.generate_greedy(model, tokenizer, config)
    return evaluation.format_generations(config, completions)


def plot_training_curves(distill_summary: dict, distill_params: dict, params: dict) -> Callable[[Path], list[Path]]:
    """A writer of the plot folder: this run's curves, and KD+SFT vs SFT-only once both exist.

    The latest summary of each kind is kept under `history_dir` of the user's project (also
    when DVC runs this in a `.dvc/tmp/exps` copy), so whichever of the two runs comes second
    draws the overlay.
    """
    label = run_label(distill_params)
    history_dir = home_project_root() / params.get("history_dir", "data/08_reporting/curve_history")
    this_run = {"label": label, "dvc_exp_name": os.environ.get("DVC_EXP_NAME"),
                "log_history": evaluation.log_history(distill_summary)}
    write_json_atomic(history_dir / _history_file(label), this_run)
    comparison = {}
    for name in (KD_LABEL, SFT_LABEL):
        path = history_dir / _history_file(name)
        if path.is_file():
            run = this_run if name == label else json.loads(path.read_text())
            comparison[f"{name} [{run['dvc_exp_name']}]" if run.get("dvc_exp_name") else name] = run

    def write(directory: Path) -> list[Path]:
        tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        evaluation.plot_loss_curves(distill_summary, tmp, comparison, title=f"training curves ({label})")
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
        return sorted(directory.glob("*.png"))

    return write


def track_evaluation(eval_metrics: dict[str, float], teacher_topk: Path, distill_params: dict,
                     teacher_logits_params: dict) -> dict[str, dict]:
    """Tags the active MLflow run (DVC experiment, artifact hashes) and returns the metrics in
    kedro-mlflow's `MlflowMetricsHistoryDataset` format.

    `distill_params` and `teacher_logits_params` are inputs only so that kedro-mlflow logs them.
    """
    tags = {"kd_run_kind": run_label(distill_params), **artifact_tags(teacher_topk), **dvc_experiment_tags()}
    import mlflow

    if mlflow.active_run() is not None:
        if tags.get("dvc_exp_name"):
            tags["mlflow.runName"] = f"evaluate {tags['dvc_exp_name']}"
        mlflow.set_tags(tags)
    logger.info("evaluate: run tags %s", tags)
    return {key: {"value": float(value), "step": 0} for key, value in eval_metrics.items()}


def run_label(distill_params: dict) -> str:
    """`SFT-only` when the distill KD weight is 0, else `KD+SFT`."""
    loss = distill_params.get("loss", distill_params)
    return SFT_LABEL if float(loss.get("kd_loss_weight", 1.0)) == 0 else KD_LABEL


def _history_file(label: str) -> str:
    return {KD_LABEL: "kd_sft.json", SFT_LABEL: "sft_only.json"}[label]


def dvc_experiment_tags() -> dict[str, str]:
    """The DVC experiment this run belongs to (DVC sets these for `dvc exp run`, temp and queued too)."""
    names = {"DVC_EXP_NAME": "dvc_exp_name", "DVC_EXP_BASELINE_REV": "dvc_exp_baseline_rev"}
    return {tag: os.environ[env] for env, tag in names.items() if os.environ.get(env)}


def artifact_tags(teacher_topk: Path, lock_file: Path | None = None) -> dict[str, str]:
    """The teacher artifact's identity: its DVC hash (from dvc.lock, when DVC produced it) and
    the sha256 of its manifest (which holds every shard's sha256)."""
    tags = {}
    manifest = Path(teacher_topk) / "manifest.json"
    if manifest.is_file():
        tags["teacher_topk_manifest_sha256"] = sha256_file(manifest)
    dvc_hash = dvc_out_hash(teacher_topk, lock_file or project_root() / "dvc.lock")
    if dvc_hash:
        tags["teacher_topk_dvc_md5"] = dvc_hash
    return tags


def dvc_out_hash(path: str | os.PathLike, lock_file: Path) -> str | None:
    """The md5 dvc.lock records for the stage output at `path` (relative to the lock's folder)."""
    if not lock_file.is_file():
        return None
    import yaml

    root = lock_file.resolve().parent
    wanted = Path(path) if Path(path).is_absolute() else Path.cwd() / path
    lock: dict[str, Any] = yaml.safe_load(lock_file.read_text()) or {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if (root / out.get("path", "")).resolve() == wanted.resolve():
                return out.get("md5")
    return None
