"""Training samples for a student with its own tokenizer, from the teacher's corpus and artifact.

Corpus prep tokenized each sample with the teacher and kept its `text` and the teacher tokens'
`byte_ends`. Here the student tokenizer encodes the same text; a student token is trained iff
all its bytes are bytes of trained teacher tokens (so both sides learn the same text, which also
makes bits per byte comparable), and tokens past the teacher's last byte (a truncated sample)
are dropped. A trained zero-width teacher EOS gives the student its own EOS, trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from kd_pipeline.core.cross_tokenizer.alignment import encode_with_byte_ends
from kd_pipeline.core.cross_tokenizer.groups import AlignedGroupBatch
from kd_pipeline.core.cross_tokenizer.targets import SampleGroups, sample_groups
from kd_pipeline.core.cross_tokenizer.token_bytes import TokenBytes, backend_of, token_bytes


@dataclass(frozen=True)
class StudentSample:
    """The student's tokens of one sample: ids, byte ends and loss mask, all (S,)."""

    input_ids: np.ndarray
    byte_ends: np.ndarray
    loss_mask: np.ndarray


def trained_byte_mask(byte_ends: np.ndarray, loss_mask: np.ndarray, num_bytes: int) -> np.ndarray:
    """(num_bytes,) bool: the byte belongs to a trained token (token t covers ends[t-1]:ends[t])."""
    ends = np.asarray(byte_ends, dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    delta = np.zeros(num_bytes + 1, dtype=np.int64)
    trained = np.asarray(loss_mask).astype(bool) & (ends > starts)
    np.add.at(delta, starts[trained], 1)
    np.add.at(delta, ends[trained], -1)
    return np.cumsum(delta)[:num_bytes] > 0


def student_sample(
    tokenizer: Any,
    text: str,
    teacher_byte_ends: np.ndarray,
    teacher_loss_mask: np.ndarray,
    eos_id: int | None = None,
    pieces: TokenBytes | None = None,
) -> StudentSample:
    """Encodes `text` with the student tokenizer and derives its loss mask (module docstring).

    Args:
        tokenizer: the student's fast tokenizer.
        text: the sample's text, as corpus prep kept it.
        teacher_byte_ends: (T,) the teacher tokens' byte ends.
        teacher_loss_mask: (T,) the teacher's loss mask.
        eos_id: the student's EOS id, appended when the teacher's last token is a trained
            zero-width one (its EOS); None never appends.
        pieces: the student's `TokenBytes` (pass it when encoding many samples).
    """
    pieces = pieces if pieces is not None else token_bytes(tokenizer)
    ids, ends = encode_with_byte_ends(backend_of(tokenizer), text, pieces=pieces)
    t_ends = np.asarray(teacher_byte_ends, dtype=np.int64)
    t_mask = np.asarray(teacher_loss_mask).astype(bool)
    covered = int(t_ends[-1]) if len(t_ends) else 0
    keep = ends <= covered  # ends are non-decreasing: a prefix
    ids, ends = ids[keep], ends[keep]
    trained_bytes = trained_byte_mask(t_ends, t_mask, covered)
    starts = np.concatenate([[0], ends[:-1]])
    inside = np.concatenate([[0], np.cumsum(trained_bytes)])
    mask = (ends > starts) & (inside[ends] - inside[starts] == ends - starts)
    if len(mask):
        mask[0] = False  # token 0 has no prediction
    teacher_eos = len(t_ends) > 1 and t_mask[-1] and t_ends[-1] == t_ends[-2]
    if eos_id is not None and teacher_eos:
        ids = np.append(ids, eos_id)
        ends = np.append(ends, covered)
        mask = np.append(mask, True)
    return StudentSample(ids.astype(np.int64), ends.astype(np.int64), mask.astype(np.int8))


@dataclass(frozen=True)
class CrossTokenizerItem:
    """One training sample: the student's tokens and the groups' teacher rows."""

    sample_index: int
    sample_id: str
    student: StudentSample
    groups: SampleGroups
    topk_ids: np.ndarray  # (G, K) the teacher rows of the groups' first teacher tokens
    topk_logprobs: np.ndarray  # (G, K)


def make_item(
    sample_index: int,
    sample_id: str,
    student: StudentSample,
    teacher_byte_ends: np.ndarray,
    teacher_loss_mask: np.ndarray,
    topk_ids: np.ndarray,
    topk_logprobs: np.ndarray,
    target_logprobs: np.ndarray,
) -> CrossTokenizerItem:
    """Aligns the sample and keeps the teacher rows its groups use."""
    groups = sample_groups(
        teacher_byte_ends, teacher_loss_mask, target_logprobs, student.byte_ends, student.loss_mask, sample_id
    )
    return CrossTokenizerItem(
        sample_index, sample_id, student, groups,
        np.asarray(topk_ids, dtype=np.int64)[groups.teacher_row],
        np.asarray(topk_logprobs, dtype=np.float32)[groups.teacher_row],
    )


def collate_group_tensors(items: Sequence[CrossTokenizerItem]) -> dict[str, torch.Tensor]:
    """The `AlignedGroupBatch` fields of a batch (prefix `ct_`), rows in the batch's row-major
    order of trained student tokens (the order of `kd_positions_mask.nonzero()`)."""
    rows = [int(item.student.loss_mask.sum()) for item in items]
    offsets = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
    k = max((item.topk_ids.shape[1] for item in items if item.topk_ids.ndim == 2), default=1)

    def cat(arrays, dtype, shape=(0,)):
        arrays = [np.asarray(a, dtype=dtype) for a in arrays]
        return torch.from_numpy(np.concatenate(arrays) if arrays else np.zeros(shape, dtype=dtype))

    return {
        "ct_row_start": cat([i.groups.student_row_start + o for i, o in zip(items, offsets)], np.int64),
        "ct_row_stop": cat([i.groups.student_row_stop + o for i, o in zip(items, offsets)], np.int64),
        "ct_topk_ids": cat([i.topk_ids.reshape(-1, k) for i in items], np.int64, (0, k)),
        "ct_topk_logprobs": cat([i.topk_logprobs.reshape(-1, k) for i in items], np.float32, (0, k)),
        "ct_teacher_chain": cat([i.groups.teacher_chain for i in items], np.float32),
    }


def group_batch(inputs: dict, token_weights: torch.Tensor) -> AlignedGroupBatch:
    """`AlignedGroupBatch` of a collated batch; a group weighs what its first row weighs."""
    start = inputs["ct_row_start"]
    return AlignedGroupBatch(
        row_start=start,
        row_stop=inputs["ct_row_stop"],
        topk_ids=inputs["ct_topk_ids"],
        topk_logprobs=inputs["ct_topk_logprobs"],
        teacher_chain=inputs["ct_teacher_chain"],
        weights=token_weights[start] if start.numel() else token_weights[:0],
    )


class CrossTokenizerDataset(torch.utils.data.Dataset):
    """Samples of one corpus split re-tokenized by the student, with their aligned teacher rows.

    Args:
        samples: corpus rows with `text` and `byte_ends` (corpus prep keeps them).
        targets: the artifact reader (with `target_logprobs`), or None for SFT only.
        tokenizer: the student's fast tokenizer (its EOS is appended after a trained teacher EOS).
        k: use the first `k` top-k columns (None: all).
        split: the split name, for messages.

    Raises:
        ValueError: the corpus has no text / byte ends (made before they were kept: re-run
            corpus_prep), naming the split and the first such sample.
    """

    def __init__(self, samples, targets, tokenizer, k: int | None = None, split: str = "train"):
        from kd_pipeline.core.batching import flat_list_column

        if samples.num_rows == 0:
            raise ValueError(f"the corpus has no {split!r} samples")
        names = set(samples.column_names)
        texts = samples["text"].to_pylist() if "text" in names else [None] * samples.num_rows
        ends = samples["byte_ends"].to_pylist() if "byte_ends" in names else [None] * samples.num_rows
        self.sample_ids: list[str] = samples["sample_id"].to_pylist()
        missing = [sid for sid, text, end in zip(self.sample_ids, texts, ends) if text is None or end is None]
        if missing:
            raise ValueError(
                f"{split} sample {missing[0]} has no 'text'/'byte_ends' in the corpus ({len(missing)} samples): "
                "cross-tokenizer distillation needs them; re-run `kedro run --pipelines corpus_prep`"
            )
        self.split, self.targets, self.k, self.tokenizer = split, targets, k, tokenizer
        self.texts = texts
        self.byte_ends = [np.asarray(end, dtype=np.int64) for end in ends]
        self._mask = flat_list_column(samples["loss_mask"], np.int8)
        self.pieces = token_bytes(tokenizer)
        self.eos_id = getattr(tokenizer, "eos_token_id", None)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        from kd_pipeline.core.batching import check_rows, fetch_targets, sample_targets

        indices = [int(index) for index in indices]
        sample_ids = [self.sample_ids[index] for index in indices]
        fetched = (fetch_targets(self.targets, sample_ids, self.split) if self.targets is not None
                   else [None] * len(indices))
        items = []
        values, offsets = self._mask
        for index, sample_id, record in zip(indices, sample_ids, fetched):
            teacher_mask = values[offsets[index]:offsets[index + 1]]
            student = student_sample(self.tokenizer, self.texts[index], self.byte_ends[index], teacher_mask,
                                     self.eos_id, self.pieces)
            item = {"sample_index": index, "sample_id": sample_id, "input_ids": student.input_ids,
                    "loss_mask": student.loss_mask}
            if record is not None:
                target = sample_targets(record, self.k)
                check_rows(sample_id, teacher_mask, target)
                if target.target_logprobs is None:
                    raise ValueError(f"sample {sample_id}: the artifact rows have no target_logprobs "
                                     "(the span chains need them)")
                item["teacher_nll_sum"] = -float(np.asarray(target.target_logprobs, dtype=np.float64).sum())
                item["ct"] = make_item(index, sample_id, student, self.byte_ends[index], teacher_mask,
                                       target.topk_ids, target.topk_logprobs, target.target_logprobs)
            items.append(item)
        return items

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]


@dataclass(frozen=True)
class CrossTokenizerCollator:
    """`DistillCollator`'s batch of the student's tokens, plus the groups' `ct_*` tensors."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, items: list[dict]) -> dict:
        from kd_pipeline.core.training.data import DistillCollator

        plain = [{key: value for key, value in item.items() if key != "ct"} for item in items]
        batch = DistillCollator(self.pad_token_id, self.pad_to_multiple_of)(plain)
        with_groups = ["ct" in item for item in items]
        if any(with_groups):
            if not all(with_groups):
                raise ValueError("CrossTokenizerCollator: some items of the batch have teacher rows and some do not")
            batch.update(collate_group_tensors([item["ct"] for item in items]))
        return batch
