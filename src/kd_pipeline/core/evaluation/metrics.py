"""Held-out evaluation of a student against the teacher's top-k artifact: values only, no
tracking (the pipeline layer logs them).

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
* `topk_overlap`: mean of `|student top-m ∩ teacher top-m| / m`, student top-m over the full
  vocabulary, `m = overlap_k` (default: the artifact's K), or the row's number of entries when a
  variable (`top_p` / `sampled`) row has fewer.
* `teacher_topk_mass`: mean of `sum_k exp(l_k)`, the teacher probability its top-k holds;
  `student_mass_on_teacher_topk`: mean full-vocabulary student probability on those ids.
* `student_bits_per_byte` (and `teacher_bits_per_byte`): the summed NLL of the trained tokens
  over `ln 2` times the UTF-8 bytes they cover (from the corpus's `byte_ends`): comparable
  across tokenizers, unlike per-token NLL; absent for corpora without byte ends. `num_bytes`.
* `kl_teacher_student_full` (with the teacher model, `EvalConfig.full_vocab_kl`): KL(p || q)
  over the **full** vocabulary, the teacher run again on the split; `top1_agreement_full`: the
  student's argmax equals the teacher's full-vocabulary argmax. Unlike the top-k metrics they do
  not depend on the artifact's capture mode (`topk`, `top_p`, `sampled`), so modes compare.
  (With a `sampled` artifact, `top1_agreement` compares with the most probable *drawn* id.)
* `num_samples`, `num_tokens`, `overlap_k`.

The student is run once per batch of length-sorted samples under `torch.no_grad()`; only the
hidden states at trained positions go through the lm_head, in chunks of `token_chunk_size`
rows, so `[B, T, V]` logits never exist. The head's output goes through the model's own logit
transform (`models.head.head_transform`), as in extraction.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import torch

from kd_pipeline.core.batching import TargetsProvider, check_rows, fetch_targets, pad_right, sample_targets
from kd_pipeline.core.devices import is_device_spec, resolve_device
from kd_pipeline.core.memory import release_unused_memory
from kd_pipeline.core.models.head import HeadTransform, decoder_and_head, head_transform
from kd_pipeline.core.params import dataclass_from_params, require, require_bool, require_choice, require_int
from kd_pipeline.core.topk_store.codec import padding_slots
from kd_pipeline.core.topk_store.reader import VERIFY_MODES

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
#: Metric names added when the teacher model is run again (`EvalConfig.full_vocab_kl`).
FULL_TEACHER_METRICS = ("kl_teacher_student_full", "top1_agreement_full")


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
        topk_verify: when the artifact's shard checksums are checked (`TopKReader(verify=...)`):
            `full` all at open, `lazy` each on first read, `auto` full up to 16 GiB of shards.
        full_vocab_kl: run the teacher again on the split for `kl_teacher_student_full` and
            `top1_agreement_full` (full-vocabulary metrics that do not depend on what the
            artifact stores, so capture modes compare; costs one teacher forward of the split).
    """

    split: str = "validation"
    batch_size: int = 8
    token_chunk_size: int = 128
    overlap_k: int | None = None
    max_samples: int | None = None
    device: str = "auto"
    topk_verify: str = "auto"
    full_vocab_kl: bool = True

    def __post_init__(self) -> None:
        require_choice("evaluate.metrics", "topk_verify", self.topk_verify, VERIFY_MODES)
        require_bool("evaluate.metrics", "full_vocab_kl", self.full_vocab_kl)
        for name in ("batch_size", "token_chunk_size"):
            require_int("evaluate.metrics", name, getattr(self, name), minimum=1)
        for name in ("overlap_k", "max_samples"):
            require_int("evaluate.metrics", name, getattr(self, name), minimum=1, allow_none=True)
        require(is_device_spec(self.device), "evaluate.metrics", "device", "'auto', 'cpu', 'cuda' or 'cuda:N'",
                self.device)

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> "EvalConfig":
        return dataclass_from_params(cls, params, "evaluate.metrics")


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
    num_tokens: int | None = None,
    teacher_model=None,
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
        num_tokens: `len(tokenizer)` when the model's head is padded beyond it (those rows are
            no tokens and get no probability mass), else None.
        teacher_model: the teacher, run again on the same batches, for
            `kl_teacher_student_full`: KL(teacher || student) over the **full** vocabulary, a
            metric that does not depend on what the artifact stores (top-k or sparser).

    Returns:
        Flat `{name: float}`.

    Raises:
        ValueError: no trained tokens; artifact rows that do not sit at the corpus's trained
            positions (`PositionMismatchError`); `overlap_k` larger than the artifact's K.
    """
    model.eval()
    decoder, head = decoder_and_head(model)
    transform = head_transform(model, num_tokens)
    device = next(model.parameters()).device
    full_teacher = None
    if teacher_model is not None:
        teacher_model.eval()
        teacher_decoder, teacher_head = decoder_and_head(teacher_model)
        full_teacher = (teacher_decoder, teacher_head, head_transform(teacher_model, num_tokens))
    if config.max_samples is not None:
        samples = samples.sort_by("sample_id").slice(0, config.max_samples)
    sample_ids: list[str] = samples["sample_id"].to_pylist()
    all_ids = [np.asarray(row, dtype=np.int64) for row in samples["input_ids"].to_pylist()]
    all_masks = [np.asarray(row, dtype=np.int8) for row in samples["loss_mask"].to_pylist()]
    # Longest first: little padding per batch, and the peak memory shows up at once.
    order = sorted(range(len(sample_ids)), key=lambda i: (-len(all_ids[i]), sample_ids[i]))

    num_bytes = _trained_bytes(samples, all_masks)
    sums, num_tokens, overlap_k = _Sums(), 0, None
    for start in range(0, len(order), config.batch_size):
        batch = order[start:start + config.batch_size]
        batch_ids = [sample_ids[i] for i in batch]
        padded = pad_right([all_ids[i] for i in batch], [all_masks[i] for i in batch], sample_ids=batch_ids)
        n = int(padded.positions_mask.sum())
        if n == 0:
            continue
        labels = padded.next_token_labels().to(device)  # [N], row-major (sample, position) order
        teacher_batch = None
        if teacher is not None:
            teacher_batch = _teacher_batch(teacher, batch_ids, [all_masks[i] for i in batch], config.split, device)
            if overlap_k is None:
                overlap_k = _overlap_k(config, teacher_batch[0].shape[1])
            sums.add("teacher_nll", -teacher_batch[2])
        hidden = _trained_hidden(decoder, padded, device)
        _add_chunk_sums(sums, head, transform, hidden, labels, teacher_batch, overlap_k, config.token_chunk_size,
                        None if full_teacher is None else
                        (full_teacher[1], full_teacher[2], _trained_hidden(full_teacher[0], padded, device)))
        num_tokens += n
        # Each batch has other shapes: without this glibc's heaps fragment batch by batch (the
        # default job's evaluate grew 1.7 -> 4.1 GiB over the 3 batches of two models).
        release_unused_memory("evaluate: batch", collect=False)

    if num_tokens == 0:
        raise ValueError(f"no trained tokens in the {config.split!r} samples ({len(sample_ids)} samples)")
    metrics = _metrics(sums, num_tokens, len(sample_ids), overlap_k if teacher is not None else None)
    if num_bytes:
        metrics.update(bits_per_byte(sums.values, num_bytes))
    return metrics


def _trained_bytes(samples: pa.Table, masks: list[np.ndarray]) -> int | None:
    """UTF-8 bytes covered by the trained tokens of `samples`; None without (complete) byte ends."""
    from kd_pipeline.core.cross_tokenizer.alignment import trained_byte_count

    if "byte_ends" not in samples.column_names:
        return None
    ends = samples["byte_ends"].to_pylist()
    if any(end is None for end in ends):
        return None
    return sum(trained_byte_count(np.asarray(end), mask) for end, mask in zip(ends, masks))


def bits_per_byte(nll_sums: Mapping[str, float], num_bytes: int) -> dict[str, float]:
    """`{student,teacher}_bits_per_byte` from summed NLLs (nats) over `num_bytes` text bytes."""
    out = {"num_bytes": float(num_bytes)}
    for who in ("student", "teacher"):
        if f"{who}_nll" in nll_sums:
            out[f"{who}_bits_per_byte"] = nll_sums[f"{who}_nll"] / (math.log(2) * num_bytes)
    return out


def evaluate_on_artifact(student_dir: str | os.PathLike, corpus, topk_dir: str | os.PathLike,
                         config: EvalConfig = EvalConfig(), *, teacher_dir: str | os.PathLike) -> dict[str, float]:
    """`evaluate_student` of the student folder on `config.split` of `corpus` (a `TokenizedCorpus`),
    against the artifact at `topk_dir`, after the artifact compatibility check training runs too
    (with the prepared teacher folder `teacher_dir`, whose config and weights hashes must be the
    artifact's: KL against another teacher's targets would be reported as this teacher's).

    Raises:
        ArtifactMismatchError: the artifact was made for another corpus, tokenizer, vocabulary or teacher.
    """
    from kd_pipeline.core.models.identity import model_identity, tokenizer_hash
    from kd_pipeline.core.models.loading import load_causal_lm, load_tokenizer
    from kd_pipeline.core.topk_store import TopKReader, check_artifact_compatibility

    reader = TopKReader(topk_dir, verify=config.topk_verify)
    teacher_identity = model_identity(teacher_dir)
    model = load_causal_lm(student_dir, device=resolve_device(config.device))
    tokenizer = load_tokenizer(student_dir)
    check_artifact_compatibility(reader.manifest, corpus_fingerprint=corpus.fingerprint,
                                 tokenizer_hash=tokenizer_hash(tokenizer),
                                 vocab_size=int(model.get_output_embeddings().weight.shape[0]),
                                 teacher_identity=teacher_identity, teacher_dir=teacher_dir)
    teacher_model = (load_causal_lm(teacher_dir, device=next(model.parameters()).device)
                     if config.full_vocab_kl else None)
    return evaluate_student(model, corpus.split(config.split), reader, config, num_tokens=len(tokenizer),
                            teacher_model=teacher_model)


def _trained_hidden(decoder, padded, device) -> torch.Tensor:
    """[N, H] last hidden states of a padded batch at its trained positions only."""
    hidden = decoder(input_ids=padded.input_ids.to(device), attention_mask=padded.attention_mask.to(device),
                     use_cache=False).last_hidden_state  # no KV cache: one pass, ~0.15 GiB less per model
    return hidden[padded.positions_mask.to(device)]


def _overlap_k(config: EvalConfig, artifact_k: int) -> int:
    overlap_k = config.overlap_k or artifact_k
    if overlap_k > artifact_k:
        raise ValueError(f"evaluate.metrics.overlap_k={overlap_k} exceeds the artifact's k={artifact_k}")
    return overlap_k


def _teacher_batch(teacher: TargetsProvider, sample_ids: list[str], loss_masks: list[np.ndarray], split: str,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(topk_ids [N, K] long, topk_logprobs [N, K] float32 on `device`, target_logprobs [N] float64)
    of a batch: samples in batch order, each's rows by increasing position = the row-major order
    of the positions mask, the order of the gathered hidden states."""
    rows = []
    for sample_id, record, loss_mask in zip(sample_ids, fetch_targets(teacher, sample_ids, split), loss_masks):
        target = sample_targets(record)
        if target.target_logprobs is None:
            raise ValueError(f"sample {sample_id}: the teacher top-k artifact record has no target_logprobs")
        check_rows(sample_id, loss_mask, target)
        rows.append(target)
    topk_ids = torch.from_numpy(np.concatenate([r.topk_ids.astype(np.int64) for r in rows])).to(device)
    topk_logprobs = torch.from_numpy(np.concatenate([r.topk_logprobs for r in rows])).to(device)
    target_logprobs = torch.from_numpy(np.concatenate([r.target_logprobs.astype(np.float64) for r in rows]))
    return topk_ids, topk_logprobs, target_logprobs


def _add_chunk_sums(sums: _Sums, head, transform: HeadTransform, hidden: torch.Tensor, labels: torch.Tensor,
                    teacher_batch, overlap_k: int | None, chunk_size: int, full_teacher=None) -> None:
    """The head on `chunk_size` trained rows at a time: student NLL, the teacher comparisons,
    and with `full_teacher = (head, transform, hidden)` the full-vocabulary KL."""
    n = hidden.shape[0]
    for lo in range(0, n, chunk_size):
        hi = min(lo + chunk_size, n)
        logits = transform.apply_(head(hidden[lo:hi]).float())  # [n, V]
        log_z = torch.logsumexp(logits, dim=-1)
        sums.add("student_nll", log_z - logits.gather(1, labels[lo:hi, None])[:, 0])
        if teacher_batch is not None:
            _teacher_sums(sums, logits, log_z, teacher_batch[0][lo:hi], teacher_batch[1][lo:hi], overlap_k)
        if full_teacher is not None:
            teacher_head, teacher_transform, teacher_hidden = full_teacher
            teacher_logits = teacher_transform.apply_(teacher_head(teacher_hidden[lo:hi]).float())
            if teacher_logits.shape != logits.shape:
                raise ValueError(f"full-vocabulary KL: teacher logits {tuple(teacher_logits.shape)} vs student "
                                 f"{tuple(logits.shape)}: the vocabularies differ")
            log_p = torch.log_softmax(teacher_logits, dim=-1)
            log_q = logits - log_z[:, None]
            # 0 * log(0 / q) = 0 for tokens the teacher gives no mass (padded rows: both -inf).
            sums.add("kl_teacher_student_full", torch.where(log_p > -math.inf, log_p.exp() * (log_p - log_q), 0.0)
                     .sum(-1))
            sums.add("top1_agreement_full", (logits.argmax(dim=-1) == teacher_logits.argmax(dim=-1)).float())


def _metrics(sums: _Sums, num_tokens: int, num_samples: int, overlap_k: int | None) -> dict[str, float]:
    """Global token means (and perplexities) from the sums; teacher metrics when `overlap_k` is set."""
    mean = {name: value / num_tokens for name, value in sums.values.items()}
    metrics = {
        "num_samples": float(num_samples),
        "num_tokens": float(num_tokens),
        "student_nll": mean["student_nll"],
        "student_ppl": math.exp(mean["student_nll"]),
    }
    for name in ("kl_teacher_student_full", "top1_agreement_full"):
        if name in mean:
            metrics[name] = mean[name]
    if overlap_k is not None:
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
    """Adds the per-token teacher comparisons of one chunk: logits [n, V], topk_* [n, K]
    (variable rows padded per `topk_store.codec.pad_rows`: their padding is no entry)."""
    padding = padding_slots(topk_ids, topk_logprobs)
    student_at_ids = logits.gather(1, topk_ids).masked_fill(padding, -math.inf)  # [n, K]
    log_q = student_at_ids - torch.logsumexp(student_at_ids, dim=-1, keepdim=True)  # renormalized over K
    log_p = topk_logprobs - torch.logsumexp(topk_logprobs, dim=-1, keepdim=True)
    sums.add("kl_teacher_student_topk", torch.where(padding, 0.0, log_p.exp() * (log_p - log_q)).sum(-1))
    sums.add("kl_student_teacher_topk", torch.where(padding, 0.0, log_q.exp() * (log_q - log_p)).sum(-1))
    sums.add("top1_agreement", (logits.argmax(dim=-1) == topk_ids[:, 0]).float())
    sums.add("topk_overlap", _topk_overlap(logits, topk_ids, padding, overlap_k))
    sums.add("teacher_topk_mass", topk_logprobs.double().exp().sum(-1))
    sums.add("student_mass_on_teacher_topk", (student_at_ids - log_z[:, None]).double().exp().sum(-1))


def _topk_overlap(logits: torch.Tensor, topk_ids: torch.Tensor, padding: torch.Tensor, overlap_k: int) -> torch.Tensor:
    """[n] float64 `|student top-m ∩ teacher top-m| / m` with `m = min(overlap_k, the row's
    entries)`: a variable row shorter than `overlap_k` is compared over its own length (its
    padding is no entry), a full row over `overlap_k`."""
    lengths = (~padding[:, :overlap_k]).sum(-1).clamp_min(1)  # [n]
    ranks = torch.arange(overlap_k, device=logits.device)
    in_row = ranks[None, :] < lengths[:, None]  # [n, overlap_k], the first m ranks of either side
    student_top = logits.topk(overlap_k, dim=-1).indices  # [n, overlap_k]
    hits = (student_top[:, :, None] == topk_ids[:, None, :overlap_k]) & in_row[:, None, :]
    shared = (hits.any(-1) & in_row).sum(-1)
    return shared.double() / lengths
