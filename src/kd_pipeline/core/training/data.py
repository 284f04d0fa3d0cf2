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
- `kd_teacher_logz [N]` float32, the rows' teacher log-normalizer at the loss's temperature
  (the artifact's `logz` column `logz_column`; only when the dataset was given one);
- with a `top_p` / `sampled` artifact, K is the batch's longest row: shorter rows are padded
  (a repeated id with log-prob -inf, which the loss ignores, `core.losses.config`); with a
  `sampled` one also `kd_topk_weights [N, K]` float32, the estimator's weights (0 at padding);
- `sample_index [B]` long and `sample_ids` (list of B str), for error messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from kd_pipeline.core.batching import (
    IGNORE_INDEX,
    TargetsProvider,
    check_rows,
    fetch_targets,
    flat_list_column,
    pad_right,
    sample_targets,
)
from kd_pipeline.core.losses.sampled import SampledWeights

if TYPE_CHECKING:  # pyarrow is only needed to read a corpus table, not to collate
    import pyarrow as pa


class DistillDataset(torch.utils.data.Dataset):
    """Samples of one corpus split, each with its teacher top-k rows (when `targets` is given).

    Items are fetched in batches through `__getitems__` (one `targets.get_many` call per batch,
    which the DataLoader uses when present); `__getitem__` fetches one.

    Args:
        samples: corpus rows (`TokenizedCorpus.split(...)`): sample_id, input_ids, loss_mask.
        targets: the artifact reader, or None for the SFT-only baseline (no KD targets).
        k: use the first `k` top-k columns (None: all the artifact has).
        split: the split name, for messages.
        logz_column: the artifact's `logz` column the loss needs (its temperature,
            `Manifest.source.logz_column`), or None.
        logz_optional: a record without log-normalizers is taken without them (the loss then
            assumes `log Z = 0`, exact at the capture temperature itself) instead of refused.
        sampled: a `sampled` artifact's `losses.SampledWeights` (the items then carry the
            estimator weights), or None.
    """

    def __init__(self, samples: "pa.Table", targets: TargetsProvider | None = None, k: int | None = None,
                 split: str = "train", logz_column: int | None = None, logz_optional: bool = False,
                 sampled: SampledWeights | None = None):
        if samples.num_rows == 0:
            raise ValueError(f"the corpus has no {split!r} samples")
        self.split = split
        self.targets = targets
        self.k = k
        self.logz_column = logz_column
        self.logz_optional = logz_optional
        self.sampled = sampled
        self.sample_ids: list[str] = samples["sample_id"].to_pylist()
        self._ids = flat_list_column(samples["input_ids"], np.int64)
        self._mask = flat_list_column(samples["loss_mask"], np.int8)

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per sample."""
        return np.diff(self._ids[1])

    def _tokens(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        (ids_values, ids_offsets), (mask_values, mask_offsets) = self._ids, self._mask
        start, stop = ids_offsets[index], ids_offsets[index + 1]
        return ids_values[start:stop], mask_values[mask_offsets[index]:mask_offsets[index + 1]]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        indices = [int(index) for index in indices]
        sample_ids = [self.sample_ids[index] for index in indices]
        fetched = (fetch_targets(self.targets, sample_ids, self.split) if self.targets is not None
                   else [None] * len(indices))
        items = []
        for index, sample_id, record in zip(indices, sample_ids, fetched):
            input_ids, loss_mask = self._tokens(index)
            item = {"sample_index": index, "sample_id": sample_id, "input_ids": input_ids, "loss_mask": loss_mask}
            if record is not None:
                target = sample_targets(record, self.k)
                check_rows(sample_id, loss_mask, target)
                item["topk_ids"], item["topk_logprobs"] = target.topk_ids, target.topk_logprobs
                if self.logz_column is not None and not (self.logz_optional and target.logz is None):
                    if target.logz is None or target.logz.shape[1] <= self.logz_column:
                        raise ValueError(f"{self.split} sample {sample_id}: the artifact record has no logz column "
                                         f"{self.logz_column} (log-normalizers at the loss's temperature)")
                    item["teacher_logz"] = target.logz[:, self.logz_column]
                if target.row_lengths is not None:
                    item["row_lengths"] = target.row_lengths
                if self.sampled is not None:
                    if target.counts is None or target.logz is None:
                        raise ValueError(f"{self.split} sample {sample_id}: the artifact record has no draw counts "
                                         "or log-normalizers (the sampled estimator needs both)")
                    item["topk_weights"] = self.sampled(target.counts, target.topk_logprobs, target.logz)
            items.append(item)
        return items

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Sample order with little padding that stays shuffled: each epoch, a seeded permutation is
    cut into groups of `group_batches * batch_size` samples, each group sorted by length and cut
    into batches, and the batches shuffled again. Fed to a DataLoader with `batch_size`, every
    batch holds samples of similar length (HF's `LengthGroupedSampler` sorts groups of 50
    batches, which on a corpus of a few hundred samples is one length-sorted epoch).

    Deterministic in (seed, epoch), so a resumed run skips the same batches it had trained on.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, group_batches: int, seed: int = 0):
        if batch_size < 1 or group_batches < 1:
            raise ValueError(f"batch_size and group_batches must be >= 1, got {batch_size}, {group_batches}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.group_batches = group_batches
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[np.ndarray]:
        """This epoch's batches (index arrays), in training order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        group = self.group_batches * self.batch_size
        batches = []
        for start in range(0, len(order), group):
            members = order[start:start + group]
            members = members[np.argsort(self.lengths[members], kind="stable")]
            batches.extend(members[i:i + self.batch_size] for i in range(0, len(members), self.batch_size))
        # A short last batch stays last, so drop_last drops the same samples as without grouping.
        full = [b for b in batches if len(b) == self.batch_size]
        short = [b for b in batches if len(b) < self.batch_size]
        return [full[i] for i in rng.permutation(len(full))] + short

    def __iter__(self):
        for batch in self.batches():
            yield from (int(index) for index in batch)


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
        padded = pad_right([np.asarray(item["input_ids"], dtype=np.int64) for item in items],
                           [item["loss_mask"] for item in items], self.pad_token_id, self.pad_to_multiple_of,
                           sample_ids=[item["sample_id"] for item in items])
        labels = torch.where(padded.loss_mask, padded.input_ids, torch.full_like(padded.input_ids, IGNORE_INDEX))
        batch = {
            "input_ids": padded.input_ids,
            "attention_mask": padded.attention_mask,
            "labels": labels,
            "kd_positions_mask": padded.positions_mask,
            "sample_index": torch.tensor([int(item["sample_index"]) for item in items], dtype=torch.long),
            "sample_ids": [item["sample_id"] for item in items],
        }
        with_targets = ["topk_ids" in item for item in items]
        if any(with_targets):
            if not all(with_targets):
                raise ValueError("DistillCollator: some items of the batch have top-k targets and some do not")
            # Items in batch order, each's rows in increasing position order = row-major order of
            # kd_positions_mask.nonzero(), which is how the trainer gathers hidden states.
            # Variable rows: the batch's longest row sets K (entries are left-aligned, padding after).
            width = max((int(np.max(item["row_lengths"], initial=1)) for item in items if "row_lengths" in item),
                        default=None)
            batch["kd_topk_ids"] = torch.from_numpy(
                np.concatenate([np.asarray(item["topk_ids"][:, :width], dtype=np.int64) for item in items]))
            batch["kd_topk_logprobs"] = torch.from_numpy(
                np.concatenate([np.asarray(item["topk_logprobs"][:, :width], dtype=np.float32) for item in items]))
            if any("topk_weights" in item for item in items):
                batch["kd_topk_weights"] = torch.from_numpy(
                    np.concatenate([np.asarray(item["topk_weights"][:, :width], dtype=np.float32) for item in items]))
            with_logz = ["teacher_logz" in item for item in items]
            if all(with_logz):
                batch["kd_teacher_logz"] = torch.from_numpy(
                    np.concatenate([np.asarray(item["teacher_logz"], dtype=np.float32) for item in items]))
            elif any(with_logz):
                raise ValueError("DistillCollator: some items of the batch have teacher_logz and some do not")
            trained = int(padded.positions_mask.sum())
            if batch["kd_topk_ids"].shape[0] != trained:
                raise ValueError(
                    f"batch {batch['sample_ids']}: {batch['kd_topk_ids'].shape[0]} top-k rows for "
                    f"{trained} trained positions"
                )
        return batch


def flat_labels(batch: dict) -> torch.Tensor:
    """`labels[b, p + 1]` for each trained position `(b, p)`, in row-major order: `[N]` long."""
    mask = batch["kd_positions_mask"]
    return batch["labels"][:, 1:][mask[:, :-1]]
