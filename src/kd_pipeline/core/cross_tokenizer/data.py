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
from kd_pipeline.core.cross_tokenizer.loss import AlignedGroupBatch
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
