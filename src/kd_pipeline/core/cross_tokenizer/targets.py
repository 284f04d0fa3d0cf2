"""From one sample's two tokenizations and its stored teacher rows to the loss's group inputs.

The teacher side needs no teacher model: its token byte ends (kept by corpus prep, or recomputed
from the text with the teacher *tokenizer*), its loss mask and the artifact's rows (top-k and the
realized token's log-prob, `target_logprobs`). The student side is the same text encoded by the
student tokenizer.

Rows: the artifact has one row per trained teacher token (row `i` predicts the i-th token with
`loss_mask == 1`); the student loss has one row per trained student token in the same order
(the trainer's `kd_positions_mask` order). A group is distilled only when all its tokens are
trained on both sides (a group straddling a prompt/response boundary, or the untrained first
token, gets SFT only); the others are counted as skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from kd_pipeline.core.cross_tokenizer.alignment import align_by_byte_ends
from kd_pipeline.core.cross_tokenizer.groups import AlignedGroupBatch


@dataclass(frozen=True)
class SampleGroups:
    """Distilled groups of one sample.

    Attributes:
        student_row_start: (G,) int64 first student row (index among the trained student tokens).
        student_row_stop: (G,) int64 one past the last.
        teacher_row: (G,) int64 artifact row of the group's first teacher token.
        teacher_chain: (G,) float32 sum of the stored log-probs of the later teacher tokens.
        num_groups: all aligned groups of the sample (distilled + skipped).
    """

    student_row_start: np.ndarray
    student_row_stop: np.ndarray
    teacher_row: np.ndarray
    teacher_chain: np.ndarray
    num_groups: int

    @property
    def num_distilled(self) -> int:
        return int(self.teacher_row.shape[0])


def _row_index(loss_mask: np.ndarray) -> np.ndarray:
    """Row of each token among the trained ones (-1 for untrained tokens)."""
    mask = np.asarray(loss_mask).astype(bool)
    rows = np.cumsum(mask) - 1
    return np.where(mask, rows, -1)


def sample_groups(
    teacher_byte_ends: np.ndarray,
    teacher_loss_mask: np.ndarray,
    teacher_target_logprobs: np.ndarray,
    student_byte_ends: np.ndarray,
    student_loss_mask: np.ndarray,
    sample_id: str = "?",
) -> SampleGroups:
    """Aligns one sample and keeps the groups trained on both sides.

    Args:
        teacher_byte_ends: (T,) byte end of each teacher token.
        teacher_loss_mask: (T,) 0/1 teacher trained tokens (the artifact's rows).
        teacher_target_logprobs: (rows,) the artifact's realized-token log-probs.
        student_byte_ends: (S,) byte end of each student token.
        student_loss_mask: (S,) 0/1 student trained tokens.
        sample_id: for messages.

    Raises:
        ValueError: lengths disagree (names the sample and the arrays).
    """
    t_mask = np.asarray(teacher_loss_mask).astype(bool)
    s_mask = np.asarray(student_loss_mask).astype(bool)
    if len(t_mask) != len(teacher_byte_ends) or len(s_mask) != len(student_byte_ends):
        raise ValueError(
            f"sample {sample_id}: {len(teacher_byte_ends)} teacher byte ends for {len(t_mask)} "
            f"tokens, {len(student_byte_ends)} student byte ends for {len(s_mask)} tokens"
        )
    target = np.asarray(teacher_target_logprobs, dtype=np.float64)
    if len(target) != int(t_mask.sum()):
        raise ValueError(
            f"sample {sample_id}: {len(target)} teacher target_logprobs for {int(t_mask.sum())} "
            "trained teacher tokens"
        )
    groups = align_by_byte_ends(teacher_byte_ends, student_byte_ends)
    t_rows, s_rows = _row_index(t_mask), _row_index(s_mask)
    # Prefix sums give "all trained" and the chains in O(1) per group.
    t_trained = np.concatenate([[0], np.cumsum(t_mask)])
    s_trained = np.concatenate([[0], np.cumsum(s_mask)])
    target_cum = np.concatenate([[0.0], np.cumsum(target)])
    ts, te, ss, se = groups.teacher_start, groups.teacher_stop, groups.student_start, groups.student_stop
    keep = (t_trained[te] - t_trained[ts] == te - ts) & (s_trained[se] - s_trained[ss] == se - ss)
    ts, te, ss, se = ts[keep], te[keep], ss[keep], se[keep]
    first_row = t_rows[ts]
    last_row = t_rows[te - 1]
    chain = target_cum[last_row + 1] - target_cum[first_row + 1]
    return SampleGroups(
        student_row_start=s_rows[ss].astype(np.int64),
        student_row_stop=(s_rows[se - 1] + 1).astype(np.int64),
        teacher_row=first_row.astype(np.int64),
        teacher_chain=chain.astype(np.float32),
        num_groups=groups.num_groups,
    )


def collate_groups(
    samples: Sequence[SampleGroups],
    student_rows: Sequence[int],
    topk_ids: Sequence[np.ndarray],
    topk_logprobs: Sequence[np.ndarray],
    group_weights: torch.Tensor | None = None,
) -> AlignedGroupBatch:
    """Concatenates the samples' groups in batch order into one `AlignedGroupBatch`.

    Args:
        samples: per sample `SampleGroups`.
        student_rows: per sample number of trained student rows (row offsets of the batch).
        topk_ids: per sample the artifact's (rows, K) teacher ids.
        topk_logprobs: per sample the artifact's (rows, K) log-probs.
        group_weights: (G,) reduction weights; None gives 1 per group.
    """
    offsets = np.concatenate([[0], np.cumsum(student_rows)[:-1]]).astype(np.int64)
    start = np.concatenate([s.student_row_start + o for s, o in zip(samples, offsets)] or [np.zeros(0, np.int64)])
    stop = np.concatenate([s.student_row_stop + o for s, o in zip(samples, offsets)] or [np.zeros(0, np.int64)])
    k = topk_ids[0].shape[1] if len(topk_ids) else 1
    ids = np.concatenate([np.asarray(t)[s.teacher_row] for s, t in zip(samples, topk_ids)] or [np.zeros((0, k), np.int64)])
    logprobs = np.concatenate(
        [np.asarray(t, dtype=np.float32)[s.teacher_row] for s, t in zip(samples, topk_logprobs)]
        or [np.zeros((0, k), np.float32)]
    )
    chain = np.concatenate([s.teacher_chain for s in samples] or [np.zeros(0, np.float32)])
    weights = group_weights if group_weights is not None else torch.ones(len(start))
    return AlignedGroupBatch(
        row_start=torch.as_tensor(start, dtype=torch.int64),
        row_stop=torch.as_tensor(stop, dtype=torch.int64),
        topk_ids=torch.as_tensor(ids, dtype=torch.int64),
        topk_logprobs=torch.as_tensor(logprobs),
        teacher_chain=torch.as_tensor(chain),
        weights=weights,
    )

