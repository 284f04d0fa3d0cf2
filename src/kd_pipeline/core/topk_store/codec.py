"""Codecs that turn one sample's teacher top-k rows into Parquet column payloads and back.

A codec encodes a `TopKArrays` (one sample: `positions [n]`, `topk_ids [n, k]`,
`topk_logprobs [n, k]` sorted descending per row, `target_logprobs [n]`, and the per-row
log-normalizers `logz [n, T]` of the teacher tempered at `T` temperatures) into a dict of
`column name -> bytes`, and decodes those bytes back into a `TopKArrays`. Codecs are registered
by name (`get_codec(name, settings)`); the name and `settings()` go into the artifact manifest so
that a reader rebuilds exactly the codec that wrote the shards.

- `raw` (here): the exact reference. Little-endian `uint32` ids, `float32` log-probs, `int32`
  positions, `float32` target log-probs, `float32` log-normalizers, one binary column each.
  Decoding is bit-exact.
- `logquant_zstd` (`topk_store.logquant`): the compact default.

Capture modes (`CAPTURE_MODES`, the manifest's `capture_mode`): `topk` rows all hold `k`
entries; `top_p` and `sampled` rows hold a variable number (`row_lengths`, 1..k), and `sampled`
entries carry their draw counts (`counts`). Codecs store only the entries a row has (no padding
on disk); in memory a variable row is padded to `k` by `pad_rows`: padding slots repeat the
row's first id with log-prob -inf (and count 0), which the losses treat as "no entry" (a
repeated id is not a second bucket).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

__all__ = [
    "CAPTURE_MODES",
    "CODECS",
    "RawCodec",
    "TopKArrays",
    "TopKCodec",
    "get_codec",
    "pad_rows",
    "register_codec",
]

CAPTURE_MODES = ("topk", "top_p", "sampled")
"""What a row of the artifact holds: the teacher's top-k ids (`topk`), the smallest top set
holding a probability mass `p` (`top_p`), or the distinct ids of `n` draws from the teacher with
their counts (`sampled`); see `extraction.capture.CaptureConfig`."""


def pad_rows(topk_ids: np.ndarray, topk_logprobs: np.ndarray, row_lengths: np.ndarray,
             counts: np.ndarray | None = None) -> None:
    """In place: slots at or past each row's length get the row's first id, log-prob -inf and
    count 0 (the padding convention of variable rows)."""
    padding = np.arange(topk_ids.shape[1])[None, :] >= np.asarray(row_lengths)[:, None]
    if topk_ids.shape[0]:
        topk_ids[padding] = np.broadcast_to(topk_ids[:, :1], topk_ids.shape)[padding]
    topk_logprobs[padding] = -np.inf
    if counts is not None:
        counts[padding] = 0


def first_occurrence(topk_ids):
    """(n, k) bool torch tensor, True at the first slot holding each distinct id of a row (the
    losses' log-partitions count each vocabulary entry once; the other slots are repeats).

    Args:
        topk_ids: (n, k) int torch tensor.
    """
    import torch

    # Stable: equal ids stay in slot order, so a row's real slot sorts before its padding (an
    # unstable sort, from k ~ 64 on CPU, put padding first: tests/core/test_losses_variable_rows.py).
    sorted_ids, order = topk_ids.sort(dim=1, stable=True)
    is_new = torch.ones_like(topk_ids, dtype=torch.bool)
    is_new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    return torch.empty_like(is_new).scatter_(1, order, is_new)


def padding_slots(topk_ids, topk_logprobs):
    """(n, k) bool torch tensor: the padding slots of variable rows as every consumer reads them
    (the losses, evaluation): a slot repeating the id of an earlier slot of its row whose
    log-prob is -inf (what `pad_rows` writes; a stored entry is never such a slot). Such a slot
    is no entry on either side.

    Args:
        topk_ids: (n, k) int torch tensor.
        topk_logprobs: (n, k) float torch tensor.
    """
    return padding_given_first_slots(first_occurrence(topk_ids), topk_logprobs)


def padding_given_first_slots(first_slot, topk_logprobs):
    """`padding_slots` from `first_occurrence(topk_ids)`, for a caller that has it already."""
    import torch

    return ~first_slot & torch.isneginf(topk_logprobs)


@dataclass(frozen=True)
class TopKArrays:
    """One sample's teacher top-k rows as numpy arrays (codec input and output).

    Attributes:
        positions: (n,) int32, strictly increasing trained positions; row `i` describes the
            token at `positions[i] + 1` (docs/architecture.md).
        topk_ids: (n, k) int64 teacher token ids, distinct within a row.
        topk_logprobs: (n, k) float32 full-vocabulary log-probs, descending within a row.
        target_logprobs: (n,) float32 teacher log-prob of the actual next token.
        logz: (n, T) float32; `logz[i, j] = log sum_v p_i(v) ** logz_scales[j]` over the full
            vocabulary, the log-normalizer of row i's stored distribution tempered by scale
            `s_j` (exact tempered log-probs are `s_j * topk_logprobs - logz[:, j]`). Default:
            no columns.
        logz_scales: (T,) the tempering scales `s_j` (capture temperature / temperature j).
        row_lengths: (n,) int32 entries of each row (1..k) for `top_p` / `sampled` rows, None
            for `topk` rows (all k); the arrays are then padded by `pad_rows`.
        counts: (n, k) int32 draws of each entry (`sampled` rows; 0 at padding), else None.
    """

    positions: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_logprobs: np.ndarray
    logz: np.ndarray | None = None
    logz_scales: tuple[float, ...] = ()
    row_lengths: np.ndarray | None = None
    counts: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.logz is None:
            object.__setattr__(self, "logz", np.zeros((self.positions.shape[0], 0), dtype=np.float32))
        object.__setattr__(self, "logz_scales", tuple(float(s) for s in self.logz_scales))

    @property
    def num_positions(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_entries(self) -> int:
        """Stored entries (the sum of the row lengths)."""
        if self.row_lengths is None:
            return int(self.topk_ids.size)
        return int(self.row_lengths.sum())

    @property
    def mode(self) -> str:
        """The capture mode these arrays are laid out for."""
        return "topk" if self.row_lengths is None else "top_p" if self.counts is None else "sampled"

    @classmethod
    def from_any(cls, positions: Any, topk_ids: Any, topk_logprobs: Any, target_logprobs: Any,
                 logz: Any = None, logz_scales: Any = (), row_lengths: Any = None,
                 counts: Any = None) -> "TopKArrays":
        """Convert array-likes (numpy, torch CPU tensors, lists) to the canonical dtypes and check shapes.

        `logz` None means no log-normalizer columns (then `logz_scales` must be empty).
        `row_lengths` / `counts`: variable rows (see the class); their padding is rewritten to
        the `pad_rows` convention. `counts` needs `row_lengths`.

        Raises:
            ValueError: shapes disagree, positions are not strictly increasing, the ids do
                not fit in 31 bits, or `logz` does not have one finite column per scale.
        """
        positions = np.ascontiguousarray(_to_numpy(positions), dtype=np.int64)
        topk_ids = np.ascontiguousarray(_to_numpy(topk_ids), dtype=np.int64)
        topk_logprobs = np.ascontiguousarray(_to_numpy(topk_logprobs), dtype=np.float32)
        target_logprobs = np.ascontiguousarray(_to_numpy(target_logprobs), dtype=np.float32)
        if positions.ndim != 1:
            raise ValueError(f"positions must be 1-D, got shape {positions.shape}")
        n = positions.shape[0]
        if topk_ids.ndim != 2 or topk_ids.shape[0] != n:
            raise ValueError(f"topk_ids must be (n={n}, k), got shape {topk_ids.shape}")
        if topk_logprobs.shape != topk_ids.shape:
            raise ValueError(f"topk_logprobs shape {topk_logprobs.shape} differs from topk_ids {topk_ids.shape}")
        if target_logprobs.shape != (n,):
            raise ValueError(f"target_logprobs must be ({n},), got shape {target_logprobs.shape}")
        if n and (positions[0] < 0 or np.any(np.diff(positions) <= 0) or positions[-1] >= 2**31):
            raise ValueError("positions must be non-negative, strictly increasing and below 2**31")
        if topk_ids.size and (topk_ids.min() < 0 or topk_ids.max() >= 2**31):
            raise ValueError("topk_ids must lie in [0, 2**31)")
        logz_scales = tuple(float(scale) for scale in logz_scales)
        logz = (np.zeros((n, 0), np.float32) if logz is None
                else np.ascontiguousarray(_to_numpy(logz), dtype=np.float32))
        if logz.shape != (n, len(logz_scales)):
            raise ValueError(f"logz must be (n={n}, one column per temperature = {len(logz_scales)}), "
                             f"got shape {logz.shape}")
        if not np.isfinite(logz).all():
            raise ValueError("logz must be finite")
        lengths, draws = _variable_rows(row_lengths, counts, topk_ids.shape)
        if lengths is not None:
            topk_ids, topk_logprobs = topk_ids.copy(), topk_logprobs.copy()
            pad_rows(topk_ids, topk_logprobs, lengths, draws)
        return cls(positions.astype(np.int32), topk_ids, topk_logprobs, target_logprobs, logz, logz_scales,
                   lengths, draws)


def _variable_rows(row_lengths: Any, counts: Any, shape: tuple[int, int]):
    """Checked (row_lengths int32, counts int32 copy) of variable rows, or (None, None)."""
    if row_lengths is None:
        if counts is not None:
            raise ValueError("counts (sampled rows) need row_lengths")
        return None, None
    n, k = shape
    lengths = np.ascontiguousarray(_to_numpy(row_lengths), dtype=np.int64)
    if lengths.shape != (n,) or (n and (lengths.min() < 1 or lengths.max() > k)):
        raise ValueError(f"row_lengths must be ({n},) with values in [1, k={k}]")
    draws = None
    if counts is not None:
        draws = np.array(_to_numpy(counts), dtype=np.int64)
        if draws.shape != shape:
            raise ValueError(f"counts must be (n={n}, k={k}), got shape {draws.shape}")
        valid = np.arange(k)[None, :] < lengths[:, None]
        for bad, rule in ((valid & (draws < 1), ">= 1 on every stored entry"), (draws >= 2**31, "below 2**31")):
            if bad.any():
                row, slot = (int(i[0]) for i in np.nonzero(bad))
                raise ValueError(f"counts must be {rule}: row {row} slot {slot} holds {int(draws[row, slot])}")
        draws = draws.astype(np.int32)
    return lengths.astype(np.int32), draws


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (duck-typed: the codec does not import torch)
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 holds it exactly
            value = value.float()
        return value.numpy()
    return np.asarray(value)


class TopKCodec(abc.ABC):
    """Encodes one sample's `TopKArrays` into binary column payloads and back.

    Subclasses set `name` (the registry key, recorded in the manifest) and `columns` (the
    Parquet payload columns, in order) and implement `settings`, `encode` and `decode`.
    """

    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]

    def columns_for(self, mode: str = "topk") -> tuple[str, ...]:
        """The Parquet payload columns of an artifact of capture `mode` (default: `columns`)."""
        return self.columns

    @abc.abstractmethod
    def settings(self) -> dict[str, Any]:
        """JSON-serializable settings; `get_codec(self.name, self.settings())` rebuilds this codec."""

    @abc.abstractmethod
    def encode(self, sample: TopKArrays) -> dict[str, bytes]:
        """Payload bytes of each column in `columns` for one sample."""

    @abc.abstractmethod
    def decode(self, payload: Mapping[str, Any], num_positions: int, k: int,
               logz_scales: tuple[float, ...] = (), mode: str = "topk") -> TopKArrays:
        """Inverse of `encode`. `payload` values may be bytes or any buffer (memoryview, pyarrow Buffer).
        `logz_scales`: the scales the sample was encoded with, `mode` its capture mode (from
        the manifest); variable rows come back padded to `k` (`pad_rows`).

        Raises:
            ValueError: the payload is inconsistent with `num_positions` and `k`.
        """


CODECS: dict[str, type[TopKCodec]] = {}


def register_codec(cls: type[TopKCodec]) -> type[TopKCodec]:
    """Class decorator adding a codec to the registry under `cls.name`."""
    if cls.name in CODECS and CODECS[cls.name] is not cls:
        raise ValueError(f"a different codec is already registered as {cls.name!r}")
    CODECS[cls.name] = cls
    return cls


def get_codec(name: str, settings: Mapping[str, Any] | None = None) -> TopKCodec:
    """Build the codec registered as `name` with `settings` (None: its defaults).

    Raises:
        ValueError: unknown codec name or bad settings, naming the known codecs or the setting.
    """
    if name not in CODECS:
        raise ValueError(f"unknown top-k codec {name!r}; known codecs: {sorted(CODECS)}")
    try:
        return CODECS[name](**dict(settings or {}))
    except TypeError as error:  # an unexpected keyword: a setting this codec does not have
        raise ValueError(f"bad settings for top-k codec {name!r}: {error}") from error


@register_codec
class RawCodec(TopKCodec):
    """Exact reference: fixed-width little-endian arrays, one binary column per field. Variable
    rows store only their entries (row-major) plus `row_lengths` (uint16) and, for `sampled`,
    `counts` (uint32)."""

    name = "raw"
    columns = ("positions", "topk_ids", "topk_logprobs", "target_logprobs", "logz")

    def columns_for(self, mode: str = "topk") -> tuple[str, ...]:
        return self.columns + {"topk": (), "top_p": ("row_lengths",), "sampled": ("row_lengths", "counts")}[mode]

    def settings(self) -> dict[str, Any]:
        return {}

    def encode(self, sample: TopKArrays) -> dict[str, bytes]:
        valid = (slice(None) if sample.row_lengths is None
                 else np.arange(sample.topk_ids.shape[1])[None, :] < sample.row_lengths[:, None])
        out = {
            "positions": sample.positions.astype("<i4").tobytes(),
            "topk_ids": sample.topk_ids[valid].astype("<u4").tobytes(),
            "topk_logprobs": sample.topk_logprobs[valid].astype("<f4").tobytes(),
            "target_logprobs": sample.target_logprobs.astype("<f4").tobytes(),
            "logz": sample.logz.astype("<f4").tobytes(),
        }
        if sample.row_lengths is not None:
            if sample.num_positions and sample.row_lengths.max() >= 1 << 16:  # the column is uint16
                row = int(np.argmax(sample.row_lengths >= 1 << 16))
                raise ValueError(f"raw codec: row {row} has {int(sample.row_lengths[row])} entries, but row_lengths "
                                 "are stored as uint16 (below 65536): use k (or draws) below 65536")
            out["row_lengths"] = sample.row_lengths.astype("<u2").tobytes()
        if sample.counts is not None:
            out["counts"] = sample.counts[valid].astype("<u4").tobytes()
        return out

    def decode(self, payload: Mapping[str, Any], num_positions: int, k: int,
               logz_scales: tuple[float, ...] = (), mode: str = "topk") -> TopKArrays:
        n = num_positions
        positions = _frombuffer(payload["positions"], "<i4", (n,), "positions")
        target_logprobs = _frombuffer(payload["target_logprobs"], "<f4", (n,), "target_logprobs")
        logz = _frombuffer(payload["logz"], "<f4", (n, len(logz_scales)), "logz")
        lengths = counts = None
        if mode == "topk":
            topk_ids = _frombuffer(payload["topk_ids"], "<u4", (n, k), "topk_ids").astype(np.int64)
            # a copy: the buffer may be a read-only mmap
            topk_logprobs = _frombuffer(payload["topk_logprobs"], "<f4", (n, k), "topk_logprobs").astype(np.float32)
        else:
            lengths = _frombuffer(payload["row_lengths"], "<u2", (n,), "row_lengths").astype(np.int32)
            if n and (lengths.min() < 1 or lengths.max() > k):
                raise ValueError(f"column 'row_lengths' holds a length outside [1, k={k}]")
            valid = np.arange(k)[None, :] < lengths[:, None]
            entries = int(lengths.sum())
            topk_ids = np.zeros((n, k), np.int64)
            topk_ids[valid] = _frombuffer(payload["topk_ids"], "<u4", (entries,), "topk_ids")
            topk_logprobs = np.zeros((n, k), np.float32)
            topk_logprobs[valid] = _frombuffer(payload["topk_logprobs"], "<f4", (entries,), "topk_logprobs")
            if mode == "sampled":
                counts = np.zeros((n, k), np.int32)
                counts[valid] = _frombuffer(payload["counts"], "<u4", (entries,), "counts")
            pad_rows(topk_ids, topk_logprobs, lengths, counts)
        return TopKArrays(positions.astype(np.int32), topk_ids, topk_logprobs, target_logprobs.astype(np.float32),
                          logz.astype(np.float32), tuple(logz_scales), lengths, counts)


def _frombuffer(buffer: Any, dtype: str, shape: tuple[int, ...], column: str) -> np.ndarray:
    array = np.frombuffer(buffer, dtype=dtype)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"column {column!r} holds {array.size} values, expected {int(np.prod(shape))} "
                         f"for shape {shape}")
    return array.reshape(shape)

