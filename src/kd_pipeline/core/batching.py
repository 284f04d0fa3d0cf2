"""Samples -> padded batches, and the rows of the teacher artifact that belong to them.

Alignment (docs/architecture.md): the output at position `p` predicts token `p + 1`, so a
sample's trained *positions* are `[t - 1 for t where loss_mask[t] == 1]`, and the artifact holds
one top-k row per trained position, in increasing position order. Extraction, training data and
evaluation all pad right with `pad_right` and check artifact rows with `check_rows`, so the three
agree on which row belongs where.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

import numpy as np
import torch

if TYPE_CHECKING:  # pyarrow is only needed to read a corpus table, not to pad
    import pyarrow as pa

#: Label of a position that is not trained (the Hugging Face / PyTorch convention).
IGNORE_INDEX = -100


class PositionMismatchError(ValueError):
    """The artifact's positions of a sample differ from those derived from the corpus mask."""


class MissingTargetsError(KeyError):
    """A sample has no rows in the top-k artifact."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence.
        return str(self.args[0])


class TargetsProvider(Protocol):
    """What batching needs from a top-k artifact reader (`core.topk_store.TopKReader`)."""

    def get_many(self, sample_ids: Sequence[str]) -> Any:
        """Decoded targets of each sample, in the order asked (a list, or a dict by sample id)."""


def trained_positions(loss_mask: np.ndarray) -> np.ndarray:
    """Positions whose output predicts a trained token: `t - 1` for each `t` with `loss_mask[t]`."""
    return np.flatnonzero(np.asarray(loss_mask)) - 1


def flat_list_column(column: "pa.ChunkedArray | pa.ListArray", dtype) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list column: row `i` is `values[offsets[i]:offsets[i + 1]]`."""
    array = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    # A sliced list array keeps its parent's values; offsets index into them as they are.
    return np.asarray(array.values, dtype=dtype), np.asarray(array.offsets, dtype=np.int64)


