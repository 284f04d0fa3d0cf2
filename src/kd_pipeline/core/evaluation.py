"""Held-out evaluation of a student against the teacher's top-k artifact, greedy generations,
and loss-curve plots: values and files only, no tracking (the pipeline layer logs them).

Metrics (`evaluate_student`), all over the *trained tokens* of the validation split, i.e. every
position `p` with `loss_mask[p + 1] == 1`, whose output predicts token `p + 1`
(docs/architecture.md); means are global token means (every trained token weighs the same):

* `student_nll`, `student_ppl`: mean of `-log softmax(u)[y]` over the full vocabulary (`u` the
  student logits at `p`, `y = input_ids[p + 1]`), and `exp` of it.
* `teacher_nll`, `teacher_ppl`: the same from the artifact's `target_logprobs` (the teacher's
  full-vocabulary log-prob of `y`, stored even when `y` is outside the top-k).
* `nll_gap`: `student_nll - teacher_nll`.
* `kl_teacher_student_topk` = KL(p || q) and `kl_student_teacher_topk` = KL(q || p) on the
  teacher's top-k support, at temperature 1, **both sides renormalized over the K ids**:
  `p = softmax_k(l)` with `l` the stored teacher log-probs, `q = softmax_k(u[ids])`. This is the
  `renormalize` view of the KD loss (NeMo-Aligner parity): mass outside the K ids is ignored on
  both sides, so the numbers are comparable across students and independent of the training
  temperature and normalization options, but they are not full-vocabulary KLs.
* `top1_agreement`: fraction of tokens where the student's full-vocabulary argmax equals the
  teacher's top-1 id (column 0 of the descending top-k).
* `topk_overlap`: mean of `|student top-k ∩ teacher top-k| / k`, student top-k over the full
  vocabulary, `k = overlap_k` (default: the artifact's K).
* `teacher_topk_mass`: mean of `sum_k exp(l_k)`, the teacher probability its top-k holds;
  `student_mass_on_teacher_topk`: mean full-vocabulary student probability on those ids.
* `num_samples`, `num_tokens`, `overlap_k`.

The student is run once per batch of length-sorted samples under `torch.no_grad()`; only the
hidden states at trained positions go through the lm_head, in chunks of `token_chunk_size`
rows, so `[B, T, V]` logits never exist.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from kd_pipeline.core.atomic import atomic_path, write_bytes_atomic
from kd_pipeline.core.distill_data import PositionMismatchError, TargetsProvider, trained_positions
from kd_pipeline.core.params import KEY_MESSAGE, dataclass_from_params

logger = logging.getLogger(__name__)

#: Metric names `evaluate_student` returns without a teacher artifact.
STUDENT_METRICS = ("num_samples", "num_tokens", "student_nll", "student_ppl")
#: Metric names added when the teacher artifact is given.
TEACHER_METRICS = (
    "teacher_nll",
    "teacher_ppl",
    "nll_gap",
    "kl_teacher_student_topk",
    "kl_student_teacher_topk",
    "top1_agreement",
    "topk_overlap",
    "overlap_k",
    "teacher_topk_mass",
    "student_mass_on_teacher_topk",
)


@dataclass(frozen=True)
class EvalConfig:
    """How the validation metrics are computed (`evaluate.metrics` params).

    Attributes:
        split: corpus split to evaluate.
        batch_size: samples per student forward (samples are length-sorted first).
        token_chunk_size: trained tokens per lm_head call; a chunk's logits are
            `token_chunk_size x V` float32.
        overlap_k: k of `topk_overlap`; None uses the artifact's K (must be <= K).
        max_samples: evaluate only the first N samples (by sample_id); None: all.
        device: `auto` (CUDA when available), `cpu` or `cuda[:i]`.
    """

    split: str = "validation"
    batch_size: int = 8
    token_chunk_size: int = 512
    overlap_k: int | None = None
    max_samples: int | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("batch_size", "token_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EvalConfig.{name} must be a positive int, got {value!r}")
        for name in ("overlap_k", "max_samples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"EvalConfig.{name} must be a positive int or null, got {value!r}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> "EvalConfig":
        return dataclass_from_params(cls, params, "evaluate.metrics", KEY_MESSAGE)


@dataclass(frozen=True)
class GenerationConfig:
    """Greedy generations for fixed prompts (`evaluate.generation` params).

    Attributes:
        prompts: user messages, each rendered as a one-turn chat with the tokenizer's chat
            template and the generation prompt.
        max_new_tokens: tokens generated per prompt (stops earlier at EOS).
        system_prompt: optional system message put before each prompt.
        include_teacher: also generate with the teacher, for side-by-side reading.
    """

    prompts: tuple[str, ...] = ()
    max_new_tokens: int = 64
    system_prompt: str | None = None
    include_teacher: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not all(isinstance(prompt, str) and prompt for prompt in self.prompts):
            raise ValueError(f"GenerationConfig.prompts must be non-empty strings, got {self.prompts!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"GenerationConfig.max_new_tokens must be a positive int, got {self.max_new_tokens!r}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> "GenerationConfig":
        return dataclass_from_params(cls, params, "evaluate.generation", KEY_MESSAGE)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


@dataclass
class _TeacherRows:
    """One sample's artifact rows: positions [n], topk_ids [n, K], topk_logprobs [n, K], target_logprobs [n]."""

    positions: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_logprobs: np.ndarray


