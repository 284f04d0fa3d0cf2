"""Student training: a Hugging Face `Trainer` whose loss is the fused top-k KD + SFT loss on the
student's final hidden states, normalized over the global trained tokens of each optimizer step.

`train_student` builds the student, the datasets and the trainer, resumes from the last complete
checkpoint, and writes the final student as a plain HF folder (safetensors + tokenizer) that
`AutoModelForCausalLM.from_pretrained` loads, plus `training_summary.json` and `loss_curve.png`.

Normalization (docs/architecture.md, issue 4): the loss of an optimizer step is
`sum_i w_i * loss_i` over every trained token of the step, all micro-batches and all ranks
together, with `w_i = 1 / global_trained_tokens` (`reduction: token`) or
`w_i = 1 / (trained_tokens_of_its_sequence * global_sequences)` (`reduction: sequence`). The
trainer counts the step's tokens and sequences before its first micro-batch (all-reduced across
ranks), and multiplies each rank's weights by the world size because DDP averages gradients.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from kd_pipeline.core.atomic import canonical_json, replace_dir, write_json_atomic
from kd_pipeline.core.distill_data import DistillCollator, DistillDataset, flat_labels
from kd_pipeline.core.losses import KDLossConfig, fused_topk_kd_loss
from kd_pipeline.core.params import KEY_MESSAGE, dataclass_from_params

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")
REDUCTIONS = ("token", "sequence")
LIGER_MODES = ("auto", "on", "off")
SUMMARY_FILE = "training_summary.json"
LOSS_CURVE_FILE = "loss_curve.png"
RUN_IDENTITY_FILE = "run_identity.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

# TrainConfig fields that do not change what is computed: a resumed run may change them freely.
_NON_NUMERIC_FIELDS = frozenset({
    "eval_steps", "save_steps", "save_total_limit", "logging_steps", "dataloader_num_workers",
    "dataloader_pin_memory", "resume", "keep_checkpoints", "disable_tqdm", "per_device_eval_batch_size",
})


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Optimization and run settings (`distill.trainer` params).

    Attributes:
        optimizer: a Hugging Face `optim` name (`adamw_torch`, `adamw_torch_fused`, `sgd`, ...).
        learning_rate: peak learning rate.
        weight_decay, adam_beta1, adam_beta2, adam_epsilon, max_grad_norm: optimizer settings
            (`max_grad_norm` 0 disables clipping).
        lr_scheduler: a Hugging Face scheduler name (`cosine`, `linear`, `constant_with_warmup`, ...).
        warmup: linear warmup, in steps (int >= 1) or as a fraction of all steps (float in [0, 1)).
        per_device_train_batch_size, per_device_eval_batch_size: sequences per micro-batch per
            process; the global batch is `per_device_train_batch_size * processes *
            gradient_accumulation_steps`.
        gradient_accumulation_steps: micro-batches per optimizer step.
        max_steps: optimizer steps; -1 runs `num_train_epochs` instead.
        num_train_epochs: epochs over the training split when `max_steps` is -1.
        eval_steps: evaluate on the validation split every N steps (0: never during training;
            a final evaluation still runs when there is a validation split and `eval_at_end`).
        eval_at_end: evaluate once after training (when there is a validation split).
        save_steps: write a resumable checkpoint every N steps (0: none).
        save_total_limit: keep at most this many checkpoints (None: all).
        seed: seeds model-independent randomness: data order, dropout.
        precision: `auto` (bf16 mixed precision on CUDA when supported, fp32 otherwise), `bf16`
            or `fp32`. Master weights and the saved student stay float32.
        liger: `auto` (Liger kernels on CUDA), `on` (error without CUDA) or `off`.
        logging_steps: log metrics every N optimizer steps.
        reduction: `token` (mean over the step's trained tokens) or `sequence` (mean over the
            step's sequences of each sequence's token mean).
        dataloader_num_workers, dataloader_pin_memory, dataloader_drop_last: DataLoader settings.
        pad_to_multiple_of: round each batch's length up to a multiple (e.g. 8 on GPU).
        gradient_checkpointing: recompute activations in backward (less memory, ~30% slower).
        resume: continue from the last complete checkpoint of an identical run, if any.
        keep_checkpoints: keep the checkpoint folder after the final student is saved.
        disable_tqdm: no progress bar.
    """

    optimizer: str = "adamw_torch"
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "cosine"
    warmup: float = 0.05
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    num_train_epochs: float = 1.0
    eval_steps: int = 0
    eval_at_end: bool = True
    save_steps: int = 50
    save_total_limit: int | None = 2
    seed: int = 0
    precision: str = "auto"
    liger: str = "auto"
    logging_steps: int = 1
    reduction: str = "token"
    dataloader_num_workers: int = 0
    dataloader_pin_memory: bool = True
    dataloader_drop_last: bool = False
    pad_to_multiple_of: int | None = None
    gradient_checkpointing: bool = False
    resume: bool = True
    keep_checkpoints: bool = True
    disable_tqdm: bool = False

    def __post_init__(self):
        # YAML 1.1 reads a bare `off`/`on` as a boolean (and `dvc exp run -S` writes it bare).
        if isinstance(self.liger, bool):
            object.__setattr__(self, "liger", "on" if self.liger else "off")
        _choice("precision", self.precision, PRECISIONS)
        _choice("liger", self.liger, LIGER_MODES)
        _choice("reduction", self.reduction, REDUCTIONS)
        # YAML 1.1 (kedro, PyYAML) reads `1e-3` without a dot as the string "1e-3".
        for name in ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
                     "num_train_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                hint = " (write 1.0e-3, not 1e-3: YAML 1.1 reads the latter as a string)" if isinstance(value, str) else ""
                raise ValueError(f"trainer.{name} must be a number, got {value!r}{hint}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps"):
            if _not_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("eval_steps", "save_steps", "dataloader_num_workers"):
            if _not_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"trainer.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if _not_int(self.max_steps) or (self.max_steps < 1 and self.max_steps != -1):
            raise ValueError(f"trainer.max_steps must be -1 (use num_train_epochs) or >= 1, got {self.max_steps!r}")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise ValueError(
                f"trainer.num_train_epochs must be > 0 when max_steps is -1, got {self.num_train_epochs!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"trainer.learning_rate must be > 0, got {self.learning_rate!r}")
        steps = isinstance(self.warmup, int) and self.warmup >= 0
        fraction = isinstance(self.warmup, float) and 0 <= self.warmup < 1
        if isinstance(self.warmup, bool) or not (steps or fraction):
            raise ValueError(
                f"trainer.warmup must be a step count (int >= 0) or a fraction in [0, 1), got {self.warmup!r}")
        if self.save_total_limit is not None and (_not_int(self.save_total_limit) or self.save_total_limit < 1):
            raise ValueError(f"trainer.save_total_limit must be None or >= 1, got {self.save_total_limit!r}")
        if self.pad_to_multiple_of is not None and (_not_int(self.pad_to_multiple_of) or self.pad_to_multiple_of < 1):
            raise ValueError(f"trainer.pad_to_multiple_of must be None or >= 1, got {self.pad_to_multiple_of!r}")
        if _not_int(self.seed):
            raise ValueError(f"trainer.seed must be an integer, got {self.seed!r}")

    @classmethod
    def from_dict(cls, params: Mapping[str, Any] | None) -> "TrainConfig":
        """Build from a params dict (`params:distill.trainer`); unknown keys are named in the error."""
        return dataclass_from_params(cls, params, "TrainConfig", KEY_MESSAGE)

    def resolved_precision(self) -> str:
        """`bf16` or `fp32`: `auto` is bf16 on a CUDA device that supports it."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"trainer.{name} must be one of {list(allowed)}, got {value!r}")


def _not_int(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; names the global step and the batch's sample ids."""


class ArtifactMismatchError(ValueError):
    """The top-k artifact was not made for this corpus / student tokenizer / vocabulary / k."""


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


class DistillationTrainer(Trainer):
    """`Trainer` whose loss is `fused_topk_kd_loss` on the student's final hidden states.

    `compute_loss` runs the model with `logits_to_keep` set to no position (so the lm_head
    projects nothing), takes the final hidden states from a forward hook on the base model,
    gathers the trained positions, and hands them with the lm_head weight to the fused loss,
    which never holds [N, V] logits. Going through the (possibly DDP-wrapped) model's own
    forward keeps DDP's gradient synchronization intact.

    Args (beyond `Trainer`'s):
        loss_config: the loss hyperparameters (`kd_loss_weight: 0` = SFT only, no targets needed).
        reduction: `token` or `sequence` (see the module docstring).
    """

    # compute_loss normalizes over the whole optimizer step itself (see get_batch_samples).
    loss_is_scaled_for_ga = True

    def __init__(self, *args, loss_config: KDLossConfig, reduction: str = "token", **kwargs):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
        super().__init__(*args, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError(
                f"{self.args.n_gpu} GPUs visible to one process (torch DataParallel) are not supported: "
                "launch one process per GPU with torchrun or accelerate launch"
            )
        self.loss_config = loss_config
        self.reduction = reduction
        self._captured: list[torch.Tensor] = []
        base = self.model.base_model
        if base is self.model:
            raise ValueError(f"{type(self.model).__name__} has no separate base model (decoder) to take the final "
                             "hidden states from; the student must be a *ForCausalLM with a base model")
        self._hook = base.register_forward_hook(self._capture_hidden)
        self._step_sequences: int | None = None
        self._metrics = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._train_seconds = 0.0
        self._step_started: float | None = None
        self.add_callback(_StepTimer(self))

    # ---- data: count the step's tokens and sequences before its first micro-batch ----------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the step's micro-batches and count their trained tokens and sequences globally."""
        self._step_started = time.perf_counter()
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        counts = torch.tensor(
            [sum(int(batch["kd_positions_mask"].sum()) for batch in batch_samples),
             sum(int(batch["kd_positions_mask"].shape[0]) for batch in batch_samples)],
            dtype=torch.long, device=device,
        )
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        self._step_sequences = int(counts[1])
        return batch_samples, counts[0]

    # ---- the loss ---------------------------------------------------------------------------

    def _capture_hidden(self, module, args, output) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        self._captured.append(output[0] if hidden is None else hidden)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Fused KD + SFT loss of one micro-batch, weighted for the global step mean.

        Args:
            model: the (possibly wrapped) student.
            inputs: a `DistillCollator` batch (on the device).
            return_outputs: also return the model outputs (their logits are empty).
            num_items_in_batch: trained tokens of the whole optimizer step on all ranks (set by
                `get_batch_samples`); None normalizes over this micro-batch alone.
        """
        mask = inputs["kd_positions_mask"]  # (B, T) bool
        self._captured.clear()
        no_positions = torch.empty(0, dtype=torch.long, device=mask.device)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        logits_to_keep=no_positions, use_cache=False)
        if len(self._captured) != 1:
            raise RuntimeError(f"expected one base-model forward per batch, saw {len(self._captured)}")
        hidden_states = self._captured.pop()  # (B, T, H)
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        # Boolean indexing is row-major: the rows line up with kd_topk_* and flat_labels.
        hidden = hidden_states[mask].to(head.weight.dtype)  # (N, H)
        training = model.training
        scale = self.accelerator.num_processes if training and self.accelerator.num_processes > 1 else 1
        weights = self._token_weights(mask, num_items_in_batch if training else None, scale)
        with self.accelerator.autocast():
            out = fused_topk_kd_loss(
                hidden, head.weight, head.bias, inputs.get("kd_topk_ids"), inputs.get("kd_topk_logprobs"),
                flat_labels(inputs), weights, self.loss_config,
            )
        self._check_finite(out.loss, inputs, training)
        self._record(out, inputs, scale, training)
        return (out.loss, outputs) if return_outputs else out.loss

    def _token_weights(self, mask: torch.Tensor, num_items_in_batch, scale: int) -> torch.Tensor:
        """(N,) float32 reduction weights (see the module docstring)."""
        if self.reduction == "token":
            total = num_items_in_batch if num_items_in_batch is not None else mask.sum()
            total = torch.as_tensor(total, device=mask.device).float().clamp_min(1)
            return torch.full((int(mask.sum()),), 1.0, device=mask.device) * (scale / total)
        per_sequence = mask.sum(dim=1)  # (B,)
        sequences = self._step_sequences if num_items_in_batch is not None and self._step_sequences else mask.shape[0]
        row_of_token = mask.nonzero()[:, 0]  # (N,) the sequence of each trained token
        return scale / (per_sequence[row_of_token].float() * float(sequences))

    def _check_finite(self, loss: torch.Tensor, inputs: dict, training: bool) -> None:
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")  # every rank stops, none hangs
        if bad.item() > 0:
            value = loss.item()
            where = (f"global step {self.state.global_step + 1}" if training
                     else f"evaluation after global step {self.state.global_step}")
            ids = ", ".join(inputs.get("sample_ids", []))
            note = "" if not math.isfinite(value) else " (finite here; another rank's batch was not)"
            raise NonFiniteLossError(
                f"non-finite loss ({value}) at {where}; sample ids of the batch{note}: {ids}"
            )

    def _record(self, out, inputs: dict, scale: int, training: bool) -> None:
        """Accumulate this micro-batch's metrics (TRL's `_metrics` pattern; reduced in `log`)."""
        metrics = self._metrics["train" if training else "eval"]
        mask = inputs["kd_positions_mask"]
        has_kd = "kd_topk_ids" in inputs
        # One device-to-host copy for all of them.
        loss, kd, sft, coverage, mass, weight_sum, trained, tokens = torch.stack([
            out.loss.detach().double(), out.kd.double(), out.sft.double(), out.teacher_coverage.double(),
            out.student_topk_mass.double(), out.weight_sum.double(), mask.sum().double(),
            inputs["attention_mask"].sum().double(),
        ]).tolist()
        if training:
            # Each micro-batch holds its share of the step's global mean (weights * scale).
            norm = 1.0 / scale
        else:
            # Evaluation weights are per micro-batch means: re-weight to an exact mean overall.
            norm = trained if self.reduction == "token" else float(mask.shape[0])
            metrics["norm"] += norm
        metrics["loss_sum"] += loss * norm
        metrics["sft_sum"] += sft * norm
        if has_kd:
            metrics["kd_sum"] += kd * norm
            metrics["weight_sum"] += weight_sum
            metrics["coverage_sum"] += coverage * weight_sum
            metrics["mass_sum"] += mass * weight_sum
        metrics["tokens"] += tokens
        metrics["trained_tokens"] += trained

    def _reduced(self, mode: str) -> dict[str, float]:
        names = sorted(self._metrics[mode])
        values = torch.tensor([self._metrics[mode][name] for name in names], dtype=torch.float64,
                              device=self.args.device)
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        self._metrics[mode].clear()
        return dict(zip(names, values.tolist()))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add kd, sft, total, coverage, student mass and tokens/s to the Trainer's logs."""
        mode = "train" if "loss" in logs else "eval" if "eval_loss" in logs else None
        if mode is not None and self._metrics[mode]:
            sums = self._reduced(mode)
            has_kd = "kd_sum" in sums
            if mode == "train":
                steps = max(1, self.state.global_step - self._globalstep_last_logged_for_metrics)
                self._globalstep_last_logged_for_metrics = self.state.global_step
                extra = {"total": sums["loss_sum"] / steps, "sft": sums["sft_sum"] / steps}
                if has_kd:
                    extra["kd"] = sums["kd_sum"] / steps
                seconds = self._train_seconds - self._train_seconds_last_logged
                self._train_seconds_last_logged = self._train_seconds
                if seconds > 0:
                    extra["tokens_per_second"] = sums["tokens"] / seconds
                    extra["trained_tokens_per_second"] = sums["trained_tokens"] / seconds
            else:
                norm = max(sums["norm"], 1.0)
                extra = {"total": sums["loss_sum"] / norm, "sft": sums["sft_sum"] / norm}
                if has_kd:
                    extra["kd"] = sums["kd_sum"] / norm
            if has_kd and sums["weight_sum"] > 0:
                extra["teacher_coverage"] = sums["coverage_sum"] / sums["weight_sum"]
                extra["student_topk_mass"] = sums["mass_sum"] / sums["weight_sum"]
            prefix = "" if mode == "train" else "eval_"
            logs = {**logs, **{prefix + key: value for key, value in extra.items()}}
        super().log(logs, start_time)

    _globalstep_last_logged_for_metrics = 0
    _train_seconds_last_logged = 0.0


class _StepTimer(TrainerCallback):
    """Adds each optimizer step's wall time (data loading included; eval and saving excluded)."""

    def __init__(self, trainer: DistillationTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # After a resume the state's global_step is the checkpoint's: count logged steps from it.
        self.trainer._globalstep_last_logged_for_metrics = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer._step_started is not None:
            self.trainer._train_seconds += time.perf_counter() - self.trainer._step_started
            self.trainer._step_started = None


class DistillProgressCallback(ProgressCallback):
    """The Trainer's tqdm bar, with loss, kd and tokens/s shown on the bar instead of printed dicts."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "loss" in logs:
            postfix = {"loss": f"{logs['loss']:.4f}"}
            if "kd" in logs:
                postfix["kd"] = f"{logs['kd']:.4f}"
            if "tokens_per_second" in logs:
                postfix["tok/s"] = f"{logs['tokens_per_second']:.0f}"
            self.training_bar.set_postfix(postfix, refresh=True)
        elif "eval_loss" in logs:
            shown = {key: f"{value:.4g}" for key, value in logs.items() if isinstance(value, float)}
            self.training_bar.write(f"step {state.global_step}: {shown}")


# --------------------------------------------------------------------------------------------
# Artifact compatibility
# --------------------------------------------------------------------------------------------


def _manifest_field(manifest: Any, names: Sequence[str]) -> tuple[str, Any]:
    """(name, value) of the first of `names` the manifest has (a `topk_store.Manifest` or a
    mapping), or (names[0], None)."""
    for name in names:
        if isinstance(manifest, Mapping):
            if name in manifest:
                return name, manifest[name]
        else:
            try:
                return name, manifest.field_value(name)
            except (ValueError, KeyError, AttributeError):
                continue
    return names[0], None


def check_artifact_compatibility(manifest: Any, *, corpus_fingerprint: str, tokenizer_hash: str,
                                 vocab_size: int, k: int | None) -> int:
    """Refuse a top-k artifact made for another corpus, tokenizer, vocabulary or a smaller k.

    Args:
        manifest: the artifact's manifest (`TopKReader.manifest`, or a mapping of its fields).
        corpus_fingerprint: `TokenizedCorpus.fingerprint` of the corpus being trained on.
        tokenizer_hash: `modeling.tokenizer_hash` of the student's tokenizer.
        vocab_size: rows of the student's lm_head.
        k: top-k columns the run uses (None: all of the artifact's).

    Returns:
        The k to use.

    Raises:
        ArtifactMismatchError: naming the first mismatching manifest field.
    """
    checks = (
        (("corpus_fingerprint",), corpus_fingerprint, "the tokenized corpus"),
        (("tokenizer_sha256", "tokenizer_hash"), tokenizer_hash, "the student tokenizer"),
        (("vocab_size",), vocab_size, "the student lm_head"),
    )
    for names, expected, holder in checks:
        name, stored = _manifest_field(manifest, names)
        if stored is None:
            raise ArtifactMismatchError(f"top-k artifact manifest has no field {name!r}: cannot check it")
        if stored != expected:
            raise ArtifactMismatchError(
                f"top-k artifact manifest field {name!r} is {stored!r} but {holder} has {expected!r}: the artifact "
                "was made for another corpus or teacher; re-run `kedro run --pipelines teacher_logits`"
            )
    name, stored_k = _manifest_field(manifest, ("k",))
    if stored_k is None:
        raise ArtifactMismatchError("top-k artifact manifest has no field 'k': cannot check it")
    if k is not None and not 1 <= k <= stored_k:
        raise ArtifactMismatchError(
            f"top-k artifact manifest field 'k' is {stored_k} but the run asks for k={k}: use a k between 1 "
            "and the artifact's, or regenerate the artifact with a larger k"
        )
    return int(stored_k if k is None else k)


# --------------------------------------------------------------------------------------------
# Checkpoints and outputs
# --------------------------------------------------------------------------------------------


def _checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else None


def last_complete_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The highest `checkpoint-N` folder holding `trainer_state.json` (the Trainer writes it last,
    so a run killed mid-save leaves a folder without it, which is skipped)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    complete = [(step, path) for path in directory.iterdir()
                if (step := _checkpoint_step(path)) is not None and (path / "trainer_state.json").is_file()]
    return max(complete)[1] if complete else None


def _finished(checkpoint: Path) -> bool:
    """Whether a checkpoint is the last step of its run (`global_step >= max_steps`)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return 0 < state.get("max_steps", 0) <= state.get("global_step", 0)


def run_identity(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(parts).encode("utf-8")).hexdigest()


def _prepare_checkpoint_dir(directory: Path, identity: dict, resume: bool, is_main: bool) -> Path | None:
    """The checkpoint to resume from; checkpoints of a different run are removed (with a warning)."""
    record_path = directory / RUN_IDENTITY_FILE
    key = run_identity(identity)
    if directory.is_dir() and is_main:
        previous = json.loads(record_path.read_text()) if record_path.is_file() else None
        if previous is None or previous.get("key") != key or not resume:
            stale = [path for path in directory.iterdir() if _checkpoint_step(path) is not None]
            if stale:
                changed = sorted(name for name in identity
                                 if previous is None or previous.get("identity", {}).get(name) != identity[name])
                logger.warning("distill: discarding %d checkpoint(s) in %s (%s)", len(stale), directory,
                               "resume disabled" if not resume else f"different run: {changed} changed")
                for path in stale:
                    shutil.rmtree(path, ignore_errors=True)
    if is_main:
        write_json_atomic(record_path, {"key": key, "identity": identity})
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # other ranks look only after the main one has cleaned up
    return last_complete_checkpoint(directory) if resume else None


def plot_loss_curves(log_history: list[dict], path: str | os.PathLike) -> None:
    """PNG of total / kd / sft per logged step (and their eval_ counterparts as markers)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    for key, style in (("total", "-"), ("kd", "--"), ("sft", ":")):
        points = [(row["step"], row[key]) for row in log_history if key in row and "loss" in row]
        if points:
            axis.plot(*zip(*points), style, label=f"train {key}")
        points = [(row["step"], row[f"eval_{key}"]) for row in log_history if f"eval_{key}" in row]
        if points:
            axis.plot(*zip(*points), "o" + style, label=f"eval {key}")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title("distillation loss")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _training_arguments(train: TrainConfig, output_dir: Path, has_eval: bool,
                        report_to: Sequence[str]) -> TrainingArguments:
    """The Hugging Face arguments for a TrainConfig (checkpoints under `output_dir`)."""
    precision = train.resolved_precision()
    if precision == "bf16" and not torch.cuda.is_available():
        raise ValueError("trainer.precision bf16 needs a CUDA device; use auto or fp32 on CPU")
    kwargs = dict(
        output_dir=str(output_dir),
        optim=train.optimizer,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_epsilon=train.adam_epsilon,
        max_grad_norm=train.max_grad_norm,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup,
        per_device_train_batch_size=train.per_device_train_batch_size,
        per_device_eval_batch_size=train.per_device_eval_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        max_steps=train.max_steps,
        num_train_epochs=train.num_train_epochs,
        eval_strategy="steps" if has_eval and train.eval_steps else "no",
        eval_steps=train.eval_steps or None,
        save_strategy="steps" if train.save_steps else "no",
        save_steps=train.save_steps or 500,
        save_total_limit=train.save_total_limit,
        logging_strategy="steps",
        logging_steps=train.logging_steps,
        seed=train.seed,
        data_seed=train.seed,
        bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=train.dataloader_num_workers,
        dataloader_pin_memory=train.dataloader_pin_memory and torch.cuda.is_available(),
        dataloader_drop_last=train.dataloader_drop_last,
        remove_unused_columns=False,  # the collator's keys are not forward() arguments
        label_names=["labels"],
        prediction_loss_only=True,
        logging_nan_inf_filter=False,  # a non-finite loss stops the run instead
        ddp_find_unused_parameters=False,
        report_to=list(report_to) or "none",
        disable_tqdm=train.disable_tqdm,
    )
    if train.gradient_checkpointing:
        # transformers 5.x renamed it; older versions only know gradient_checkpointing.
        kwargs["activation_checkpointing" if "activation_checkpointing" in _argument_names() else
               "gradient_checkpointing"] = True
    if isinstance(train.warmup, float) and not _supports_fractional_warmup():
        kwargs["warmup_ratio"] = kwargs.pop("warmup_steps")
    return TrainingArguments(**kwargs)


def _argument_names() -> set[str]:
    return {field.name for field in dataclasses.fields(TrainingArguments)}


def _supports_fractional_warmup() -> bool:
    # transformers 5.x takes a fraction in warmup_steps; 4.x had a separate warmup_ratio.
    return "warmup_ratio" not in _argument_names()


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
) -> dict:
    """Train the student and save it as an HF folder at `output_dir` (atomically replaced).

    Args:
        teacher_dir: the prepared teacher folder (tokenizer; weights for `prune_teacher`).
        corpus: the `TokenizedCorpus` (train split trained on, validation split evaluated).
        student_init: a `modeling.StudentInit`.
        loss: the loss config; `kd_loss_weight == 0` trains SFT only and needs no artifact.
        train: the `TrainConfig`.
        output_dir: where the final student goes.
        topk_dir: the teacher top-k artifact (required when `kd_loss_weight > 0`).
        k: top-k columns to use (None: all the artifact has).
        checkpoint_dir: resumable checkpoints (default: `<output_dir>_checkpoints` beside it).
        report_to: Trainer integrations (`["mlflow"]` logs into the active MLflow run).
        callbacks: extra `TrainerCallback`s.
        targets: an already open targets provider with `.manifest` and `.get_many` (synthetic
            data in checks and benchmarks); overrides `topk_dir`.

    Returns:
        A JSON-able summary: final train/eval losses, steps, tokens/s, the log history, ...

    Raises:
        ArtifactMismatchError: manifest does not fit the corpus, tokenizer, vocabulary or k.
        NonFiniteLossError: the loss became NaN/Inf (names the step and the batch's sample ids).
    """
    from transformers import set_seed

    from kd_pipeline.core import modeling

    output_dir = Path(output_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else output_dir.with_name(f"{output_dir.name}_checkpoints")
    started = time.perf_counter()
    set_seed(train.seed)
    model, tokenizer = modeling.init_student(student_init, teacher_dir)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    student_tokenizer_hash = modeling.tokenizer_hash(tokenizer)

    if corpus.meta.get("tokenizer_hash") not in (None, student_tokenizer_hash):
        raise ArtifactMismatchError(
            f"corpus field 'tokenizer_hash' is {corpus.meta.get('tokenizer_hash')!r} but the student tokenizer "
            f"hashes to {student_tokenizer_hash!r}: the corpus was tokenized with another tokenizer"
        )
    manifest_id, used_k = None, None
    if loss.kd_loss_weight == 0:
        targets = None
    else:
        if targets is None:
            if topk_dir is None:
                raise ValueError("kd_loss_weight > 0 needs the teacher top-k artifact (topk_dir); "
                                 "set kd_loss_weight: 0 for the SFT-only baseline")
            from kd_pipeline.core.topk_store import TopKReader

            targets = TopKReader(topk_dir)
        used_k = check_artifact_compatibility(
            targets.manifest, corpus_fingerprint=corpus.fingerprint, tokenizer_hash=student_tokenizer_hash,
            vocab_size=vocab_size, k=k,
        )
        manifest_id = manifest_hash(targets)

    train_set = DistillDataset(corpus.split("train"), targets, used_k, split="train")
    validation = corpus.split("validation")
    eval_set = DistillDataset(validation, targets, used_k, split="validation") if validation.num_rows else None

    args = _training_arguments(train, checkpoint_dir, eval_set is not None, report_to)
    liger_applied = modeling.apply_liger_kernels(model, train.liger, args.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    identity = {
        "train": {key: value for key, value in asdict(train).items() if key not in _NON_NUMERIC_FIELDS},
        "loss": asdict(loss),
        "student_init": asdict(student_init) if dataclasses.is_dataclass(student_init) else dict(student_init),
        "corpus_fingerprint": corpus.fingerprint,
        "artifact": manifest_id,
        "k": used_k,
        "world_size": args.world_size,
    }
    resume_from = _prepare_checkpoint_dir(checkpoint_dir, identity, train.resume, args.process_index == 0)
    trainer = DistillationTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=DistillCollator(pad_id, train.pad_to_multiple_of),
        processing_class=tokenizer,
        loss_config=loss,
        reduction=train.reduction,
        callbacks=list(callbacks),
    )
    if not train.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(DistillProgressCallback())
    if resume_from is not None and _finished(resume_from):
        # The run had already finished (killed while saving the student, or re-run): take its
        # last checkpoint as is. (Trainer.train resumed at max_steps would run one step more.)
        from transformers import TrainerState

        logger.info("distill: %s is the end of an identical finished run; saving it", resume_from)
        trainer._load_from_checkpoint(str(resume_from))
        trainer.state = TrainerState.load_from_json(str(resume_from / "trainer_state.json"))
        train_metrics = {}
    else:
        if resume_from is not None:
            logger.info("distill: resuming from %s", resume_from)
        train_metrics = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None).metrics
    evaluated_last_step = bool(train.eval_steps) and trainer.state.global_step % train.eval_steps == 0
    if eval_set is not None and train.eval_at_end and not evaluated_last_step:
        trainer.evaluate()

    summary = _summary(trainer, train_metrics, liger_applied, args, resume_from, manifest_id, used_k,
                       time.perf_counter() - started)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        tmp_dir = output_dir.with_name(f"{output_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp_dir, ignore_errors=True)
        try:
            trainer.save_model(str(tmp_dir))  # safetensors weights, config, tokenizer
            plot_loss_curves(trainer.state.log_history, tmp_dir / LOSS_CURVE_FILE)
            write_json_atomic(tmp_dir / SUMMARY_FILE, summary)
            output_dir.parent.mkdir(parents=True, exist_ok=True)
            replace_dir(tmp_dir, output_dir)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if not train.keep_checkpoints:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        logger.info("distill: saved the student to %s (%d steps, final loss %s)", output_dir,
                    summary["global_step"], summary.get("final_train", {}).get("loss"))
    trainer.accelerator.wait_for_everyone()
    trainer._hook.remove()
    return summary


def manifest_hash(reader) -> str:
    """sha256 of the artifact's manifest.json (its identity: every shard's hash is inside)."""
    path = Path(getattr(reader, "directory", getattr(reader, "path", ""))) / "manifest.json"
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    manifest = reader.manifest
    data = asdict(manifest) if dataclasses.is_dataclass(manifest) else dict(manifest)
    return hashlib.sha256(canonical_json(data).encode("utf-8")).hexdigest()


def _summary(trainer, train_metrics, liger_applied, args, resume_from, manifest_id, k, seconds) -> dict:
    history = trainer.state.log_history
    last_train = next((row for row in reversed(history) if "loss" in row), {})
    last_eval = next((row for row in reversed(history) if "eval_loss" in row), {})
    final_train = {key: last_train[key] for key in ("loss", "total", "kd", "sft", "teacher_coverage",
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