@dataclass
class PaddedBatch:
    """Right-padded samples: `input_ids`, `attention_mask` (long), `loss_mask` and
    `positions_mask` (bool), all `[B, T]`; `positions_mask[b, p]` is on iff `loss_mask[b, p + 1]`."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    positions_mask: torch.Tensor

    def next_token_labels(self) -> torch.Tensor:
        """`input_ids[b, p + 1]` for each trained position `(b, p)`, row-major: `[N]` long."""
        return self.input_ids[:, 1:][self.positions_mask[:, :-1]]

    def flat_positions(self) -> torch.Tensor:
        """`b * T + p` of each trained position, row-major (sample-major, positions ascending)."""
        return self.positions_mask.reshape(-1).nonzero().squeeze(1)


def pad_right(input_ids: Sequence[np.ndarray], loss_masks: Sequence[np.ndarray], pad_id: int = 0,
              pad_to_multiple_of: int | None = None, sample_ids: Sequence[str] | None = None) -> PaddedBatch:
    """Right-pad samples (to the longest, rounded up to `pad_to_multiple_of`) and locate their
    trained positions. Right padding never changes a real position's output under a causal mask.

    Raises:
        ValueError: a sample (named by `sample_ids`, else by its index) trains its first token.
    """
    lengths = [len(ids) for ids in input_ids]
    length = max(lengths)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    ids = np.full((len(lengths), length), pad_id, dtype=np.int64)
    attention = np.zeros((len(lengths), length), dtype=np.int64)
    trained = np.zeros((len(lengths), length), dtype=bool)
    for b, (row, mask, row_length) in enumerate(zip(input_ids, loss_masks, lengths)):
        mask = np.asarray(mask)
        if row_length and mask[0]:
            name = sample_ids[b] if sample_ids is not None else b
            raise ValueError(f"sample {name}: loss_mask[0] is 1, but token 0 has no prediction")
        ids[b, :row_length] = row
        attention[b, :row_length] = 1
        trained[b, :row_length] = mask.astype(bool)
    positions = np.zeros_like(trained)
    positions[:, :-1] = trained[:, 1:]  # position p predicts token p + 1
    return PaddedBatch(torch.from_numpy(ids), torch.from_numpy(attention), torch.from_numpy(trained),
                       torch.from_numpy(positions))


@dataclass(frozen=True)
class SampleTargets:
    """One sample's teacher rows: `positions [n]`, `topk_ids [n, K]`, `topk_logprobs [n, K]`
    (descending), and `target_logprobs [n]` and the log-normalizers `logz [n, T]` (at the
    manifest's `logz_temperatures`) when the record has them; variable rows (`top_p`,
    `sampled` artifacts) also `row_lengths [n]` (padded beyond, `topk_store.codec.pad_rows`)
    and `sampled` rows `counts [n, K]`."""

    positions: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_logprobs: np.ndarray | None = None
    logz: np.ndarray | None = None
    row_lengths: np.ndarray | None = None
    counts: np.ndarray | None = None


def _field(record: Any, name: str, required: bool = True) -> Any:
    if isinstance(record, Mapping):
        return record[name] if required else record.get(name)
    return getattr(record, name) if required else getattr(record, name, None)


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def sample_targets(record: Any, k: int | None = None) -> SampleTargets:
    """One decoded artifact record (attribute or mapping access) as `SampleTargets`, its first
    `k` top-k columns only when `k` is given (rows are sorted by descending log-prob; a variable
    row longer than `k` is cut to its `k` most probable entries)."""
    topk_ids = _as_numpy(_field(record, "topk_ids"))
    topk_logprobs = _as_numpy(_field(record, "topk_logprobs")).astype(np.float32, copy=False)
    lengths, counts = (_field(record, name, required=False) for name in ("row_lengths", "counts"))
    lengths = None if lengths is None else _as_numpy(lengths).astype(np.int64)
    counts = None if counts is None else _as_numpy(counts)
    if k is not None:
        topk_ids, topk_logprobs = topk_ids[:, :k], topk_logprobs[:, :k]
        lengths = None if lengths is None else np.minimum(lengths, k)
        counts = None if counts is None else counts[:, :k]
    target = _field(record, "target_logprobs", required=False)
    logz = _field(record, "logz", required=False)
    return SampleTargets(_as_numpy(_field(record, "positions")).astype(np.int64, copy=False), topk_ids,
                         topk_logprobs, None if target is None else _as_numpy(target),
                         None if logz is None else _as_numpy(logz).astype(np.float32, copy=False), lengths, counts)


def check_rows(sample_id: str, loss_mask: np.ndarray, target: SampleTargets) -> None:
    """The artifact's rows must sit exactly at the positions the corpus mask trains, one row each."""
    expected = trained_positions(loss_mask)
    stored = target.positions
    if stored.shape != expected.shape or not np.array_equal(stored, expected):
        detail = (f"{len(stored)} stored rows, {len(expected)} trained positions" if stored.shape != expected.shape
                  else f"first difference at row {int(np.flatnonzero(stored != expected)[0])}")
        raise PositionMismatchError(
            f"sample {sample_id}: the teacher top-k artifact's positions do not match the corpus loss_mask "
            f"({detail}); the artifact was made from a different corpus"
        )
    n = len(expected)
    shapes_ok = (target.topk_ids.ndim == 2 and target.topk_ids.shape[0] == n
                 and target.topk_logprobs.shape == target.topk_ids.shape
                 and (target.target_logprobs is None or target.target_logprobs.shape == (n,))
                 and (target.logz is None or (target.logz.ndim == 2 and target.logz.shape[0] == n)))
    if not shapes_ok:
        target_shape = "" if target.target_logprobs is None else f" / target_logprobs {target.target_logprobs.shape}"
        target_shape += "" if target.logz is None else f" / logz {target.logz.shape}"
        raise PositionMismatchError(
            f"sample {sample_id}: topk_ids {target.topk_ids.shape} / topk_logprobs {target.topk_logprobs.shape}"
            f"{target_shape} do not have one row per trained position ({n})"
        )


def fetch_targets(targets: TargetsProvider, sample_ids: list[str], split: str) -> list[Any]:
    """The artifact records of `sample_ids`, in order; a missing one is a `MissingTargetsError`
    naming the split and the sample."""
    try:
        fetched = targets.get_many(sample_ids)
    except KeyError as error:
        missing = [sample_id for sample_id in sample_ids if sample_id in str(error)] or sample_ids
        raise MissingTargetsError(
            f"{split} sample {missing[0]} has no rows in the teacher top-k artifact "
            f"(regenerate it for this corpus: kedro run --pipelines teacher_logits): {error}"
        ) from error
    if isinstance(fetched, Mapping):
        missing = [sample_id for sample_id in sample_ids if sample_id not in fetched]
        if missing:
            raise MissingTargetsError(
                f"{split} sample {missing[0]} has no rows in the teacher top-k artifact "
                f"({len(missing)} of {len(sample_ids)} in this batch missing)"
            )
        return [fetched[sample_id] for sample_id in sample_ids]
    fetched = list(fetched)
    if len(fetched) != len(sample_ids) or any(record is None for record in fetched):
        missing = [sample_id for sample_id, record in zip(sample_ids, fetched) if record is None]
        raise MissingTargetsError(
            f"{split} sample {(missing or sample_ids)[0]} has no rows in the teacher top-k artifact"
        )
    return fetched
