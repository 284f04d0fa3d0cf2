"""The teacher's batch plan and its padded batches.

The plan depends only on the corpus and the config (sort by `(length, sample_id)`, greedy packing
under a padded-token budget), and each rank takes every `world_size`-th batch of it, so a sample
is always computed inside the very same batch whatever the number of processes or restarts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from kd_pipeline.core.batching import flat_list_column, pad_right, trained_positions

if TYPE_CHECKING:
    from kd_pipeline.core.extraction.config import ExtractionConfig


@dataclass(frozen=True)
class PlannedBatch:
    """One teacher batch: corpus row indices (in order) and the padded length."""

    index: int
    rows: tuple[int, ...]
    padded_length: int


def plan_batches(lengths: Sequence[int], sample_ids: Sequence[str], batch_tokens: int,
                 max_batch_size: int) -> list[PlannedBatch]:
    """Sort samples by `(length, sample_id)` and pack them greedily into batches whose padded
    size (`len(batch) * longest`) stays within `batch_tokens` (a longer sample runs alone)."""
    order = sorted(range(len(lengths)), key=lambda row: (int(lengths[row]), sample_ids[row]))
    batches: list[PlannedBatch] = []
    current: list[int] = []
    for row in order:
        longest = int(lengths[row])  # ascending order: the new sample is the longest
        if current and ((len(current) + 1) * longest > batch_tokens or len(current) >= max_batch_size):
            batches.append(PlannedBatch(len(batches), tuple(current), int(lengths[current[-1]])))
            current = []
        current.append(row)
    if current:
        batches.append(PlannedBatch(len(batches), tuple(current), int(lengths[current[-1]])))
    return batches


def rank_share(batches: Sequence[PlannedBatch], rank: int, world_size: int) -> list[PlannedBatch]:
    """The batches rank `rank` runs: every `world_size`-th batch of the plan, starting at `rank`
    (length-sorted order makes this round robin roughly token-balanced)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return list(batches[rank::world_size])


@dataclass
class BatchInputs:
    """A padded batch and where its trained positions are."""

    input_ids: torch.Tensor  # [B, L] long, right-padded
    flat_positions: torch.Tensor  # [N] long: b * L + p for each trained position, sample-major
    labels: torch.Tensor  # [N] long: input_ids[b, p + 1]
    positions: list[np.ndarray]  # per sample: trained positions p (int32), ascending
    tokens: int  # real (unpadded) tokens in the batch
    sample_ids: list[str] | None = None  # the samples' ids (the `sampled` capture's row identity)


def make_batch(input_ids: Sequence[np.ndarray], loss_masks: Sequence[np.ndarray], pad_id: int = 0,
               sample_ids: Sequence[str] | None = None) -> BatchInputs:
    """Right-pad samples and locate their trained positions (`loss_mask[p + 1] == 1`)."""
    padded = pad_right(input_ids, loss_masks, pad_id, sample_ids=sample_ids)
    flat_positions = padded.flat_positions()
    labels = padded.input_ids.view(-1)[flat_positions + 1]
    positions = [trained_positions(mask).astype(np.int32) for mask in loss_masks]
    return BatchInputs(padded.input_ids, flat_positions, labels, positions, int(sum(len(ids) for ids in input_ids)),
                       None if sample_ids is None else list(sample_ids))


@dataclass
class CorpusArrays:
    """Samples as flat arrays (Arrow list offsets + values): cheap per-sample numpy views."""

    sample_ids: list[str]
    lengths: np.ndarray
    id_offsets: np.ndarray
    id_values: np.ndarray
    mask_offsets: np.ndarray
    mask_values: np.ndarray

    @classmethod
    def from_table(cls, table) -> "CorpusArrays":
        id_values, id_offsets = flat_list_column(table["input_ids"], np.int32)
        mask_values, mask_offsets = flat_list_column(table["loss_mask"], np.int8)
        return cls(table["sample_id"].to_pylist(), table["length"].to_numpy(), id_offsets, id_values,
                   mask_offsets, mask_values)

    @classmethod
    def from_lists(cls, sample_ids: Sequence[str], input_ids: Sequence[Sequence[int]],
                   loss_masks: Sequence[Sequence[int]]) -> "CorpusArrays":
        import pyarrow as pa

        table = pa.table({"sample_id": list(sample_ids),
                          "input_ids": pa.array([list(map(int, x)) for x in input_ids], pa.list_(pa.int32())),
                          "loss_mask": pa.array([list(map(int, x)) for x in loss_masks], pa.list_(pa.int8())),
                          "length": pa.array([len(x) for x in input_ids], pa.int32())})
        return cls.from_table(table)

    def input_ids(self, row: int) -> np.ndarray:
        return self.id_values[self.id_offsets[row]:self.id_offsets[row + 1]]

    def loss_mask(self, row: int) -> np.ndarray:
        return self.mask_values[self.mask_offsets[row]:self.mask_offsets[row + 1]]

    def plan(self, config: "ExtractionConfig") -> list[PlannedBatch]:
        return plan_batches(self.lengths, self.sample_ids, config.batch_tokens, config.max_batch_size)

    def batch(self, planned: PlannedBatch) -> BatchInputs:
        return make_batch([self.input_ids(row) for row in planned.rows], [self.loss_mask(row) for row in planned.rows],
                          sample_ids=[self.sample_ids[row] for row in planned.rows])
