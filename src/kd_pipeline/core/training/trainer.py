"""`DistillationTrainer`: a Hugging Face `Trainer` whose loss is the fused top-k KD + SFT loss on
the student's final hidden states, normalized over the global trained tokens of each optimizer
step, and its callbacks.

Normalization (docs/architecture.md, issue 4): the loss of an optimizer step is
`sum_i w_i * loss_i` over every trained token of the step, all micro-batches and all ranks
together, with `w_i = 1 / global_trained_tokens` (`reduction: token`) or
`w_i = 1 / (trained_tokens_of_its_sequence * global_sequences)` (`reduction: sequence`). The
trainer counts the step's tokens and sequences before its first micro-batch (all-reduced across
ranks), and multiplies each rank's weights by the world size because DDP and FSDP2 average
gradients over the processes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from kd_pipeline.core.losses import KDLossConfig, LossOutput
from kd_pipeline.core.memory import release_unused_memory
from kd_pipeline.core.training.config import REDUCTIONS
from kd_pipeline.core.training.data import LengthGroupedSampler
from kd_pipeline.core.training.fsdp import unsharded_copy
from kd_pipeline.core.training.loss_module import (
    CROSS_TOKENIZER_INPUTS,
    CrossTokenizerStudentWithLoss,
    StudentWithLoss,
)

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; names the global step and the batch's sample ids."""


class NonFiniteGradientError(FloatingPointError):
    """An optimizer step's gradient norm is NaN or Inf; names the step and its sample ids.

    Raised before the optimizer applies the step, so the weights keep their last finite update
    and the run stops before it can save (or replace) a student.
    """


