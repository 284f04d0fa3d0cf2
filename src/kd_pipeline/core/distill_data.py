"""Training data for distillation: corpus samples joined with their teacher top-k rows by
`sample_id`, and a collator that puts every top-k row at exactly the position it belongs to.

Alignment (docs/architecture.md): the output at position `p` predicts token `p + 1`, so a
sample's trained *positions* are `[t - 1 for t where loss_mask[t] == 1]` and the artifact holds
one top-k row per trained position, in increasing position order. The collator pads right and
returns, for a batch of B samples padded to T tokens:

- `input_ids [B, T]` long, `attention_mask [B, T]` long;
- `labels [B, T]` long: `input_ids` where `loss_mask` is 1, else -100 (HF convention, so that
  the Trainer's `num_items_in_batch` counts trained tokens);
- `kd_positions_mask [B, T]` bool: position `p` is on iff `loss_mask[p + 1] == 1`;
- `kd_topk_ids [N, K]` long and `kd_topk_logprobs [N, K]` float32, N = trained tokens of the
  batch, in the row-major order of `kd_positions_mask.nonzero()`: row `i` at `(b, p)` describes
  the token `labels[b, p + 1]` (absent when the dataset has no targets: the SFT-only baseline);
- `sample_index [B]` long and `sample_ids` (list of B str), for error messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np
import torch

if TYPE_CHECKING:  # pyarrow is only needed to read a corpus table, not to collate
    import pyarrow as pa

IGNORE_INDEX = -100


class TargetsProvider(Protocol):
    """What the dataset needs from a top-k artifact reader (`core.topk_store.TopKReader`)."""

    def get_many(self, sample_ids: Sequence[str]) -> Any:
        """Decoded targets of each sample, in the order asked (a list, or a dict by sample id)."""


class MissingTargetsError(KeyError):
    """A training sample has no rows in the top-k artifact."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence.
        return str(self.args[0])


class PositionMismatchError(ValueError):
    """The artifact's positions of a sample differ from those derived from the corpus mask."""


@dataclass(frozen=True)
class SampleTargets:
    """One sample's teacher rows: `positions [n]`, `topk_ids [n, K]`, `topk_logprobs [n, K]`."""

    positions: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray


def trained_positions(loss_mask: np.ndarray) -> np.ndarray:
    """Positions whose output predicts a trained token: `t - 1` for each `t` with `loss_mask[t]`."""
    return np.flatnonzero(np.asarray(loss_mask)) - 1


def _field(record: Any, name: str) -> Any:
    if isinstance(record, dict):
        return record[name]
    return getattr(record, name)


def _as_sample_targets(record: Any, k: int | None) -> SampleTargets:
    """Normalize one decoded artifact record (attribute or mapping access) to `SampleTargets`."""
    topk_ids = np.asarray(_field(record, "topk_ids"))
    topk_logprobs = np.asarray(_field(record, "topk_logprobs"), dtype=np.float32)
    if k is not None:
        # Rows are sorted by descending log-prob, so the first k columns are the top-k.
        topk_ids, topk_logprobs = topk_ids[:, :k], topk_logprobs[:, :k]
    return SampleTargets(np.asarray(_field(record, "positions"), dtype=np.int64), topk_ids, topk_logprobs)


