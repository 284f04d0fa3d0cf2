"""Student training end to end: build the student, the datasets and the trainer, resume from the
last complete checkpoint, and write the final student as a plain HF folder (safetensors +
tokenizer) that `AutoModelForCausalLM.from_pretrained` loads, plus `training_summary.json` and
`loss_curve.png`."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from kd_pipeline.core.atomic import atomic_dir, canonical_json, write_json_atomic
from kd_pipeline.core.locking import FolderLock
from kd_pipeline.core.losses import KDLossConfig, SampledWeights, require_sampled_support
from kd_pipeline.core.memory import release_unused_memory
from kd_pipeline.core.models.identity import model_identity, tokenizer_hash
from kd_pipeline.core.models.loading import load_tokenizer
from kd_pipeline.core.models.student import init_student
from kd_pipeline.core.params import require_choice, require_int
from kd_pipeline.core.plots import plot_training_curves
from kd_pipeline.core.topk_store import (
    VERIFY_MODES,
    ArtifactMismatchError,
    check_artifact_compatibility,
    manifest_sha256,
)
from kd_pipeline.core.training.checkpoints import (
    is_finished,
    load_checkpoint_weights,
    load_sharded_checkpoint_weights,
    prepare_checkpoint_dir,
)
from kd_pipeline.core.training.config import TrainConfig, training_arguments
from kd_pipeline.core.training.data import DistillCollator, DistillDataset
from kd_pipeline.core.training.trainer import (
    CrossTokenizerTrainer,
    DistillationTrainer,
    DistillLogCallback,
    DistillProgressCallback,
    EndOfTrainingCallback,
    ReleaseMemoryCallback,
    evaluated_this_step,
)

logger = logging.getLogger(__name__)

SUMMARY_FILE = "training_summary.json"
LOSS_CURVE_FILE = "loss_curve.png"


def train_student(
    *,
    teacher_dir: str | os.PathLike,
    corpus,
    student_init,
    loss: KDLossConfig,
    train: TrainConfig,
    output_dir: str | os.PathLike,
    topk_dir: str | os.PathLike | None = None,
    k: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    report_to: Sequence[str] = (),
    callbacks: Iterable[TrainerCallback] = (),
    targets=None,
    topk_verify: str = "auto",
    cross_tokenizer=None,
    vocab_map_path: str | os.PathLike | None = None,
) -> dict:
    """Train the student and save it as an HF folder at `output_dir` (atomically replaced).

    Args:
        teacher_dir: the prepared teacher folder (tokenizer; weights for `prune_teacher`; the artifact's teacher).
        corpus: the `TokenizedCorpus` (train split trained on, validation split evaluated).
        student_init: a `models.student.StudentInit`.
        loss: the loss config; `kd_loss_weight == 0` trains SFT only and needs no artifact.
        train: the `TrainConfig`.
        output_dir: where the final student goes.
        topk_dir: the teacher top-k artifact (required when `kd_loss_weight > 0`).
        k: top-k columns to use (None: all the artifact has).
        checkpoint_dir: resumable checkpoints (default: `<output_dir>_checkpoints` beside it).
        report_to: Trainer integrations (`["mlflow"]` logs into the active MLflow run).
        callbacks: extra `TrainerCallback`s.
        targets: an already open targets provider with `.manifest` (a `topk_store.Manifest`) and
            `.get_many` (synthetic data in checks and benchmarks); overrides `topk_dir`.
        topk_verify: `TopKReader(verify=...)`: shard checksums all at open (`full`), on first read
            (`lazy`), or `auto` (full up to 16 GiB).
        cross_tokenizer: a `cross_tokenizer.config.CrossTokenizerConfig` for a student with its
            own tokenizer (the corpus and artifact stay the teacher's), or None.
        vocab_map_path: the pair's stored `VocabMap` (required with `cross_tokenizer`).

    Returns:
        A JSON-able summary: final train/eval losses, steps, tokens/s, the log history, ...

    Raises:
        ValueError: `k` or `topk_verify` is not valid (checked before any work, naming the key).
        FolderLockedError: another process is training into `output_dir` (or its checkpoints).
        ArtifactMismatchError: manifest does not fit the corpus, tokenizer, vocabulary, teacher or k.
        NonFiniteLossError / NonFiniteGradientError: the loss / a step's gradient norm became NaN or
            Inf (names the step and its sample ids); nothing is saved.
    """
    from transformers import set_seed

    require_int("distill", "k", k, minimum=1, allow_none=True)  # before any work
    require_choice("distill", "topk_verify", topk_verify, VERIFY_MODES)
    output_dir = Path(output_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else output_dir.with_name(f"{output_dir.name}_checkpoints")
    started = time.perf_counter()
    with _locked(output_dir, checkpoint_dir):
        set_seed(train.seed)
        model, tokenizer = init_student(student_init, teacher_dir,
                                        cross_tokenizer.student_tokenizer if cross_tokenizer else None)
        # The corpus and the artifact are the teacher's tokens: with its own tokenizer the student
        # is checked against the teacher's tokenizer and vocabulary instead of its own.
        corpus_tokenizer = load_tokenizer(teacher_dir) if cross_tokenizer else tokenizer
        corpus_tokenizer_hash = tokenizer_hash(corpus_tokenizer)
        _check_corpus_tokenizer(corpus, corpus_tokenizer_hash, "teacher" if cross_tokenizer else "student")
        vocab_size = (_model_vocab_size(teacher_dir) if cross_tokenizer
                      else model.get_output_embeddings().weight.shape[0])
        targets, used_k, manifest_id = _open_targets(loss, targets, topk_dir, corpus, corpus_tokenizer_hash,
                                                     vocab_size, k, teacher_dir, topk_verify)
        if cross_tokenizer is not None:
            _require_cross_tokenizer_capture(targets)
        cross = (_cross_tokenizer_setup(cross_tokenizer, vocab_map_path, corpus_tokenizer, tokenizer, loss)
                 if cross_tokenizer is not None else None)
        # At the capture temperature itself log Z = 0: a provider without log-normalizers is exact too.
        logz = (None if cross is not None else
                dict(logz_column=_logz_column(loss, targets), logz_optional=loss.target_logits_scale == 1.0,
                     sampled=_sampled_weights(loss, targets, k)))
        train_set, eval_set = _datasets(corpus, targets, used_k, tokenizer if cross else None, logz)

        args = training_arguments(train, checkpoint_dir, eval_set is not None, report_to, model.config.model_type)
        identity = _run_identity(train, loss, student_init, corpus, manifest_id, used_k, args,
                                 cross_tokenizer, cross, tokenizer)
        resume_from = prepare_checkpoint_dir(checkpoint_dir, identity, train.resume, args.process_index == 0)
        trainer = _make_trainer(cross, cross_tokenizer, train, model=model, args=args, train_dataset=train_set,
                                eval_dataset=eval_set, processing_class=tokenizer, loss_config=loss,
                                reduction=train.reduction, length_group_batches=train.length_group_batches,
                                callbacks=list(callbacks))
        train_metrics = _train(trainer, resume_from)
        _free_optimizer_state(trainer)
        if eval_set is not None and train.eval_at_end and not evaluated_this_step(args, trainer.state):
            trainer.evaluate()

        summary = _summary(trainer, train_metrics, args.use_liger_kernel, args, resume_from, manifest_id, used_k,
                           time.perf_counter() - started)
        if cross is not None:
            summary["cross_tokenizer"] = identity["cross_tokenizer"] | {"vocab_map_counts": cross["counts"]}
        _save_student(trainer, summary, output_dir, checkpoint_dir, train.keep_checkpoints)
        return summary


@contextlib.contextmanager
def _locked(output_dir: Path, checkpoint_dir: Path) -> Iterator[None]:
    """The student folder and its checkpoints, locked against a second run (`core.locking`);
    under torchrun the main process holds the locks for every rank (RANK is set before
    torch.distributed is initialized)."""
    with contextlib.ExitStack() as locks:
        if int(os.environ.get("RANK", "0")) == 0:
            for folder in (output_dir, checkpoint_dir):
                locks.enter_context(FolderLock(folder, purpose="distill: training the student"))
        yield


def _check_corpus_tokenizer(corpus, tokenizer_hash_: str, whose: str = "student") -> None:
    if corpus.meta.get("tokenizer_hash") not in (None, tokenizer_hash_):
        raise ArtifactMismatchError(
            f"corpus field 'tokenizer_hash' is {corpus.meta.get('tokenizer_hash')!r} but the {whose} tokenizer "
            f"hashes to {tokenizer_hash_!r}: the corpus was tokenized with another tokenizer"
        )


def _datasets(corpus, targets, k: int | None, student_tokenizer=None, logz: dict | None = None):
    """(train, validation or None) datasets; re-tokenized by `student_tokenizer` when given;
    `logz`: the `DistillDataset` log-normalizer arguments."""
    validation = corpus.split("validation")
    if student_tokenizer is None:
        logz = logz or {}
        train_set = DistillDataset(corpus.split("train"), targets, k, split="train", **logz)
        eval_set = DistillDataset(validation, targets, k, split="validation", **logz) if validation.num_rows else None
        return train_set, eval_set
    from kd_pipeline.core.cross_tokenizer.data import CrossTokenizerDataset

    train_set = CrossTokenizerDataset(corpus.split("train"), targets, student_tokenizer, k, split="train")
    eval_set = CrossTokenizerDataset(validation, targets, student_tokenizer, k, split="validation")
    return train_set, eval_set if validation.num_rows else None


def _run_identity(train: TrainConfig, loss: KDLossConfig, student_init, corpus, manifest_id, used_k, args,
                  cross_tokenizer, cross: dict | None, tokenizer) -> dict:
    """What makes two runs the same run: a checkpoint resumes only a run of equal identity."""
    identity = {"train": train.identity(), "loss": asdict(loss), "student_init": asdict(student_init),
                "corpus_fingerprint": corpus.fingerprint, "artifact": manifest_id, "k": used_k,
                "world_size": args.world_size}
    if cross is not None:
        identity["cross_tokenizer"] = {**asdict(cross_tokenizer), "vocab_map": cross["vocab_map_hash"],
                                       "student_tokenizer_hash": tokenizer_hash(tokenizer)}
    return identity


def _make_trainer(cross: dict | None, cross_tokenizer, train: TrainConfig, *, args, processing_class, **kwargs):
    """The same- or cross-tokenizer Trainer, with this project's progress, memory and
    end-of-training callbacks."""
    tokenizer = processing_class
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs.update(args=args, processing_class=tokenizer)
    if cross is None:
        trainer = DistillationTrainer(data_collator=DistillCollator(pad_id, train.pad_to_multiple_of), **kwargs)
    else:
        from kd_pipeline.core.cross_tokenizer.data import CrossTokenizerCollator

        trainer = CrossTokenizerTrainer(data_collator=CrossTokenizerCollator(pad_id, train.pad_to_multiple_of),
                                        projection=cross["projection"], options=cross_tokenizer.options, **kwargs)
    # Our labelled bar on a terminal; otherwise (see show_progress_bar) sparse log lines instead
    # of HF's printed dicts.
    trainer.remove_callback(PrinterCallback if args.disable_tqdm else ProgressCallback)
    trainer.add_callback(DistillLogCallback() if args.disable_tqdm else DistillProgressCallback())
    trainer.add_callback(ReleaseMemoryCallback())
    trainer.add_callback(EndOfTrainingCallback(train.keep_checkpoints))
    return trainer


def _model_vocab_size(model_dir) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_dir).vocab_size)


def _cross_tokenizer_setup(config, vocab_map_path, teacher_tokenizer, student_tokenizer, loss: KDLossConfig) -> dict:
    """The stored vocabulary map, checked to be the one of this (teacher, student) pair; a loss
    the cross-tokenizer loss cannot compute exactly refused first."""
    from kd_pipeline.core.cross_tokenizer.loss import require_supported_loss

    require_supported_loss(loss, "distill.cross_tokenizer with distill.loss")  # before any step
    from kd_pipeline.core.cross_tokenizer.token_bytes import token_bytes
    from kd_pipeline.core.cross_tokenizer.vocab_map import VocabMap, fingerprint

    if vocab_map_path is None:
        raise ValueError("distill.cross_tokenizer needs the pair's vocabulary map (vocab_map_path)")
    vocab_map = VocabMap.load(vocab_map_path)
    for side, tok in (("teacher", teacher_tokenizer), ("student", student_tokenizer)):
        if vocab_map.metadata.get(f"{side}_fingerprint") != fingerprint(token_bytes(tok)):
            raise ArtifactMismatchError(f"vocabulary map {vocab_map_path} was built for another {side} tokenizer: "
                                        "rebuild it (kedro run --pipelines distill)")
    if vocab_map.metadata.get("max_pieces") != str(config.max_pieces):
        raise ArtifactMismatchError(f"vocabulary map {vocab_map_path} has max_pieces "
                                    f"{vocab_map.metadata.get('max_pieces')}, the config {config.max_pieces}")
    counts = {key: value for key, value in vocab_map.metadata.items() if key.endswith(("_ids", "classes", "_size"))}
    return {"projection": vocab_map.projection(), "vocab_map_hash": vocab_map.content_hash, "counts": counts}


def _open_targets(loss: KDLossConfig, targets, topk_dir, corpus, student_tokenizer_hash: str, vocab_size: int,
                  k: int | None, teacher_dir, topk_verify: str):
    """(targets, k to use, manifest sha256) of the run; all None for SFT only (`kd_loss_weight` 0)."""
    if loss.kd_loss_weight == 0:
        return None, None, None
    if targets is None:
        if topk_dir is None:
            raise ValueError("kd_loss_weight > 0 needs the teacher top-k artifact (topk_dir); "
                             "set kd_loss_weight: 0 for the SFT-only baseline")
        from kd_pipeline.core.topk_store import TopKReader

        targets = TopKReader(topk_dir, verify=topk_verify)
    used_k = check_artifact_compatibility(targets.manifest, corpus_fingerprint=corpus.fingerprint,
                                          tokenizer_hash=student_tokenizer_hash, vocab_size=vocab_size, k=k,
                                          teacher_identity=model_identity(teacher_dir), teacher_dir=teacher_dir)
    directory = getattr(targets, "directory", None)
    manifest_id = manifest_sha256(directory) if directory is not None else None
    if manifest_id is None:  # an in-memory provider: the hash of its manifest's content
        manifest_id = hashlib.sha256(canonical_json(targets.manifest.to_dict()).encode("utf-8")).hexdigest()
    return targets, used_k, manifest_id


def _capture_mode(targets) -> str:
    return "topk" if targets is None else targets.manifest.source.capture_mode


CROSS_TOKENIZER_CAPTURE_MODES = ("topk", "top_p")


def _require_cross_tokenizer_capture(targets) -> None:
    """Refuse, before any step, an artifact whose rows the cross-tokenizer loss cannot use: it
    sums the stored rows per matched class as probabilities, which a `sampled` row's draws are
    not (they need the importance weights of `core.losses.sampled`, which only the
    same-tokenizer loss applies)."""
    mode = _capture_mode(targets)
    if mode not in CROSS_TOKENIZER_CAPTURE_MODES:
        raise ArtifactMismatchError(
            f"distill.cross_tokenizer on a {mode!r} teacher artifact (capture_mode {mode!r}, capture_params "
            f"{dict(targets.manifest.source.capture_params)}): the cross-tokenizer loss supports capture modes "
            f"{' and '.join(repr(m) for m in CROSS_TOKENIZER_CAPTURE_MODES)} only (it has no importance-weighted "
            "estimator for sampled draws); re-extract with teacher_logits.capture.mode topk or top_p, or train a "
            "student with the teacher's tokenizer")


def _logz_column(loss: KDLossConfig, targets) -> int | None:
    """The artifact's `logz` column at the loss's teacher temperature, checked before training:
    `tail_bucket` needs it (the tempered tail is exact only with it) and is refused, naming the
    temperatures the artifact holds, when it is missing; `renormalize` needs none; the sampled
    estimator needs it (its weights and its KD value)."""
    if targets is None or (loss.topk_normalization != "tail_bucket" and _capture_mode(targets) != "sampled"):
        return None
    return targets.manifest.source.logz_column(
        loss.target_logits_scale, f"distill.loss (tail_bucket, target_logits_scale {loss.target_logits_scale:g})")


def _sampled_weights(loss: KDLossConfig, targets, k: int | None) -> SampledWeights | None:
    """The estimator weights of a `sampled` artifact, after refusing (by name, before any step)
    a loss or a `k` the unbiased estimator does not support; None for other artifacts."""
    if _capture_mode(targets) != "sampled":
        return None
    source = targets.manifest.source
    require_sampled_support(loss, f"the sampled teacher artifact (capture_params {dict(source.capture_params)})")
    if k is not None and k != source.k:
        raise ArtifactMismatchError(f"distill.k = {k} on a sampled artifact: its rows are draws, not a ranking, and "
                                    "keeping the most probable of them biases the estimate; use k: null")
    proposal_temperature = float(source.capture_params["proposal_temperature"])
    proposal_scale = source.capture_temperature / proposal_temperature
    return SampledWeights(
        draws=int(source.capture_params["draws"]), target_scale=float(loss.target_logits_scale),
        proposal_scale=proposal_scale,
        target_column=source.logz_column(loss.target_logits_scale, "distill.loss (the sampled estimator)"),
        proposal_column=source.logz_column(proposal_scale, "the sampled artifact's proposal"))


def _train(trainer: DistillationTrainer, resume_from: Path | None) -> dict:
    """Train (resuming from `resume_from`), or take `resume_from` as is when its run had finished."""
    if resume_from is not None and is_finished(resume_from):
        # The run had already finished (killed while saving the student, or re-run): take its
        # last checkpoint as is. (Trainer.train resumed at max_steps would run one step more.)
        from transformers import TrainerState

        logger.info("distill: %s is the end of an identical finished run; saving it", resume_from)
        if trainer.is_fsdp_enabled:
            load_sharded_checkpoint_weights(trainer.model, resume_from)  # into the unsharded wrapper
        else:
            load_checkpoint_weights(trainer.model.student, resume_from)
        trainer.state = TrainerState.load_from_json(str(resume_from / "trainer_state.json"))
        return {}
    if resume_from is not None:
        logger.info("distill: resuming from %s", resume_from)
    return trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None).metrics


def _free_optimizer_state(trainer: DistillationTrainer) -> None:
    """Drop AdamW's moments and the gradients once the last step is taken (the checkpoints hold
    them for a resume): the final evaluation, the save and the stages after it then run without
    twice the student's size in dead state (0.9 GB for the default student), which is the
    difference between the job's peak and training's."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # under accelerate's wrapper
    if optimizer is not None:
        optimizer.state.clear()
    trainer.model.zero_grad(set_to_none=True)
    release_unused_memory("distill: after the last step")


def _save_student(trainer: DistillationTrainer, summary: dict, output_dir: Path, checkpoint_dir: Path,
                  keep_checkpoints: bool) -> None:
    """On the main process: the student folder (weights, config, tokenizer, loss curve, summary),
    built beside `output_dir` and swapped into place. Every process takes part in gathering a
    sharded (FSDP2) student's weights first."""
    trainer.accelerator.wait_for_everyone()
    state_dict = trainer.gather_student_state()
    if trainer.is_world_process_zero():
        with atomic_dir(output_dir) as tmp_dir:
            trainer.save_student(tmp_dir, state_dict)  # safetensors weights, config, tokenizer
            plot_training_curves(trainer.state.log_history, tmp_dir / LOSS_CURVE_FILE, title="distillation loss")
            write_json_atomic(tmp_dir / SUMMARY_FILE, summary)
        if not keep_checkpoints:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        logger.info("distill: saved the student to %s (%d steps, final loss %s)", output_dir,
                    summary["global_step"], summary.get("final_train", {}).get("loss"))
    trainer.accelerator.wait_for_everyone()


def _summary(trainer, train_metrics, liger_applied, args, resume_from, manifest_id, k, seconds) -> dict:
    history = trainer.state.log_history
    last_train = next((row for row in reversed(history) if "loss" in row), {})
    last_eval = next((row for row in reversed(history) if "eval_loss" in row), {})
    final_train = {key: last_train[key] for key in ("loss", "total", "kd", "uld", "sft", "teacher_coverage",
                                                   "matched_mass", "aligned_agreement",
                                                   "student_topk_mass", "tokens_per_second", "grad_norm",
                                                   "learning_rate") if key in last_train}
    rates = [row["tokens_per_second"] for row in history if "tokens_per_second" in row]
    return {
        "global_step": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "final_train": final_train,
        "final_eval": {key: value for key, value in last_eval.items() if key.startswith("eval_")},
        "train_runtime_s": train_metrics.get("train_runtime"),
        "train_seconds_in_steps": trainer._train_seconds,
        "mean_tokens_per_second": sum(rates) / len(rates) if rates else None,
        "total_seconds": seconds,
        "precision": "bf16" if args.bf16 else "fp32",
        "device": str(args.device),
        "world_size": args.world_size,
        "liger": liger_applied,
        "resumed_from": str(resume_from) if resume_from else None,
        "artifact_manifest_sha256": manifest_id,
        "k": k,
        "log_history": history,
    }
