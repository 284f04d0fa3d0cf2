"""MLflow, git and DVC helpers of the pipeline layer: run tags, artifacts, the identities of a
run's inputs, and the loss-curve history shared by runs. The only place besides the Kedro hooks
(kedro-mlflow) that talks to MLflow; `kd_pipeline.core` never does."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Mapping, Sequence

from kd_pipeline.core.atomic import write_json_atomic
from kd_pipeline.core.topk_store import manifest_sha256
from kd_pipeline.paths import project_root

logger = logging.getLogger(__name__)

KD_LABEL, SFT_LABEL = "KD+SFT", "SFT-only"
_HISTORY_FILES = {KD_LABEL: "kd_sft.json", SFT_LABEL: "sft_only.json"}
STAGES = ("corpus_prep", "teacher_logits", "distill", "evaluate")
# MLflow 3 opens an experiment in its GenAI view unless it is tagged as model training.
EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
_MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value (kedro-mlflow truncates the same way)
HEADLINE_METRICS = ("student_nll", "teacher_nll", "nll_gap", "kl_teacher_student_topk", "top1_agreement")


def is_main_process() -> bool:
    """Rank 0 under `torchrun --nproc-per-node N kedro run ...` (every rank runs the nodes)."""
    return int(os.environ.get("RANK", "0")) == 0


def mlflow_active() -> bool:
    """Whether kedro-mlflow opened a run that this process should log into."""
    import mlflow

    return mlflow.active_run() is not None


def set_tags(tags: Mapping[str, str], stage: str) -> None:
    """Tag the active MLflow run (main process only); the tags are logged either way."""
    if mlflow_active() and is_main_process():
        import mlflow

        mlflow.set_tags(dict(tags))
    logger.info("%s: run tags %s", stage, dict(tags))


def log_artifacts(path: str | os.PathLike, artifact_path: str) -> None:
    """Log a file or a folder's files into the active MLflow run (main process only)."""
    if not (mlflow_active() and is_main_process()):
        return
    import mlflow

    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    elif path.is_file():
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def git_commit() -> str:
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


def run_label(distill_params: Mapping[str, Any]) -> str:
    """`SFT-only` when the distill KD weight is 0, else `KD+SFT`."""
    loss = distill_params.get("loss", distill_params)
    return SFT_LABEL if float(loss.get("kd_loss_weight", 1.0)) == 0 else KD_LABEL


def dvc_experiment_tags() -> dict[str, str]:
    """The DVC experiment this run belongs to (DVC sets these for `dvc exp run`, temp and queued too)."""
    names = {"DVC_EXP_NAME": "dvc_exp_name", "DVC_EXP_BASELINE_REV": "dvc_exp_baseline_rev"}
    return {tag: os.environ[env] for env, tag in names.items() if os.environ.get(env)}


#: The vocabulary map folder's summary file (written by distill's build_vocab_map node).
VOCAB_MAP_SUMMARY = "vocab_map.json"


def vocab_map_tags(vocab_map: Path | None, cross_tokenizer: Mapping | None) -> dict[str, str]:
    """The tokenizer pair of a student with its own tokenizer (`distill.cross_tokenizer`): both
    tokenizers' fingerprints and the vocabulary map's content hash, from the map's summary
    (`vocab_map.json`); {} for a student sharing the teacher's tokenizer."""
    if not cross_tokenizer or vocab_map is None:
        return {}
    summary = json.loads((Path(vocab_map) / VOCAB_MAP_SUMMARY).read_text())
    return {"cross_tokenizer_student_tokenizer": str(cross_tokenizer.get("student_tokenizer")),
            "teacher_tokenizer_fingerprint": summary.get("teacher_fingerprint", "missing"),
            "student_tokenizer_fingerprint": summary.get("student_fingerprint", "missing"),
            "vocab_map_sha256": summary.get("content_hash", "missing"),
            "vocab_map_matched_teacher_ids": str(summary.get("teacher_matched_ids", "?")),
            "vocab_map_matched_student_ids": str(summary.get("student_matched_ids", "?"))}


def artifact_tags(teacher_topk: Path, lock_file: Path | None = None) -> dict[str, str]:
    """The teacher artifact's identity: its DVC hash (from dvc.lock, when DVC produced it) and
    the sha256 of its manifest (which holds every shard's sha256)."""
    tags = {}
    sha256 = manifest_sha256(teacher_topk)
    if sha256:
        tags["teacher_topk_manifest_sha256"] = sha256
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


def curve_history(history_dir: Path, label: str, log_history: list[dict]) -> dict[str, dict]:
    """Record this run's loss history as the latest of its kind (`KD+SFT` or `SFT-only`) under
    `history_dir`, and return the latest run of each kind (`label -> run`) for the overlay.

    `history_dir` lies outside the catalog on purpose: it must outlive DVC's experiment copies
    (`dvc exp run` runs in `.dvc/tmp/exps/...`), so whichever of the two kinds runs second
    finds the other.
    """
    this_run = {"label": label, "dvc_exp_name": os.environ.get("DVC_EXP_NAME"), "log_history": log_history}
    write_json_atomic(history_dir / _HISTORY_FILES[label], this_run)
    comparison = {}
    for name in (KD_LABEL, SFT_LABEL):
        path = history_dir / _HISTORY_FILES[name]
        if path.is_file():
            run = this_run if name == label else json.loads(path.read_text())
            comparison[f"{name} [{run['dvc_exp_name']}]" if run.get("dvc_exp_name") else name] = run
    return comparison