def _field(record: Any, name: str) -> Any:
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _teacher_rows(sample_id: str, record: Any, loss_mask: np.ndarray) -> _TeacherRows:
    if record is None:
        raise KeyError(f"sample {sample_id} has no rows in the teacher top-k artifact")
    rows = _TeacherRows(
        positions=_as_numpy(_field(record, "positions")).astype(np.int64),
        topk_ids=_as_numpy(_field(record, "topk_ids")).astype(np.int64),
        topk_logprobs=_as_numpy(_field(record, "topk_logprobs")).astype(np.float32),
        target_logprobs=_as_numpy(_field(record, "target_logprobs")).astype(np.float64),
    )
    expected = trained_positions(loss_mask)
    n = len(expected)
    if not np.array_equal(rows.positions, expected):
        raise PositionMismatchError(
            f"sample {sample_id}: the teacher top-k artifact's positions ({len(rows.positions)} rows) do not match "
            f"the corpus loss_mask ({n} trained positions); the artifact was made from a different corpus"
        )
    if rows.topk_ids.ndim != 2 or rows.topk_ids.shape[0] != n or rows.topk_logprobs.shape != rows.topk_ids.shape \
            or rows.target_logprobs.shape != (n,):
        raise PositionMismatchError(
            f"sample {sample_id}: topk_ids {rows.topk_ids.shape}, topk_logprobs {rows.topk_logprobs.shape}, "
            f"target_logprobs {rows.target_logprobs.shape} do not have one row per trained position ({n})"
        )
    return rows


def _fetch(teacher: TargetsProvider, sample_ids: list[str]) -> list[Any]:
    fetched = teacher.get_many(sample_ids)
    if isinstance(fetched, Mapping):
        return [fetched.get(sample_id) for sample_id in sample_ids]
    fetched = list(fetched)
    if len(fetched) != len(sample_ids):
        raise ValueError(f"the teacher artifact returned {len(fetched)} records for {len(sample_ids)} sample ids")
    return fetched


def _decoder_and_head(model):
    """The transformer body (hidden states) and the lm_head of an HF causal LM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings()
    if decoder is None or head is None:
        raise ValueError(f"{type(model).__name__}: cannot find the decoder body and lm_head (get_decoder / "
                         "get_output_embeddings)")
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(model.config, name, None) not in (None, 1.0):
            raise ValueError(f"{type(model).__name__} sets config.{name}; evaluate_student applies the plain lm_head only")
    return decoder, head


class _Sums:
    """Float64 running sums of the per-token quantities."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.values[name] = self.values.get(name, 0.0) + float(tensor.double().sum())


