"""Nodes of evaluate: thin calls into kd_pipeline.core.evaluation and core.plots, plus the MLflow
run's tags (kd_pipeline.tracking)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from kd_pipeline import tracking
from kd_pipeline.core.atomic import atomic_dir
from kd_pipeline.core.plots import log_history, plot_loss_curves
from kd_pipeline.paths import home_project_root

if TYPE_CHECKING:
    from kd_pipeline.core.corpus import TokenizedCorpus

# core.evaluation is imported inside the nodes: Kedro imports every pipeline at startup, and
# torch and transformers cost seconds that the other stages need not pay.

logger = logging.getLogger(__name__)


def evaluate_student(student_model: Path, tokenized_corpus: TokenizedCorpus, teacher_topk: Path,
                     teacher_model: Path, params: dict, vocab_map: Path | None = None,
                     cross_tokenizer: dict | None = None) -> dict[str, float]:
    """Validation metrics of the student: NLL/perplexity and bits per byte, KL to the teacher,
    agreement, overlap (after checking that the artifact was made from this corpus and this
    teacher); for a student with its own tokenizer (`distill.cross_tokenizer`) the aligned-span
    versions (core/cross_tokenizer/evaluation.py)."""
    from kd_pipeline.core.cross_tokenizer.config import CrossTokenizerConfig
    from kd_pipeline.core.evaluation.metrics import EvalConfig, evaluate_on_artifact

    config = EvalConfig.from_params(params)
    if CrossTokenizerConfig.from_params(cross_tokenizer) is not None:
        from kd_pipeline.core.cross_tokenizer.evaluation import evaluate_cross_tokenizer_on_artifact
        from kd_pipeline.core.cross_tokenizer.vocab_map import VOCAB_MAP_FILE

        metrics = evaluate_cross_tokenizer_on_artifact(student_model, teacher_model, tokenized_corpus, teacher_topk,
                                                       Path(vocab_map) / VOCAB_MAP_FILE, config)
    else:
        metrics = evaluate_on_artifact(student_model, tokenized_corpus, teacher_topk, config, teacher_dir=teacher_model)
    logger.info("evaluate: %s", ", ".join(f"{key}={value:.4g}" for key, value in metrics.items()))
    return metrics


def generate_samples(student_model: Path, teacher_model: Path, params: dict) -> str:
    """Greedy completions of the fixed chat prompts by the student (and the teacher), as text."""
    from kd_pipeline.core.evaluation.generation import GenerationConfig, generate_side_by_side

    config = GenerationConfig.from_params(params)
    folders = {"student": student_model, **({"teacher": teacher_model} if config.include_teacher else {})}
    return generate_side_by_side(folders, config)


def plot_training_curves(distill_summary: dict, distill_params: dict, params: dict) -> Callable[[Path], None]:
    """The writer of the plot folder: this run's curves, and KD+SFT vs SFT-only once both exist.

    Side effect, declared by `evaluate.plots.history_dir`: the latest loss history of each kind
    is kept there, in the user's project (also when DVC runs this in a `.dvc/tmp/exps` copy), so
    whichever of the two runs comes second draws the overlay (`tracking.curve_history`).
    """
    label = tracking.run_label(distill_params)
    history_dir = home_project_root() / params.get("history_dir", "data/08_reporting/curve_history")
    comparison = tracking.curve_history(history_dir, label, log_history(distill_summary))
    run = tracking.run_name(["distill"], {"distill": distill_params})  # the distill run's MLflow name

    def write_plots(directory: Path) -> None:
        with atomic_dir(directory) as tmp:
            plot_loss_curves(distill_summary, tmp, comparison, title=f"{label}: {run}")

    return write_plots


def track_evaluation(eval_metrics: dict[str, float], teacher_topk: Path, distill_params: dict,
                     teacher_logits_params: dict, vocab_map: Path | None = None) -> dict[str, dict]:
    """Tags the active MLflow run (DVC experiment, artifact hashes, a student tokenizer's pair and
    vocabulary map) and returns the metrics in
    kedro-mlflow's `MlflowMetricsHistoryDataset` format, as `heldout/<name>` (metrics.json keeps
    the plain names): they sort, and are charted, before any training metric.

    `teacher_logits_params` is an input only so that kedro-mlflow logs it (the project's hook
    logs every stage's parameters anyway).
    """
    tags = {"kd_run_kind": tracking.run_label(distill_params), **tracking.artifact_tags(teacher_topk),
            **tracking.dvc_experiment_tags(),
            **tracking.vocab_map_tags(vocab_map, distill_params.get("cross_tokenizer"))}
    tracking.set_tags(tags, "evaluate")
    return {f"{tracking.HELDOUT_PREFIX}{key}": {"value": float(value), "step": 0} for key, value in eval_metrics.items()}