class DistillDataset(torch.utils.data.Dataset):
    """Samples of one corpus split, each with its teacher top-k rows (when `targets` is given).

    Items are fetched in batches through `__getitems__` (one `targets.get_many` call per batch,
    which the DataLoader uses when present); `__getitem__` fetches one.

    Args:
        samples: corpus rows (`TokenizedCorpus.split(...)`): sample_id, input_ids, loss_mask.
        targets: the artifact reader, or None for the SFT-only baseline (no KD targets).
        k: use the first `k` top-k columns (None: all the artifact has).
        split: the split name, for messages.
    """

    def __init__(self, samples: "pa.Table", targets: TargetsProvider | None = None, k: int | None = None,
                 split: str = "train"):
        if samples.num_rows == 0:
            raise ValueError(f"the corpus has no {split!r} samples")
        self.split = split
        self.targets = targets
        self.k = k
        self.sample_ids: list[str] = samples["sample_id"].to_pylist()
        self._ids = _flat_list_column(samples["input_ids"], np.int64)
        self._mask = _flat_list_column(samples["loss_mask"], np.int8)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def _tokens(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        (ids_values, ids_offsets), (mask_values, mask_offsets) = self._ids, self._mask
        start, stop = ids_offsets[index], ids_offsets[index + 1]
        return ids_values[start:stop], mask_values[mask_offsets[index]:mask_offsets[index + 1]]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        indices = [int(index) for index in indices]
        sample_ids = [self.sample_ids[index] for index in indices]
        fetched = self._fetch_targets(sample_ids) if self.targets is not None else [None] * len(indices)
        items = []
        for index, sample_id, record in zip(indices, sample_ids, fetched):
            input_ids, loss_mask = self._tokens(index)
            item = {"sample_index": index, "sample_id": sample_id, "input_ids": input_ids, "loss_mask": loss_mask}
            if record is not None:
                target = _as_sample_targets(record, self.k)
                check_positions(sample_id, loss_mask, target)
                item["topk_ids"], item["topk_logprobs"] = target.topk_ids, target.topk_logprobs
            items.append(item)
        return items

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def _fetch_targets(self, sample_ids: list[str]) -> list[Any]:
        try:
            fetched = self.targets.get_many(sample_ids)
        except KeyError as error:
            missing = [sample_id for sample_id in sample_ids if sample_id in str(error)] or sample_ids
            raise MissingTargetsError(
                f"{self.split} sample {missing[0]} has no rows in the teacher top-k artifact "
                f"(regenerate it for this corpus: kedro run --pipelines teacher_logits): {error}"
            ) from error
        if isinstance(fetched, dict):
            missing = [sample_id for sample_id in sample_ids if sample_id not in fetched]
            if missing:
                raise MissingTargetsError(
                    f"{self.split} sample {missing[0]} has no rows in the teacher top-k artifact "
                    f"({len(missing)} of {len(sample_ids)} in this batch missing)"
                )
            return [fetched[sample_id] for sample_id in sample_ids]
        fetched = list(fetched)
        if len(fetched) != len(sample_ids) or any(record is None for record in fetched):
            missing = [sample_id for sample_id, record in zip(sample_ids, fetched) if record is None]
            raise MissingTargetsError(
                f"{self.split} sample {(missing or sample_ids)[0]} has no rows in the teacher top-k artifact"
            )
        return fetched


def _flat_list_column(column: "pa.ChunkedArray", dtype) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list column: row `i` is `values[offsets[i]:offsets[i + 1]]`."""
    array = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    offsets = np.asarray(array.offsets, dtype=np.int64)
    values = np.asarray(array.values, dtype=dtype)
    # A sliced list array keeps its parent's values; offsets index into them as they are.
    return values, offsets


def check_positions(sample_id: str, loss_mask: np.ndarray, target: SampleTargets) -> None:
    """The artifact's rows must sit exactly at the positions the corpus mask trains."""
    expected = trained_positions(loss_mask)
    stored = target.positions
    if stored.shape != expected.shape or not np.array_equal(stored, expected):
        detail = (f"{len(stored)} stored rows, {len(expected)} trained positions" if stored.shape != expected.shape
                  else f"first difference at row {int(np.flatnonzero(stored != expected)[0])}")
        raise PositionMismatchError(
            f"sample {sample_id}: the teacher top-k artifact's positions do not match the corpus loss_mask "
            f"({detail}); the artifact was made from a different corpus"
        )
    if target.topk_ids.shape[0] != len(expected) or target.topk_logprobs.shape != target.topk_ids.shape:
        raise PositionMismatchError(
            f"sample {sample_id}: topk_ids {target.topk_ids.shape} / topk_logprobs {target.topk_logprobs.shape} "
            f"do not have one row per trained position ({len(expected)})"
        )


@dataclass(frozen=True)
class DistillCollator:
    """Pads a list of `DistillDataset` items (right padding) into the batch described above.

    Args:
        pad_token_id: id written at padded positions (masked out by `attention_mask`).
        pad_to_multiple_of: round T up to a multiple of this (None: the longest sample).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, items: list[dict]) -> dict:
        if not items:
            raise ValueError("DistillCollator got an empty batch")
        lengths = [len(item["input_ids"]) for item in items]
        T = max(lengths)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        B = len(items)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        kd_positions_mask = torch.zeros((B, T), dtype=torch.bool)
        for b, (item, length) in enumerate(zip(items, lengths)):
            ids = torch.from_numpy(np.asarray(item["input_ids"], dtype=np.int64))
            mask = torch.from_numpy(np.asarray(item["loss_mask"], dtype=np.int64)).bool()
            if bool(mask[0]):
                raise ValueError(f"sample {item['sample_id']}: loss_mask[0] is 1, but token 0 has no prediction")
            input_ids[b, :length] = ids
            attention_mask[b, :length] = 1
            labels[b, :length] = torch.where(mask, ids, torch.full_like(ids, IGNORE_INDEX))
            kd_positions_mask[b, : length - 1] = mask[1:]  # position p predicts token p + 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "kd_positions_mask": kd_positions_mask,
            "sample_index": torch.tensor([int(item["sample_index"]) for item in items], dtype=torch.long),
            "sample_ids": [item["sample_id"] for item in items],
        }
        with_targets = ["topk_ids" in item for item in items]
        if any(with_targets):
            if not all(with_targets):
                raise ValueError("DistillCollator: some items of the batch have top-k targets and some do not")
            # Items in batch order, each's rows in increasing position order = row-major order of
            # kd_positions_mask.nonzero(), which is how the trainer gathers hidden states.
            batch["kd_topk_ids"] = torch.from_numpy(
                np.concatenate([np.asarray(item["topk_ids"], dtype=np.int64) for item in items]))
            batch["kd_topk_logprobs"] = torch.from_numpy(
                np.concatenate([np.asarray(item["topk_logprobs"], dtype=np.float32) for item in items]))
            if batch["kd_topk_ids"].shape[0] != int(kd_positions_mask.sum()):
                raise ValueError(
                    f"batch {batch['sample_ids']}: {batch['kd_topk_ids'].shape[0]} top-k rows for "
                    f"{int(kd_positions_mask.sum())} trained positions"
                )
        return batch


def flat_labels(batch: dict) -> torch.Tensor:
    """`labels[b, p + 1]` for each trained position `(b, p)`, in row-major order: `[N]` long."""
    mask = batch["kd_positions_mask"]
    return batch["labels"][:, 1:][mask[:, :-1]]