@torch.no_grad()
def evaluate_student(
    model,
    samples: pa.Table,
    teacher: TargetsProvider | None = None,
    config: EvalConfig = EvalConfig(),
) -> dict[str, float]:
    """Student metrics on the trained tokens of `samples` (see the module docstring).

    Args:
        model: HF causal LM (its device and dtype are used as they are; eval mode is set).
        samples: corpus rows with `sample_id`, `input_ids`, `loss_mask` (one split already
            selected, e.g. `TokenizedCorpus.split("validation")`).
        teacher: artifact reader with `get_many(sample_ids)` returning per-sample
            `positions [n]`, `topk_ids [n, K]`, `topk_logprobs [n, K]`, `target_logprobs [n]`
            (attributes or keys); None gives student metrics only.
        config: batch sizes, `overlap_k`, `max_samples`.

    Returns:
        Flat `{name: float}`.

    Raises:
        ValueError: no trained tokens; artifact rows that do not sit at the corpus's trained
            positions (`PositionMismatchError`); `overlap_k` larger than the artifact's K.
    """
    model.eval()
    decoder, head = _decoder_and_head(model)
    device = next(model.parameters()).device
    if config.max_samples is not None:
        samples = samples.sort_by("sample_id").slice(0, config.max_samples)
    sample_ids: list[str] = samples["sample_id"].to_pylist()
    all_ids = [np.asarray(row, dtype=np.int64) for row in samples["input_ids"].to_pylist()]
    all_masks = [np.asarray(row, dtype=np.int8) for row in samples["loss_mask"].to_pylist()]
    # Longest first: little padding per batch, and the peak memory shows up at once.
    order = sorted(range(len(sample_ids)), key=lambda i: (-len(all_ids[i]), sample_ids[i]))

    sums, num_tokens, overlap_k = _Sums(), 0, None
    for start in range(0, len(order), config.batch_size):
        batch = order[start:start + config.batch_size]
        B, T = len(batch), max(len(all_ids[i]) for i in batch)
        input_ids = torch.zeros((B, T), dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        positions_mask = torch.zeros((B, T), dtype=torch.bool)
        for b, i in enumerate(batch):
            length = len(all_ids[i])
            if length and all_masks[i][0]:
                raise ValueError(f"sample {sample_ids[i]}: loss_mask[0] is 1, but token 0 has no prediction")
            input_ids[b, :length] = torch.from_numpy(all_ids[i])
            attention_mask[b, :length] = 1
            positions_mask[b, :length - 1] = torch.from_numpy(all_masks[i][1:].astype(bool))  # p predicts p + 1
        n = int(positions_mask.sum())
        if n == 0:
            continue
        next_ids = torch.zeros_like(input_ids)
        next_ids[:, :-1] = input_ids[:, 1:]
        labels = next_ids[positions_mask].to(device)  # [N], row-major (sample, position) order

        teacher_batch = None
        if teacher is not None:
            records = _fetch(teacher, [sample_ids[i] for i in batch])
            rows = [_teacher_rows(sample_ids[i], record, all_masks[i]) for i, record in zip(batch, records)]
            # Samples in batch order, each's rows by increasing position = row-major order of
            # positions_mask.nonzero(), the order of `hidden[positions_mask]` below.
            topk_ids = torch.from_numpy(np.concatenate([r.topk_ids for r in rows])).to(device)
            topk_logprobs = torch.from_numpy(np.concatenate([r.topk_logprobs for r in rows])).to(device)
            target_logprobs = torch.from_numpy(np.concatenate([r.target_logprobs for r in rows]))
            K = topk_ids.shape[1]
            if overlap_k is None:
                overlap_k = config.overlap_k or K
                if overlap_k > K:
                    raise ValueError(f"evaluate.metrics.overlap_k={overlap_k} exceeds the artifact's k={K}")
            sums.add("teacher_nll", -target_logprobs)
            teacher_batch = (topk_ids, topk_logprobs)

        hidden = decoder(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).last_hidden_state
        hidden = hidden[positions_mask.to(device)]  # [N, H]: trained positions only
        for lo in range(0, n, config.token_chunk_size):
            hi = min(lo + config.token_chunk_size, n)
            logits = head(hidden[lo:hi]).float()  # [n, V]
            log_z = torch.logsumexp(logits, dim=-1)
            sums.add("student_nll", log_z - logits.gather(1, labels[lo:hi, None])[:, 0])
            if teacher_batch is not None:
                _teacher_sums(sums, logits, log_z, teacher_batch[0][lo:hi], teacher_batch[1][lo:hi], overlap_k)
        num_tokens += n

    if num_tokens == 0:
        raise ValueError(f"no trained tokens in the {config.split!r} samples ({len(sample_ids)} samples)")
    mean = {name: value / num_tokens for name, value in sums.values.items()}
    metrics = {
        "num_samples": float(len(sample_ids)),
        "num_tokens": float(num_tokens),
        "student_nll": mean["student_nll"],
        "student_ppl": math.exp(mean["student_nll"]),
    }
    if teacher is not None:
        metrics.update({
            "teacher_nll": mean["teacher_nll"],
            "teacher_ppl": math.exp(mean["teacher_nll"]),
            "nll_gap": mean["student_nll"] - mean["teacher_nll"],
            "kl_teacher_student_topk": mean["kl_teacher_student_topk"],
            "kl_student_teacher_topk": mean["kl_student_teacher_topk"],
            "top1_agreement": mean["top1_agreement"],
            "topk_overlap": mean["topk_overlap"],
            "overlap_k": float(overlap_k),
            "teacher_topk_mass": mean["teacher_topk_mass"],
            "student_mass_on_teacher_topk": mean["student_mass_on_teacher_topk"],
        })
    return metrics


def _teacher_sums(sums: _Sums, logits: torch.Tensor, log_z: torch.Tensor, topk_ids: torch.Tensor,
                  topk_logprobs: torch.Tensor, overlap_k: int) -> None:
    """Adds the per-token teacher comparisons of one chunk: logits [n, V], topk_* [n, K]."""
    student_at_ids = logits.gather(1, topk_ids)  # [n, K]
    log_q = student_at_ids - torch.logsumexp(student_at_ids, dim=-1, keepdim=True)  # renormalized over K
    log_p = topk_logprobs - torch.logsumexp(topk_logprobs, dim=-1, keepdim=True)
    sums.add("kl_teacher_student_topk", (log_p.exp() * (log_p - log_q)).sum(-1))
    sums.add("kl_student_teacher_topk", (log_q.exp() * (log_q - log_p)).sum(-1))
    sums.add("top1_agreement", (logits.argmax(dim=-1) == topk_ids[:, 0]).float())
    student_top = logits.topk(overlap_k, dim=-1).indices  # [n, k]
    shared = (student_top[:, :, None] == topk_ids[:, None, :overlap_k]).any(-1).sum(-1)  # [n]
    sums.add("topk_overlap", shared.double() / overlap_k)
    sums.add("teacher_topk_mass", topk_logprobs.double().exp().sum(-1))
    sums.add("student_mass_on_teacher_topk", (student_at_ids - log_z[:, None]).double().exp().sum(-1))


# --------------------------------------------------------------------------------------------
# Generations
# --------------------------------------------------------------------------------------------


def chat_prompt_ids(tokenizer, prompt: str, system_prompt: str | None = None) -> list[int]:
    """A one-turn user chat rendered with the tokenizer's chat template + generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("generations use the chat format, but the tokenizer has no chat template")
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def generate_greedy(model, tokenizer, config: GenerationConfig) -> list[str]:
    """Greedy completions (decoded, special tokens dropped) of each prompt, one prompt at a time."""
    from transformers import GenerationConfig as HFGenerationConfig

    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # A fresh config: the model's own may carry sampling defaults (temperature, top_p).
    hf_config = HFGenerationConfig(do_sample=False, max_new_tokens=config.max_new_tokens, eos_token_id=eos,
                                   pad_token_id=pad)
    outputs = []
    for prompt in config.prompts:
        ids = torch.tensor([chat_prompt_ids(tokenizer, prompt, config.system_prompt)], dtype=torch.long, device=device)
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=hf_config)
        outputs.append(tokenizer.decode(generated[0, ids.shape[1]:].tolist(), skip_special_tokens=True))
    return outputs


def format_generations(config: GenerationConfig, completions: Mapping[str, Sequence[str]]) -> str:
    """Plain text: each prompt followed by each model's completion (`completions`: model -> list)."""
    out = io.StringIO()
    out.write(f"# Greedy generations (chat format, max_new_tokens={config.max_new_tokens})\n")
    if config.system_prompt:
        out.write(f"# system: {config.system_prompt}\n")
    for index, prompt in enumerate(config.prompts):
        out.write(f"\n## Prompt {index + 1}\n{prompt}\n")
        for name, texts in completions.items():
            text = texts[index]
            # A whitespace-only completion (an untrained model's newlines) would read as empty.
            shown = text.rstrip() if text.strip() else f"(whitespace only: {text!r})"
            out.write(f"\n### {name}\n{shown}\n")
    return out.getvalue()


# --------------------------------------------------------------------------------------------
# Loss curves
# --------------------------------------------------------------------------------------------

# Log-history keys that are bookkeeping, not curves.
_NOT_CURVES = {"step", "epoch", "total_flos", "train_runtime", "train_samples_per_second",
               "train_steps_per_second", "train_loss", "eval_runtime", "eval_samples_per_second",
               "eval_steps_per_second"}


def log_history(summary: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict]:
    """The list of logged entries of a distill summary (`{"log_history": [...]}`) or a list."""
    if isinstance(summary, Mapping):
        for key in ("log_history", "history"):
            if isinstance(summary.get(key), list):
                return [dict(entry) for entry in summary[key] if isinstance(entry, Mapping)]
        raise ValueError(f"distill summary has no 'log_history' list (keys: {sorted(summary)})")
    return [dict(entry) for entry in summary if isinstance(entry, Mapping)]


def curves(summary) -> dict[str, list[tuple[int, float]]]:
    """`{key: [(step, value), ...]}` for every finite numeric key of the log history."""
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history(summary):
        step = entry.get("step")
        if not isinstance(step, (int, float)):
            continue
        for key, value in entry.items():
            if key in _NOT_CURVES or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                series.setdefault(key, []).append((int(step), float(value)))
    return series


def _is_loss(key: str) -> bool:
    name = key.rsplit("/", 1)[-1].removeprefix("eval_").removeprefix("train_")
    return "loss" in name or name in ("total", "kd", "sft") or name.endswith(("_kd", "_sft"))


def _is_eval(key: str) -> bool:
    return key.startswith(("eval_", "eval/"))


def held_out_loss_key(series: Mapping[str, Any]) -> str | None:
    """The held-out curve that means the same in every run: the label cross-entropy `eval_sft`
    (logged whatever the loss weights), else `eval_loss`, else the first eval loss-like key.

    `eval_loss` itself is the weighted training objective (`kd_w * kd + sft_w * sft`), a
    different quantity in a KD+SFT run and an SFT-only run, so it is not what to compare.
    """
    for key in ("eval_sft", "eval_loss"):
        if key in series:
            return key
    return next((key for key in sorted(series) if _is_eval(key) and _is_loss(key)), None)


def train_loss_key(series: Mapping[str, Any]) -> str | None:
    """The train-side counterpart of `held_out_loss_key`: `sft`, else `loss`, else a loss-like key."""
    for key in ("sft", "loss"):
        if key in series:
            return key
    return next((key for key in sorted(series) if not _is_eval(key) and _is_loss(key)), None)


def _new_figure(nrows: int, width: float = 7.0, height: float = 3.2):
    # Figure + Agg canvas directly: no pyplot, no global backend state, safe off the main thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height * nrows), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, [figure.add_subplot(nrows, 1, row + 1) for row in range(nrows)]


def _save_png(figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return path


def plot_training_curves(summary, path: str | os.PathLike, title: str = "training curves") -> Path:
    """One PNG: train loss terms, held-out (eval) loss terms and learning rate vs step."""
    series = curves(summary)
    panels = [
        ("train loss", sorted(key for key in series if _is_loss(key) and not _is_eval(key))),
        ("held-out loss", sorted(key for key in series if _is_loss(key) and _is_eval(key))),
        ("learning rate", [key for key in ("learning_rate", "lr") if key in series]),
    ]
    panels = [(name, keys) for name, keys in panels if keys] or [("(no curves logged)", [])]
    figure, axes = _new_figure(len(panels))
    for ax, (name, keys) in zip(axes, panels):
        for key in keys:
            steps, values = zip(*series[key])
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=8)
    axes[0].set_title(title)
    axes[-1].set_xlabel("step")
    return _save_png(figure, Path(path))


def plot_comparison(summaries: Mapping[str, Any], path: str | os.PathLike,
                    title: str = "KD+SFT vs SFT-only") -> Path:
    """One PNG overlaying runs (`label -> summary`): held-out (top) and train (bottom) label
    cross-entropy, the quantity both kinds of run share (see `held_out_loss_key`)."""
    figure, (eval_ax, train_ax) = _new_figure(2)
    for label, summary in summaries.items():
        series = curves(summary)
        for ax, key in ((eval_ax, held_out_loss_key(series)), (train_ax, train_loss_key(series))):
            if key is not None:
                steps, values = zip(*series[key])
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=f"{label} ({key})")
    for ax, name in ((eval_ax, "held-out CE"), (train_ax, "train CE")):
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    eval_ax.set_title(title)
    train_ax.set_xlabel("step")
    return _save_png(figure, Path(path))