# --------------------------------------------------------------------------------------------
# The run's identity and the end-of-run summary


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"distill": {"loss": {"kd_loss_weight": 0.5}}}` -> `{"distill.loss.kd_loss_weight": "0.5"}`,
    the keys and values kedro-mlflow logs for a node's `params:` inputs (flatten, sep ".")."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = str(value)[:_MAX_PARAM_LENGTH]
    return flat


def student_description(params: Mapping[str, Any]) -> str:
    """What distinguishes a student run: `kd fwd_kl w0.5 T1 k64`, or `sft-only`."""
    distill = params.get("distill") or {}
    loss = distill.get("loss") or {}
    if float(loss.get("kd_loss_weight", 1.0)) == 0:
        return "sft-only"
    kind = loss.get("kd_loss", "fwd_kl")
    if kind == "jsd":
        kind = f"jsd b{float(loss.get('beta', 0.5)):g}"
    temperature = 1.0 / float(loss.get("logits_scale") or 1.0)
    k = distill.get("k") or (params.get("teacher_logits") or {}).get("k")
    parts = ["kd", kind, f"w{float(loss.get('kd_loss_weight', 1.0)):g}", f"T{temperature:g}"]
    if float(loss.get("sft_loss_weight", 1.0)) != 1.0:
        parts.append(f"sft{float(loss['sft_loss_weight']):g}")
    if k:
        parts.append(f"k{k}")
    return " ".join(parts)


def run_name(pipeline_names: Sequence[str], params: Mapping[str, Any]) -> str:
    """`distill kd fwd_kl w0.5 T1 k64`, `evaluate sft-only`, `teacher_logits k64 logquant_zstd`;
    a DVC experiment's name replaces the settings (`distill sft-only-2`)."""
    names = sorted((name for name in pipeline_names if name != "__default__"),
                   key=lambda name: STAGES.index(name) if name in STAGES else len(STAGES))  # run order
    stages = "+".join(names) if names else "all"
    if os.environ.get("DVC_EXP_NAME"):
        return f"{stages} {os.environ['DVC_EXP_NAME']}"
    if not names or {"distill", "evaluate"} & set(names):
        return f"{stages} {student_description(params)}"
    if "teacher_logits" in names:
        extraction = params.get("teacher_logits") or {}
        return f"{stages} k{extraction.get('k')} {extraction.get('codec')}"
    corpus = params.get("corpus_prep") or {}
    return f"{stages} {(corpus.get('source') or {}).get('kind')} {(corpus.get('teacher') or {}).get('kind')}"


def start_run_identity(pipeline_names: Sequence[str], params: Mapping[str, Any], runner: str | None = None) -> None:
    """Name the active run from what varies, tag its experiment as model training, and log the
    project's parameters of all four stages (flattened), the same for every route (`kedro run`,
    `dvc repro`, `dvc exp run`)."""
    if not (mlflow_active() and is_main_process()):
        return
    import mlflow

    run = mlflow.active_run()
    client = mlflow.MlflowClient()
    experiment = client.get_experiment(run.info.experiment_id)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
        client.set_experiment_tag(run.info.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    name = run_name(pipeline_names, params)
    mlflow.set_tag("mlflow.runName", name)
    if runner:  # kedro-mlflow's `runner` tag holds the runner object's repr
        mlflow.set_tag("runner", runner)
    mlflow.log_params(flatten_params({stage: params[stage] for stage in STAGES if stage in params}))
    logger.info("MLflow run %r (%s)", name, run.info.run_id)


def run_summary(pipeline_names: Sequence[str], env: str | None, paths: Mapping[str, str | None],
                metrics: Mapping[str, float] | None, distill_summary: Mapping[str, Any] | None) -> str:
    """The lines printed when a run ends: outputs, headline metrics, the MLflow run and how to open it."""
    names = [name for name in pipeline_names if name != "__default__"] or list(STAGES)
    lines = [f"kd_pipeline: {', '.join(names)} done (Kedro env {env or 'local'})"]
    lines += [f"  {label + ':':<24}{path}" for label, path in paths.items() if path]
    if distill_summary:
        final_eval = distill_summary.get("final_eval") or {}
        shown = [f"{distill_summary.get('global_step')} steps"]
        shown += [f"{key} {final_eval[key]:.4g}" for key in ("eval_sft", "eval_loss") if key in final_eval]
        lines.append(f"  {'training:':<24}{', '.join(shown)}")
    if metrics:
        lines.append(f"  {'held-out:':<24}" + ", ".join(
            f"{key} {metrics[key]:.4g}" for key in HEADLINE_METRICS if key in metrics))
    if mlflow_active():
        import mlflow

        run = mlflow.MlflowClient().get_run(mlflow.active_run().info.run_id)  # its name as set since
        uri = mlflow.get_tracking_uri()
        lines.append(f"  {'MLflow run:':<24}{run.info.run_name} ({run.info.run_id})")
        lines.append(f"  {'compare runs:':<24}mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# What a run trained on, what it produced, and its step metrics

# MLflow's per-step metric names: held-out values sort (and are charted) before training ones.
HELDOUT_PREFIX, TRAIN_PREFIX = "heldout/", "train/"
_MAX_DIGEST_LENGTH = 36  # MLflow's dataset digest column (a DVC ".dir" md5 fits exactly)


def log_dataset_input(name: str, path: str | os.PathLike, context: str, dvc_md5: str | None,
                      content_sha256: str | None) -> None:
    """Log a folder the run read as an MLflow dataset input (the run's Dataset column): digest =
    its DVC hash when DVC produced it, else its content sha256 (cut to MLflow's 36 characters;
    the full value is an input tag)."""
    if not (mlflow_active() and is_main_process()):
        return
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    digest = dvc_md5 or (content_sha256 or "")[:_MAX_DIGEST_LENGTH] or None
    tags = {key: value for key, value in (("dvc_md5", dvc_md5), ("sha256", content_sha256)) if value}
    dataset = MetaDataset(LocalArtifactDatasetSource(str(Path(path).resolve())), name=name, digest=digest)
    mlflow.log_input(dataset, context=context, tags=tags)


def log_run_input(name: str, path: str | os.PathLike, context: str, content_sha256: str | None) -> None:
    """A dataset the run read, as an MLflow dataset input. Its DVC hash comes from dvc.lock only
    while DVC runs the stage (then the upstream stages' entries are current; for a plain
    `kedro run` the lock may describe other data): otherwise the content hash is the digest."""
    dvc_md5 = dvc_out_hash(path, project_root() / "dvc.lock") if os.environ.get("DVC_STAGE") else None
    log_dataset_input(name, path, context, dvc_md5, content_sha256)


def training_callbacks() -> list:
    """The Trainer callbacks that record a run: our step metrics when an MLflow run is active."""
    return [step_metrics_callback()] if mlflow_active() and is_main_process() else []


# The input example logged with the student model (a prompt of evaluate.generation).
STUDENT_INPUT_EXAMPLE = ("Continue this passage from the King James Bible.\n\n"
                         "In the beginning God created the heaven and the earth.")


def log_student_model(student_dir: str | os.PathLike, register_as: str | None = None,
                      input_example: str = STUDENT_INPUT_EXAMPLE) -> str | None:
    """Log the student folder as an MLflow model (transformers flavor, with its tokenizer and an
    input example), so that the UI's "Register model" works; register it as `register_as` when
    set. Returns the model URI (None without an active run)."""
    if not (mlflow_active() and is_main_process()):
        return None
    import mlflow
    import torch
    import transformers
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from kd_pipeline.core.models.loading import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(student_dir), load_tokenizer(student_dir)
    # Given, so that MLflow neither runs the model to infer it nor resolves requirements itself.
    signature = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]))
    requirements = [f"transformers=={transformers.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                    f"mlflow=={mlflow.__version__}"]
    info = mlflow.transformers.log_model(
        {"model": model, "tokenizer": tokenizer}, name="student", task="text-generation",
        input_example=input_example, signature=signature, pip_requirements=requirements,
        registered_model_name=register_as or None)
    logger.info("distill: logged the student as MLflow model %s%s", info.model_uri,
                f", registered as {register_as!r}" if register_as else "")
    return info.model_uri


def step_metrics_callback():
    """A Trainer callback logging each `on_log` row into the active MLflow run at its optimizer
    step: `train/<key>` for training rows, `heldout/<key>` for evaluation rows (`eval_sft` ->
    `heldout/sft`). It replaces HF's MLflowCallback (report_to none), which also logged ~200
    TrainingArguments and model-config params."""
    from transformers import TrainerCallback

    class StepMetricsCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or not state.is_world_process_zero or not mlflow_active():
                return
            import mlflow

            metrics = {}
            for key, value in logs.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or _timing_key(key):
                    continue
                if key.startswith("eval_"):
                    metrics[f"{HELDOUT_PREFIX}{key[len('eval_'):]}"] = float(value)
                else:
                    metrics[f"{TRAIN_PREFIX}{key}"] = float(value)
            if metrics:
                mlflow.log_metrics(metrics, step=state.global_step)

    return StepMetricsCallback()


def _timing_key(key: str) -> bool:
    """HF's run totals and eval timings (`train_runtime`, `eval_samples_per_second`, `total_flos`,
    the end-of-training `train_loss` mean): not step metrics. Our `tokens_per_second` is kept."""
    return key in ("total_flos", "train_loss") or key.endswith(("_runtime", "samples_per_second",
                                                                 "steps_per_second"))
