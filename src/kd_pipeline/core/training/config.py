"""Settings of the student training (parameters `distill.trainer`): our own fields, and Hugging
Face `TrainingArguments` by their own names, passed through unchanged (as TRL's configs extend
the HF one), so every HF option is available under the name its documentation gives."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from transformers import TrainingArguments

from kd_pipeline.core.devices import has_native_bf16
from kd_pipeline.core.models.liger import LIGER_MODES, liger_kernel_arguments
from kd_pipeline.core.params import (
    KEY_MESSAGE,
    is_int,
    is_number,
    require,
    require_bool,
    require_choice,
    require_int,
    require_number,
)
from kd_pipeline.core.training.fsdp import fsdp_training_arguments

PRECISIONS = ("auto", "bf16", "fp32")
REDUCTIONS = ("token", "sequence")
WHAT = "distill.trainer"

#: Every `TrainingArguments` field a parameter may set, by name.
HF_ARGUMENTS = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}

#: `TrainingArguments` this trainer sets itself: from `precision` and `liger`, from the
#: `eval_steps`/`save_steps` convention below, or because the loss and data path depend on them.
SET_BY_TRAINER = frozenset({
    "output_dir", "bf16", "fp16", "use_cpu", "report_to", "eval_strategy", "save_strategy",
    "remove_unused_columns", "label_names", "prediction_loss_only", "logging_nan_inf_filter",
    "ddp_find_unused_parameters", "use_liger_kernel", "liger_kernel_config",
})

#: Settings that do not change what is computed: a resumed run may change them freely.
NON_NUMERIC_FIELDS = frozenset({
    "eval_steps", "save_steps", "save_total_limit", "logging_steps", "dataloader_num_workers",
    "dataloader_pin_memory", "resume", "keep_checkpoints", "disable_tqdm", "per_device_eval_batch_size", "eval_on_start",
})


@dataclass(frozen=True)
class TrainConfig:
    """The `distill.trainer` parameters.

    Our own fields (their defaults are the shipped conf/base values):
        precision: `auto` (bf16 mixed precision where the device computes bf16 natively: CUDA
            with bf16, a CPU with AVX512-BF16 or AMX; fp32 otherwise), `bf16` or `fp32`. bf16 is
            autocast: master weights, optimizer state and the saved student stay float32; the
            fused loss runs its three lm_head GEMMs in bf16 and accumulates in float32.
        liger: `auto` (Liger kernels on CUDA), `on` (error without CUDA) or `off`; becomes HF's
            `use_liger_kernel` / `liger_kernel_config` (RMSNorm, RoPE, SwiGLU, never the
            cross-entropy: the KD loss projects the hidden states itself).
        reduction: `token` (mean over the step's trained tokens) or `sequence` (mean over the
            step's sequences of each sequence's token mean).
        pad_to_multiple_of: round each batch's length up to a multiple (e.g. 8 on GPU).
        length_group_batches: less padding: each epoch's shuffled samples are cut into groups of
            this many batches, sorted by length inside a group, and the batches shuffled again
            (0: plain shuffled batches). 8 cuts the default corpus's padding from ~31% to ~6%.
        eval_at_end: evaluate once after training (when there is a validation split).
        resume: continue from the last complete checkpoint of an identical run, if any.
        keep_checkpoints: keep the checkpoint folder after the final student is saved (an
            interrupted run keeps its checkpoints either way, and resumes from them).

    `arguments`: every other key, a `TrainingArguments` field name (`optim`, `learning_rate`,
    `lr_scheduler_type`, `warmup_steps`, `per_device_train_batch_size`, `max_steps`, `seed`,
    ...) with its Hugging Face meaning and default. Two conventions are ours: `eval_steps: 0` and
    `save_steps: 0` mean no evaluation / no checkpoints during training; `fsdp: true` (FSDP2:
    parameters, gradients and optimizer state sharded over the processes; CUDA only) takes
    `fsdp_config` over `fsdp.FSDP_CONFIG_DEFAULTS` (`version: 2`, `reshard_after_forward:
    true`, `state_dict_type: SHARDED_STATE_DICT`). The arguments in `SET_BY_TRAINER` cannot be
    given.
    """

    precision: str = "auto"
    liger: str = "auto"
    reduction: str = "token"
    pad_to_multiple_of: int | None = None
    length_group_batches: int = 8
    eval_at_end: bool = True
    resume: bool = True
    keep_checkpoints: bool = False
    arguments: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        # YAML 1.1 reads a bare `off`/`on` as a boolean (and `dvc exp run -S` writes it bare).
        if isinstance(self.liger, bool):
            object.__setattr__(self, "liger", "on" if self.liger else "off")
        require_choice(WHAT, "precision", self.precision, PRECISIONS)
        require_choice(WHAT, "liger", self.liger, LIGER_MODES)
        require_choice(WHAT, "reduction", self.reduction, REDUCTIONS)
        require_int(WHAT, "pad_to_multiple_of", self.pad_to_multiple_of, minimum=1, allow_none=True)
        require_int(WHAT, "length_group_batches", self.length_group_batches, minimum=0)
        for name in ("eval_at_end", "resume", "keep_checkpoints"):
            require_bool(WHAT, name, getattr(self, name))
        object.__setattr__(self, "arguments", dict(self.arguments))
        _check_arguments(self.arguments)

    @classmethod
    def from_dict(cls, params: Mapping[str, Any] | None) -> "TrainConfig":
        """Build from a params dict (`params:distill.trainer`): our fields by name, every other key
        a `TrainingArguments` name; unknown keys are named in the error."""
        params = dict(params or {})
        own = [f.name for f in fields(cls) if f.name != "arguments"]
        unknown = sorted(key for key in params if key not in own and key not in HF_ARGUMENTS)
        if unknown:
            known = own + ["any Hugging Face TrainingArguments name"]
            raise ValueError(KEY_MESSAGE.format(what=WHAT, unknown=unknown, known=known))
        arguments = {key: params.pop(key) for key in list(params) if key not in own}
        return cls(**params, arguments=arguments)

    def argument(self, name: str) -> Any:
        """A `TrainingArguments` value: as given, else Hugging Face's default."""
        if name in self.arguments:
            return self.arguments[name]
        spec = HF_ARGUMENTS[name]
        return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default

    @property
    def seed(self) -> int:
        return self.argument("seed")

    def resolved_precision(self) -> str:
        """`bf16` or `fp32`: `auto` is bf16 where the training device has native bf16
        (`devices.has_native_bf16`: CUDA with bf16, or a CPU with AVX512-BF16 / AMX)."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if has_native_bf16() else "fp32"

    def identity(self) -> dict:
        """What a resumed run must share with the checkpoints' run (operational settings left out)."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "arguments"}
        merged = {**own, **self.arguments}
        return {key: value for key, value in sorted(merged.items()) if key not in NON_NUMERIC_FIELDS}


