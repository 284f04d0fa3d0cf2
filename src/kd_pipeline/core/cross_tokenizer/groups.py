"""The per-group inputs of the cross-tokenizer loss (`loss.py`) and their row structure.

A micro-batch has N student rows (its trained student tokens, row-major) and G aligned groups
(`alignment.py`), each a contiguous, non-overlapping run of rows with the teacher row of its first
teacher token and the chain of its later teacher tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kd_pipeline.core.losses.config import IGNORE_INDEX


@dataclass(frozen=True)
class AlignedGroupBatch:
    """The per-group inputs of a micro-batch (student rows are the loss's N rows).

    Attributes:
        row_start: (G,) int64 first student row of each group; increasing.
        row_stop: (G,) int64 one past its last row; groups do not overlap.
        topk_ids: (G, K) int64 teacher ids of the group's first teacher token's top-k row.
        topk_logprobs: (G, K) float, their full-vocabulary log-probs.
        teacher_chain: (G,) float, sum of the realized log-probs of the later teacher tokens.
        weights: (G,) float KD/ULD reduction weights.
    """

    row_start: torch.Tensor
    row_stop: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    teacher_chain: torch.Tensor
    weights: torch.Tensor

    @property
    def num_groups(self) -> int:
        return int(self.row_start.shape[0])


def check_group_batch(groups: AlignedGroupBatch, labels: torch.Tensor, num_rows: int, teacher_vocab: int) -> None:
    """Checks shapes and the row structure of `groups` against the N student rows.

    Raises:
        ValueError: naming the field (and group) at fault.
    """
    g = groups.num_groups
    for name in ("row_start", "row_stop", "teacher_chain", "weights"):
        value = getattr(groups, name)
        if tuple(value.shape) != (g,):
            raise ValueError(f"groups.{name} must have shape ({g},), got {tuple(value.shape)}")
    if groups.topk_ids.dim() != 2 or groups.topk_ids.shape[0] != g or groups.topk_ids.shape[1] < 1:
        raise ValueError(f"groups.topk_ids must be ({g}, K) with K >= 1, got {tuple(groups.topk_ids.shape)}")
    if groups.topk_ids.dtype != torch.int64:
        raise ValueError(f"groups.topk_ids must be int64, got {groups.topk_ids.dtype}")
    if tuple(groups.topk_logprobs.shape) != tuple(groups.topk_ids.shape):
        raise ValueError(
            f"groups.topk_logprobs shape {tuple(groups.topk_logprobs.shape)} != topk_ids shape "
            f"{tuple(groups.topk_ids.shape)}"
        )
    if g == 0:
        return
    if groups.topk_ids.min() < 0 or groups.topk_ids.max() >= teacher_vocab:
        raise ValueError(f"groups.topk_ids outside the teacher vocabulary [0, {teacher_vocab})")
    start, stop = groups.row_start, groups.row_stop
    bad = (stop <= start) | (start < 0) | (stop > num_rows)
    if g > 1:
        bad[1:] |= start[1:] < stop[:-1]
    if bad.any():
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"group {first}: rows [{int(start[first])}, {int(stop[first])}) are empty, out of "
            f"[0, {num_rows}) or overlap the previous group"
        )
    later = later_row_mask(start, stop, num_rows)
    if (later & (labels == IGNORE_INDEX)).any():
        row = int((later & (labels == IGNORE_INDEX)).nonzero()[0, 0])
        raise ValueError(f"row {row}: a later row of a multi-token group has no label (its chain is undefined)")


def later_row_mask(start: torch.Tensor, stop: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(N,) bool: rows inside a group other than its first."""
    inside = torch.zeros(num_rows + 1, dtype=torch.int64, device=start.device)
    inside.index_add_(0, start + 1, torch.ones_like(start))
    inside.index_add_(0, stop, -torch.ones_like(stop))
    mask = inside.cumsum(0)[:num_rows] > 0
    # A one-row group adds +1 at start+1 == stop and -1 at stop: no later rows.
    return mask


def chunk_bounds(start: torch.Tensor, stop: torch.Tensor, num_rows: int, chunk_size: int) -> list[tuple[int, int]]:
    """Row chunks of about `chunk_size` rows whose boundaries never fall inside a group."""
    blocked = later_row_mask(start, stop, num_rows).tolist()  # row r may not start a chunk
    bounds, first = [], 0
    while first < num_rows:
        end = min(first + chunk_size, num_rows)
        while end < num_rows and blocked[end]:
            end += 1
        bounds.append((first, end))
        first = end
    return bounds
