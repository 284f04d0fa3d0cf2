"""Optimization and run settings of the student training (parameters `distill.trainer`), and
the Hugging Face `TrainingArguments` they map to."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from transformers import TrainingArguments

from kd_pipeline.core.models.liger import LIGER_MODES
from kd_pipeline.core.params import KEY_MESSAGE, dataclass_from_params

PRECISIONS = ("auto", "bf16", "fp32")
REDUCTIONS = ("token", "sequence")

# TrainConfig fields that do not change what is computed: a resumed run may change them freely.
NON_NUMERIC_FIELDS = frozenset({
    "eval_steps", "save_steps", "save_total_limit", "logging_steps", "dataloader_num_workers",
    "dataloader_pin_memory", "resume", "keep_checkpoints", "disable_tqdm", "per_device_eval_batch_size",
})



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


def training_arguments(train: TrainConfig, output_dir: Path, has_eval: bool,
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