def _numeric(spec: dataclasses.Field) -> bool:
    """Whether a TrainingArguments field holds a number (int/float, maybe None), not a name."""
    kind = spec.type
    if isinstance(kind, str):
        return kind.replace(" ", "") in ("int", "float", "int|None", "float|None", "float|int", "int|float")
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union \
        else (kind,)
    return bool(set(options) & {int, float}) and not set(options) & {str, bool}


def _check_arguments(arguments: Mapping[str, Any]) -> None:
    """The checks that catch YAML mistakes before the student is built (HF checks the rest)."""
    unknown = sorted(set(arguments) - set(HF_ARGUMENTS))
    if unknown:
        raise ValueError(KEY_MESSAGE.format(what=WHAT, unknown=unknown,
                                            known="our fields or Hugging Face TrainingArguments names"))
    fixed = sorted(set(arguments) & SET_BY_TRAINER)
    if fixed:
        raise ValueError(f"{WHAT}: {fixed} are set by the trainer (from precision, liger, eval_steps / save_steps "
                         "and the loss); remove them")
    for name, value in arguments.items():
        if _numeric(HF_ARGUMENTS[name]) and value is not None:
            require_number(WHAT, name, value)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if name in arguments:
            require_int(WHAT, name, arguments[name], minimum=1)
    for name in ("eval_steps", "save_steps"):
        if arguments.get(name) is not None:
            require_number(WHAT, name, arguments[name], minimum=0)
    if "learning_rate" in arguments:
        require_number(WHAT, "learning_rate", arguments["learning_rate"], above=0)
    if "max_steps" in arguments:
        max_steps = arguments["max_steps"]
        require(is_int(max_steps) and (max_steps == -1 or max_steps >= 1), WHAT, "max_steps",
                "-1 (use num_train_epochs) or >= 1", max_steps)
    warmup = arguments.get("warmup_steps", 0)
    require((is_int(warmup) and warmup >= 0) or (is_number(warmup) and 0 <= warmup < 1), WHAT, "warmup_steps",
            "a step count (int >= 0) or a fraction in [0, 1)", warmup)
    fsdp_training_arguments(arguments.get("fsdp"), arguments.get("fsdp_config"))  # its errors, before the run


def training_arguments(train: TrainConfig, output_dir: Path, has_eval: bool, report_to: Sequence[str],
                       model_type: str | None = None) -> TrainingArguments:
    """The Hugging Face arguments of a run: `train.arguments` unchanged, plus what the trainer
    sets itself (checkpoints under `output_dir`, precision, Liger for `model_type`, ...)."""
    precision = train.resolved_precision()
    cuda = torch.cuda.is_available()
    # On CPU, bf16=True with use_cpu=True is accelerate's CPU autocast (mixed_precision="bf16").
    arguments = dict(train.arguments)
    arguments.pop("disable_tqdm", None)  # see show_progress_bar
    eval_steps = arguments.pop("eval_steps", None)
    arguments.update(fsdp_training_arguments(arguments.pop("fsdp", None), arguments.pop("fsdp_config", None)))
    placeholder = HF_ARGUMENTS["save_steps"].default  # HF wants a value even when nothing is saved
    save_steps = arguments.pop("save_steps", placeholder)
    return TrainingArguments(
        output_dir=str(output_dir),
        eval_strategy="steps" if has_eval and eval_steps else "no",
        eval_steps=eval_steps or None,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or placeholder,
        data_seed=arguments.pop("data_seed", train.seed),
        bf16=precision == "bf16",
        use_cpu=not cuda,
        dataloader_pin_memory=arguments.pop("dataloader_pin_memory", True) and cuda,
        remove_unused_columns=False,  # the collator's keys are not forward() arguments
        label_names=["labels"],
        prediction_loss_only=True,
        logging_nan_inf_filter=False,  # a non-finite loss stops the run instead
        ddp_find_unused_parameters=False,
        report_to=list(report_to) or "none",
        disable_tqdm=not show_progress_bar(train),
        **liger_kernel_arguments(train.liger, model_type, "cuda" if cuda else "cpu"),
        **arguments,
    )


def show_progress_bar(train: TrainConfig) -> bool:
    """Bars on a terminal only (`disable_tqdm: true` turns them off there too): under DVC, CI or
    a log file, tqdm's redraws are noise and the trainer logs a line now and then instead."""
    import sys

    return not train.argument("disable_tqdm") and sys.stderr.isatty()