class DistillationTrainer(Trainer):
    """`Trainer` whose loss is `fused_topk_kd_loss` on the student's final hidden states.

    The model is wrapped in `loss_module.StudentWithLoss`, whose `forward` runs the base model,
    gathers the trained positions' hidden states and hands them with the lm_head weight to the
    fused loss (which never holds [N, V] logits). The loss thus runs inside the (DDP- or
    FSDP2-wrapped) module's forward, where DDP's gradient synchronization and FSDP's all-gather /
    reduce-scatter hooks see it; `compute_loss` supplies the reduction weights of the global step.

    Checkpoints and the saved student hold the student's own keys: DDP checkpoints as
    `save_pretrained` writes them, FSDP2 checkpoints as accelerate's sharded
    `torch.distributed.checkpoint` folders (the Trainer's own FSDP path).

    Args (beyond `Trainer`'s):
        model: the `*ForCausalLM` student (wrapped here) or a `StudentWithLoss`.
        loss_config: the loss hyperparameters (`kd_loss_weight: 0` = SFT only, no targets needed).
        reduction: `token` or `sequence` (see the module docstring).
    """

    # compute_loss normalizes over the whole optimizer step itself (see get_batch_samples).
    loss_is_scaled_for_ga = True

    def __init__(self, model, *args, loss_config: KDLossConfig, reduction: str = "token", length_group_batches: int = 0,
                 **kwargs):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
        # The fused loss applies the student's own post-head transform (soft-cap, scaling) and drops
        # head rows past the tokenizer, so it scores what student(...).logits would.
        tokenizer = kwargs.get("processing_class")
        num_tokens = len(tokenizer) if tokenizer is not None else None
        if not isinstance(model, StudentWithLoss):
            model = StudentWithLoss(model, loss_config, num_tokens=num_tokens)
        model.loss_config = loss_config
        super().__init__(model, *args, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError(
                f"{self.args.n_gpu} GPUs visible to one process (torch DataParallel) are not supported: "
                "launch one process per GPU with torchrun or accelerate launch"
            )
        if self.args.fsdp and not self.is_fsdp_enabled:
            raise ValueError(
                "distill.trainer.fsdp needs CUDA devices: accelerate runs FSDP only on accelerators (CPU processes "
                "would silently train with DDP, unsharded); leave fsdp off on CPU"
            )
        self.reduction = reduction
        self.length_group_batches = length_group_batches
        if not hasattr(Trainer, "_get_grad_norm"):  # the hook of the gradient check below
            raise RuntimeError("this transformers version has no Trainer._get_grad_norm: the non-finite gradient "
                               "check of DistillationTrainer needs updating for it")
        self._step_sample_ids: list[str] = []
        self._step_sequences: int | None = None
        self._metrics = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._train_seconds = 0.0
        self._step_started: float | None = None
        self.add_callback(_StepTimer(self))

    @property
    def loss_config(self) -> KDLossConfig:
        return self.model.loss_config

    @loss_config.setter
    def loss_config(self, config: KDLossConfig) -> None:
        self.model.loss_config = config

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
        self._step_sample_ids = [sample_id for batch in batch_samples for sample_id in batch.get("sample_ids", [])]
        return batch_samples, counts[0]

    # ---- gradients: the norm HF computes for clipping, checked before the optimizer step ----

    def _get_grad_norm(self, model, grad_norm=None):
        """HF's pre-clipping gradient norm of the step (Trainer calls this right after clipping
        and before `optimizer.step()`), refused when NaN or Inf.

        Clipping an infinite norm scales every gradient to 0 (a NaN norm makes them NaN), so
        without this check such steps train nothing, or poison the weights, with a finite loss.
        After DDP's all-reduce every rank sees the same norm, so every rank stops here together.
        """
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        value = float(grad_norm) if grad_norm is not None else None
        if value is not None and not math.isfinite(value):
            ranks = " on this rank" if self.accelerator.num_processes > 1 else ""
            raise NonFiniteGradientError(
                f"non-finite gradient norm ({value}) at global step {self.state.global_step + 1}: the step was not "
                f"applied and training stopped (no student is saved); sample ids of the step{ranks}: "
                f"{', '.join(self._step_sample_ids)}"
            )
        return grad_norm

    def _get_train_sampler(self, train_dataset=None):
        """`LengthGroupedSampler` when `length_group_batches` > 0 (per-process batches, before any
        sharding across processes), else the Trainer's own sampler."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.length_group_batches or not hasattr(dataset, "lengths"):
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return LengthGroupedSampler(dataset.lengths, self.args.train_batch_size, self.length_group_batches, seed=seed)

    # ---- the loss ---------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Fused KD + SFT loss of one micro-batch, weighted for the global step mean.

        Args:
            model: the (possibly DDP- or FSDP-wrapped) `StudentWithLoss`.
            inputs: a `DistillCollator` batch (on the device).
            return_outputs: also return `{"loss": loss}` (there are no logits).
            num_items_in_batch: trained tokens of the whole optimizer step on all ranks (set by
                `get_batch_samples`); None normalizes over this micro-batch alone.
        """
        mask = inputs["kd_positions_mask"]  # (B, T) bool
        training = model.training
        scale = self.accelerator.num_processes if training and self.accelerator.num_processes > 1 else 1
        weights = self._token_weights(mask, num_items_in_batch if training else None, scale)
        out = self._forward_loss(model, inputs, weights)
        self._check_finite(out.loss, inputs, training)
        self._record(out, inputs, scale, training)
        return (out.loss, {"loss": out.loss}) if return_outputs else out.loss

    def _forward_loss(self, model, inputs: dict, weights: torch.Tensor) -> LossOutput:
        """The loss module's forward on a micro-batch with its reduction weights."""
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     kd_positions_mask=inputs["kd_positions_mask"], token_weights=weights, labels=inputs["labels"],
                     kd_topk_ids=inputs.get("kd_topk_ids"), kd_topk_logprobs=inputs.get("kd_topk_logprobs"),
                     kd_teacher_logz=inputs.get("kd_teacher_logz"), kd_topk_weights=inputs.get("kd_topk_weights"))

    # ---- saving: the student's own keys -------------------------------------------------------

    def gather_student_state(self) -> dict | None:
        """The full state dict of a sharded (FSDP2) model on the main process ({} elsewhere);
        None when the model is not sharded. Every process must call it (a collective)."""
        return self.accelerator.get_state_dict(self.model) if self.is_fsdp_enabled else None

    def save_student(self, output_dir: str | os.PathLike, state_dict: dict | None = None) -> None:
        """Write the student as an HF folder (`save_pretrained`: safetensors, config) with the
        tokenizer; `state_dict` from `gather_student_state` when sharded."""
        wrapper = self.accelerator.unwrap_model(self.model)
        student = wrapper.student
        if state_dict is None:
            state_dict = wrapper.student_state_dict()
        else:
            # A sharded student is saved through a plain copy holding the gathered weights (tied
            # again, so the file holds them once, as a DDP run's does).
            student = unsharded_copy(student, wrapper.student_state_dict(state_dict))
            state_dict = student.state_dict()
        os.makedirs(output_dir, exist_ok=True)
        student.save_pretrained(output_dir, state_dict=state_dict, is_main_process=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The Trainer's model saving (DDP checkpoints, `save_model`): the student's HF folder."""
        if self.args.should_save:
            self.save_student(output_dir if output_dir is not None else self.args.output_dir, state_dict)
            torch.save(self.args, os.path.join(output_dir or self.args.output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """A DDP checkpoint is the student's HF folder: loaded into the student. An FSDP2 one is
        accelerate's sharded state of the wrapper, loaded by the Trainer's own FSDP path."""
        if model is None and not self.is_fsdp_enabled:
            model = self.accelerator.unwrap_model(self.model).student
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)

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
        has_kd = self._KD_INPUT in inputs
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
            for name, value in self._extra_kd_sums(out).items():
                metrics[name] += value * norm
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
                    extra.update({name[:-4]: sums[name] / steps for name in self._extra_sum_names(sums)})
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
                    extra.update({name[:-4]: sums[name] / norm for name in self._extra_sum_names(sums)})
            if has_kd and sums["weight_sum"] > 0:
                coverage_name, mass_name = self._MEAN_METRICS
                extra[coverage_name] = sums["coverage_sum"] / sums["weight_sum"]
                extra[mass_name] = sums["mass_sum"] / sums["weight_sum"]
            prefix = "" if mode == "train" else "eval_"
            logs = {**logs, **{prefix + key: value for key, value in extra.items()}}
        super().log(logs, start_time)

    _globalstep_last_logged_for_metrics = 0
    _train_seconds_last_logged = 0.0
    #: The batch key whose presence means the batch has KD targets.
    _KD_INPUT = "kd_topk_ids"
    #: Log names of `LossOutput.teacher_coverage` and `.student_topk_mass` (weighted means).
    _MEAN_METRICS = ("teacher_coverage", "student_topk_mass")

    def _extra_kd_sums(self, out) -> dict[str, float]:
        """Further per-micro-batch loss terms to log, as `{name + "_sum": value}`."""
        return {}

    @staticmethod
    def _extra_sum_names(sums: dict) -> list[str]:
        known = {"loss_sum", "sft_sum", "kd_sum", "coverage_sum", "mass_sum", "weight_sum"}
        return sorted(name for name in sums if name.endswith("_sum") and name not in known)


class CrossTokenizerTrainer(DistillationTrainer):
    """`DistillationTrainer` for a student with its own tokenizer (`core/cross_tokenizer`).

    Batches come from `CrossTokenizerCollator` (the student's tokens plus the aligned groups'
    teacher rows, `ct_*`); the model is wrapped in `CrossTokenizerStudentWithLoss`, whose forward
    runs `cross_tokenizer_kd_loss`, a group weighing what its first student row weighs. Logged:
    `kd` (on matched classes), `uld` (unmatched rest), `sft`, `matched_mass` (teacher mass on
    matched classes) and `aligned_agreement` (top-1 class).

    Args (beyond `DistillationTrainer`'s):
        projection: the pair's `VocabMap.projection()`.
        options: the `CrossTokenizerOptions`.
    """

    _KD_INPUT = "ct_row_start"
    _MEAN_METRICS = ("matched_mass", "aligned_agreement")

    def __init__(self, model, *args, projection, options, loss_config: KDLossConfig, **kwargs):
        if not isinstance(model, CrossTokenizerStudentWithLoss):
            if isinstance(model, StudentWithLoss):
                model = model.student
            tokenizer = kwargs.get("processing_class")
            model = CrossTokenizerStudentWithLoss(model, loss_config, projection, options,
                                                  num_tokens=len(tokenizer) if tokenizer is not None else None)
        super().__init__(model, *args, loss_config=loss_config, **kwargs)

    def _forward_loss(self, model, inputs: dict, weights: torch.Tensor) -> LossOutput:
        if self._KD_INPUT not in inputs:  # SFT only (no teacher rows): the plain loss
            self._last_uld = None
            return super()._forward_loss(model, inputs, weights)
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    kd_positions_mask=inputs["kd_positions_mask"], token_weights=weights, labels=inputs["labels"],
                    **{name: inputs[name] for name in CROSS_TOKENIZER_INPUTS})
        self._last_uld = out.uld
        return LossOutput(out.loss, out.kd, out.sft, out.matched_mass, out.agreement, out.group_weight_sum)

    def _extra_kd_sums(self, out) -> dict[str, float]:
        return {"uld_sum": float(self._last_uld)} if self._last_uld is not None else {}

    _last_uld = None


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
    """The Trainer's tqdm bar labelled `distill` (optimizer steps, rate, ETA), with loss, kd and
    tokens/s shown on the bar and held-out rows written above it, instead of printed dicts."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.training_bar = tqdm(total=state.max_steps, initial=state.global_step, desc="distill",
                                     unit="step", dynamic_ncols=True)
        self.current_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "loss" in logs:
            self.training_bar.set_postfix(progress_fields(logs), refresh=True)
        elif "eval_loss" in logs:
            self.training_bar.write(f"distill step {state.global_step}: held-out {eval_fields(logs)}")


class ReleaseMemoryCallback(TrainerCallback):
    """Freed memory back to the OS after every optimizer step, evaluation and checkpoint
    (`core.memory.release_unused_memory`). Each batch has other shapes (sequence lengths vary),
    so glibc's heaps fragment and the resident size creeps up over an epoch by what no later
    block fits (measured on the default job: 3.0 -> 4.2 GiB over 57 steps, while the live
    tensors stay ~2.7 GiB)."""

    def on_step_end(self, args, state, control, **kwargs):
        release_unused_memory("distill: step", collect=False)

    def on_evaluate(self, args, state, control, **kwargs):
        release_unused_memory("distill: evaluation")

    def on_save(self, args, state, control, **kwargs):
        release_unused_memory("distill: checkpoint")


def evaluated_this_step(args, state) -> bool:
    """Whether the Trainer's own schedule evaluates after `state.global_step`: a multiple of
    `state.eval_steps` (the step count, also when `args.eval_steps` is a fraction of the run)."""
    return args.eval_strategy == "steps" and bool(state.eval_steps) and state.global_step % state.eval_steps == 0


class EndOfTrainingCallback(TrainerCallback):
    """At the last step, only the evaluation and checkpoint the run asked for. Transformers 5's
    `DefaultFlowCallback` evaluates and saves at the end of every run with a step strategy:
    - its evaluation duplicated `train_student`'s final one (which runs after AdamW's state is
      freed, so the job's memory peak stays lower) and ignored `eval_at_end: false`;
    - its checkpoint (1.4 GB of weights and optimizer state for the default student) is deleted
      a second later when checkpoints are not kept: the student folder is saved next. Resume
      still works: an interrupted run restarts from the last `save_steps` checkpoint.
    Runs after `DefaultFlowCallback` (callbacks are called in the order they were added)."""

    def __init__(self, keep_checkpoints: bool):
        self.keep_checkpoints = keep_checkpoints

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step < state.max_steps:
            return
        if not evaluated_this_step(args, state):
            control.should_evaluate = False
        if not self.keep_checkpoints:
            control.should_save = False


class DistillLogCallback(TrainerCallback):
    """Without a bar (output is not a terminal, or `disable_tqdm`): one log line about every
    tenth of the run and at each held-out evaluation, instead of HF's printed dicts."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        every = max(1, state.max_steps // 10)
        if "loss" in logs and (state.global_step % every == 0 or state.global_step == state.max_steps):
            fields = " ".join(f"{key} {value}" for key, value in progress_fields(logs).items())
            logger.info("distill: step %d/%d %s", state.global_step, state.max_steps, fields)
        elif "eval_loss" in logs:
            logger.info("distill: step %d/%d held-out %s", state.global_step, state.max_steps, eval_fields(logs))


def progress_fields(logs: dict) -> dict[str, str]:
    fields = {"loss": f"{logs['loss']:.4f}"}
    if "kd" in logs:
        fields["kd"] = f"{logs['kd']:.4f}"
    if "tokens_per_second" in logs:
        fields["tok/s"] = f"{logs['tokens_per_second']:.0f}"
    return fields


def eval_fields(logs: dict) -> str:
    return ", ".join(f"{key[len('eval_'):]} {value:.4g}" for key, value in logs.items()
                     if key.startswith("eval_") and isinstance(value, float)
                     and not key.endswith(("_runtime", "_per_second")))