def write_curve_csv(summary, path: str | os.PathLike) -> Path:
    """`step,held_out_loss` rows (the `held_out_loss_key` curve): a data series that
    `dvc plots diff` overlays across experiments."""
    series = curves(summary)
    key = held_out_loss_key(series)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "held_out_loss"])
    for step, value in series.get(key, []) if key else []:
        writer.writerow([step, repr(value)])
    path = Path(path)
    write_bytes_atomic(path, out.getvalue().encode())
    return path


def plot_loss_curves(summary, out_dir: str | os.PathLike, comparison: Mapping[str, Any] | None = None,
                     title: str = "training curves") -> list[Path]:
    """The loss-curve files of one run, written into `out_dir`.

    Args:
        summary: this run's distill summary (`{"log_history": [...]}` or the list itself).
        out_dir: directory for the files (created).
        comparison: `label -> summary` of the runs to overlay (e.g. `{"KD+SFT": ..., "SFT-only": ...}`);
            the overlay is drawn only when it holds at least two runs.
        title: title of the training-curves figure.

    Returns:
        The PNG paths: `training_curves.png`, plus `kd_vs_sft.png` when compared.
        (`held_out_loss.csv` is written beside them for DVC data plots; it is not in the list.)
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [plot_training_curves(summary, out_dir / "training_curves.png", title=title)]
    write_curve_csv(summary, out_dir / "held_out_loss.csv")
    if comparison is not None and len(comparison) >= 2:
        paths.append(plot_comparison(comparison, out_dir / "kd_vs_sft.png"))
    return paths
