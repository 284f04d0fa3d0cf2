"""Reads a top-k artifact written by `TopKShardWriter`: random access by sample id, decoding
straight into torch tensors, with every shard checked against its manifest sha256 before use."""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:  # torch is imported on first decode: writing an artifact does not pay its import time
    import torch

from kd_pipeline.core.atomic import sha256_file
from kd_pipeline.core.topk_store.codec import TopKCodec, get_codec
from kd_pipeline.core.topk_store.manifest import MANIFEST_NAME, Manifest, TopKStoreError

__all__ = ["DEFAULT_FULL_VERIFY_MAX_BYTES", "VERIFY_MODES", "MissingSampleError", "ShardCorruptError", "TopKBatch",
           "TopKReader", "TopKSample"]

log = logging.getLogger(__name__)

_REPAIR_HINT = "re-run `kedro run --pipelines teacher_logits` to regenerate it"
VERIFY_MODES = ("auto", "full", "lazy")
# `verify="auto"` hashes the whole artifact at open up to this size: sha256 runs at roughly
# 0.5-1 GB/s per core, so up to ~30 s at open against hours of training that a corrupt shard
# found late would waste. Larger artifacts are checked shard by shard on first read.
DEFAULT_FULL_VERIFY_MAX_BYTES = 16 << 30


def _gibibytes(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


class ShardCorruptError(TopKStoreError):
    """A shard is missing, truncated or altered (its bytes do not match the manifest)."""


class MissingSampleError(KeyError):
    """A sample id is not in the artifact."""

    def __str__(self) -> str:  # KeyError would quote the message; this is a sentence
        return str(self.args[0])


@dataclass(frozen=True, eq=False)  # tensors have no boolean equality
class TopKSample:
    """One sample's decoded teacher rows (CPU tensors; may be views into a `TopKBatch`).

    Attributes:
        sample_id: the corpus sample id.
        positions: (n,) int64 trained positions; row i describes token `positions[i] + 1`.
        topk_ids: (n, k) int64 teacher ids, by descending log-prob.
        topk_logprobs: (n, k) float32 full-vocabulary teacher log-probs, descending per row.
        target_logprobs: (n,) float32 teacher log-prob of the actual next token.
        logz: (n, T) float32 log-normalizers at the manifest's `logz_temperatures`
            (`log sum_v p(v)**s`, see `TopKArrays.logz`).
        row_lengths: (n,) int64 entries per row (`top_p`, `sampled` artifacts; the ids and
            log-probs are padded to k beyond it, `topk_store.codec.pad_rows`), else None.
        counts: (n, k) int64 draw counts (`sampled`; 0 at padding), else None.
    """

    sample_id: str
    positions: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    target_logprobs: torch.Tensor
    logz: torch.Tensor
    row_lengths: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    @property
    def num_positions(self) -> int:
        return int(self.positions.shape[0])


@dataclass(frozen=True, eq=False)
class TopKBatch(Sequence):
    """Decoded rows of several samples, flattened over trained tokens (N = sum of their rows).

    Indexing or iterating gives one `TopKSample` per sample (views, no copies), in the order the
    samples were asked for.

    Attributes:
        sample_ids: the B sample ids.
        offsets: (B + 1,) int64; sample b owns rows `offsets[b]:offsets[b + 1]`.
        positions: (N,) int64; topk_ids: (N, k) int64; topk_logprobs: (N, k) float32;
        target_logprobs: (N,) float32; logz: (N, T) float32; row_lengths: (N,) int64 or None;
        counts: (N, k) int64 or None (see `TopKSample`).
    """

    sample_ids: tuple[str, ...]
    offsets: torch.Tensor
    positions: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    target_logprobs: torch.Tensor
    logz: torch.Tensor
    row_lengths: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    @property
    def num_positions(self) -> torch.Tensor:
        """(B,) int64 rows per sample."""
        return self.offsets[1:] - self.offsets[:-1]

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, index: int) -> TopKSample:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"batch of {len(self)} samples has no index {index}")
        index %= len(self)
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        rows = slice(start, stop)
        return TopKSample(self.sample_ids[index], self.positions[rows], self.topk_ids[rows],
                          self.topk_logprobs[rows], self.target_logprobs[rows], self.logz[rows],
                          None if self.row_lengths is None else self.row_lengths[rows],
                          None if self.counts is None else self.counts[rows])


class TopKReader:
    """Random access by sample id to an artifact directory (`manifest.json` + Parquet shards).

    Opening reads the manifest (refusing an unknown schema version or codec) and the
    `sample_id` / `num_positions` columns of every shard to build the index, and checks every
    shard's size. Each shard's bytes are checked against its sha256 either all at open
    (`verify="full"`: a corrupt shard stops the run before any work) or the first time a shard
    is read (`verify="lazy"`: for artifacts too large to hash up front). `verify="auto"` (the
    default) is "full" up to `full_verify_max_bytes` of shards and "lazy" above; the mode used
    is logged and kept in `verify_mode`.

    Not thread-safe (one reader per thread); pickling it (DataLoader workers) is supported:
    each process opens its own files; shards already verified are not hashed again.

    Args:
        directory: the artifact directory.
        cached_row_groups: Parquet row groups kept in memory (least recently used dropped).
        verify: "auto", "full" or "lazy" (see above).
        full_verify_max_bytes: the largest artifact "auto" verifies in full at open.

    Raises:
        ValueError: an unknown `verify` mode or a negative `full_verify_max_bytes`.
        TopKStoreError: no or unreadable manifest, unknown schema version or codec.
        ShardCorruptError: a shard is missing or has the wrong size (detected at open), or
            fails its sha256 (at open with "full", at first read with "lazy"); the message
            names the shard files.
    """

    def __init__(self, directory: str | os.PathLike, cached_row_groups: int = 8, verify: str = "auto",
                 full_verify_max_bytes: int = DEFAULT_FULL_VERIFY_MAX_BYTES):
        if verify not in VERIFY_MODES:
            raise ValueError(f"top-k artifact verify mode must be one of {list(VERIFY_MODES)}, got {verify!r}")
        if isinstance(full_verify_max_bytes, bool) or not isinstance(full_verify_max_bytes, int) \
                or full_verify_max_bytes < 0:
            raise ValueError(f"full_verify_max_bytes must be an int >= 0, got {full_verify_max_bytes!r}")
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST_NAME
        try:
            self._manifest = Manifest.read(manifest_path)
        except FileNotFoundError as error:
            raise TopKStoreError(f"{manifest_path} does not exist: the top-k artifact is missing or was not "
                                 f"finished; run `kedro run --pipelines teacher_logits`") from error
        try:
            self._codec = get_codec(self._manifest.codec_name, self._manifest.codec_settings)
        except ValueError as error:
            raise TopKStoreError(f"{manifest_path}: {error}") from error
        self._cached_row_groups = max(1, int(cached_row_groups))
        self._paths = [self.directory / shard.file for shard in self._manifest.shards]
        self._verified: set[int] = set()  # shard numbers whose sha256 matched (valid in any process)
        self._build_index()
        self._reset_process_state()
        self.verify_mode = self._open_verification(verify, full_verify_max_bytes)

    # -- public API ------------------------------------------------------------------------------

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def codec(self) -> TopKCodec:
        return self._codec

    @property
    def k(self) -> int:
        return self._manifest.source.k

    @property
    def mode(self) -> str:
        """The artifact's capture mode (`topk`, `top_p`, `sampled`)."""
        return self._manifest.source.capture_mode

    def __len__(self) -> int:
        return len(self._sample_ids)

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._lookup

    def sample_ids(self) -> list[str]:
        """All sample ids, in shard order (rank, index) then row order."""
        return list(self._sample_ids)

    def num_positions(self, sample_id: str) -> int:
        """Trained positions (top-k rows) stored for a sample, without decoding it."""
        return int(self._num_positions[self._position_of(sample_id)])

    def get(self, sample_id: str) -> TopKSample:
        """Decoded rows of one sample.

        Raises:
            MissingSampleError: the sample is not in the artifact.
            ShardCorruptError: its shard fails the sha256 check.
        """
        return self.get_many([sample_id])[0]

    def get_many(self, sample_ids: Iterable[str]) -> TopKBatch:
        """Decoded rows of several samples, written straight into preallocated torch tensors.

        Samples are decoded grouped by shard and row group (each row group read once), and
        placed in the order asked; a sample may be asked for more than once.

        Raises:
            MissingSampleError: a sample is not in the artifact (the message names it).
            ShardCorruptError: a shard fails the sha256 check.
        """
        import torch

        sample_ids = tuple(sample_ids)
        missing = [sample_id for sample_id in sample_ids if sample_id not in self._lookup]
        if missing:
            raise MissingSampleError(f"sample {missing[0]} is not in the top-k artifact {self.directory} "
                                     f"({len(missing)} of {len(sample_ids)} asked are missing)")
        where = np.array([self._lookup[sample_id] for sample_id in sample_ids], dtype=np.int64)
        counts = self._num_positions[where]
        offsets = np.zeros(len(sample_ids) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        total, k = int(offsets[-1]), self.k
        positions = torch.empty(total, dtype=torch.int64)
        topk_ids = torch.empty((total, k), dtype=torch.int64)
        topk_logprobs = torch.empty((total, k), dtype=torch.float32)
        target_logprobs = torch.empty(total, dtype=torch.float32)
        scales = self._manifest.source.logz_scales
        logz = torch.empty((total, len(scales)), dtype=torch.float32)
        mode = self.mode
        row_lengths = None if mode == "topk" else torch.empty(total, dtype=torch.int64)
        draws = torch.empty((total, k), dtype=torch.int64) if mode == "sampled" else None
        # numpy views of the output tensors: decoded arrays are copied in once, no concatenation.
        out = (positions.numpy(), topk_ids.numpy(), topk_logprobs.numpy(), target_logprobs.numpy(), logz.numpy(),
               None if row_lengths is None else row_lengths.numpy(), None if draws is None else draws.numpy())
        order = np.lexsort((self._row_of[where], self._group_of[where], self._shard_of[where]))
        for slot in order:
            entry = where[slot]
            shard, group, row = int(self._shard_of[entry]), int(self._group_of[entry]), int(self._row_of[entry])
            payload = self._row_group(shard, group)
            columns = {column: data[offsets_[row]:offsets_[row + 1]] for column, (offsets_, data) in payload.items()}
            try:
                decoded = self._codec.decode(columns, int(counts[slot]), k, scales, mode)
            except ValueError as error:
                raise ShardCorruptError(f"top-k shard {self._paths[shard]}: sample {sample_ids[slot]} does not "
                                        f"decode ({error}); {_REPAIR_HINT}") from error
            start, stop = offsets[slot], offsets[slot + 1]
            out[0][start:stop] = decoded.positions
            out[1][start:stop] = decoded.topk_ids
            out[2][start:stop] = decoded.topk_logprobs
            out[3][start:stop] = decoded.target_logprobs
            out[4][start:stop] = decoded.logz
            if row_lengths is not None:
                out[5][start:stop] = decoded.row_lengths
            if draws is not None:
                out[6][start:stop] = decoded.counts
        return TopKBatch(sample_ids, torch.from_numpy(offsets), positions, topk_ids, topk_logprobs, target_logprobs,
                         logz, row_lengths, draws)

    def close(self) -> None:
        """Release open shard files and cached row groups (the reader stays usable)."""
        for parquet in self._files.values():
            parquet.close()
        self._files.clear()
        self._groups.clear()

    def __enter__(self) -> "TopKReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def verify(self) -> list[str]:
        """Check every shard's size and sha256 (those not checked yet); returns the names of the
        bad ones (empty: all good)."""
        bad = []
        for shard_number in range(len(self._paths)):
            try:
                self._verify_shard(shard_number)
            except ShardCorruptError:
                bad.append(self._manifest.shards[shard_number].file)
        return bad

    def _open_verification(self, verify: str, full_verify_max_bytes: int) -> str:
        """Resolve "auto", hash every shard now for "full", and log which check is used."""
        size, count = self._manifest.num_bytes, len(self._paths)
        if verify == "auto":
            mode = "full" if size <= full_verify_max_bytes else "lazy"
            why = (f"auto: artifact {_gibibytes(size)} {'<=' if mode == 'full' else '>'} "
                   f"full_verify_max_bytes {_gibibytes(full_verify_max_bytes)}")
        else:
            mode, why = verify, "as configured"
        if mode == "lazy":
            log.info("top-k artifact %s: verify=lazy (%s): each of the %d shards' sha256 is checked when it is "
                     "first read", self.directory, why, count)
            return mode
        started = time.perf_counter()
        bad = self.verify()
        if bad:
            listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise ShardCorruptError(f"top-k artifact {self.directory}: {len(bad)} of {count} shards are corrupt "
                                    f"(size or sha256 differs from the manifest): {listed}; {_REPAIR_HINT}")
        log.info("top-k artifact %s: verify=full (%s): sha256 of all %d shards (%s) checked at open in %.1f s",
                 self.directory, why, count, _gibibytes(size), time.perf_counter() - started)
        return mode

    # -- index -----------------------------------------------------------------------------------

    def _build_index(self) -> None:
        sample_ids: list[str] = []
        shard_of, group_of, row_of, num_positions = [], [], [], []
        for shard_number, (shard, path) in enumerate(zip(self._manifest.shards, self._paths)):
            self._check_size(shard_number)
            try:
                with pq.ParquetFile(path) as parquet:
                    table = parquet.read(columns=["sample_id", "num_positions"])
                    metadata = parquet.metadata
                    group_rows = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
            except (OSError, pa.ArrowException) as error:
                raise self._corrupt(shard_number, f"unreadable Parquet: {error}") from error
            ids = table["sample_id"].to_pylist()
            counts = table["num_positions"].to_numpy().astype(np.int64)
            if len(ids) != shard.rows or int(counts.sum()) != shard.trained_tokens:
                raise self._corrupt(shard_number, f"holds {len(ids)} samples / {int(counts.sum())} tokens, "
                                                  f"the manifest says {shard.rows} / {shard.trained_tokens}")
            sample_ids += ids
            shard_of.append(np.full(len(ids), shard_number, dtype=np.int64))
            group_of.append(np.repeat(np.arange(len(group_rows), dtype=np.int64), group_rows))
            row_of.append(np.concatenate([np.arange(n, dtype=np.int64) for n in group_rows] or [np.zeros(0, np.int64)]))
            num_positions.append(counts)
        self._sample_ids = sample_ids
        self._lookup = {sample_id: index for index, sample_id in enumerate(sample_ids)}
        if len(self._lookup) != len(sample_ids):
            raise TopKStoreError(f"{self.directory}: a sample id appears in more than one row")
        empty = np.zeros(0, dtype=np.int64)
        self._shard_of = np.concatenate(shard_of or [empty])
        self._group_of = np.concatenate(group_of or [empty])
        self._row_of = np.concatenate(row_of or [empty])
        self._num_positions = np.concatenate(num_positions or [empty])

    def _position_of(self, sample_id: str) -> int:
        try:
            return self._lookup[sample_id]
        except KeyError:
            raise MissingSampleError(f"sample {sample_id} is not in the top-k artifact {self.directory}") from None

    # -- shard access ----------------------------------------------------------------------------

    def _reset_process_state(self) -> None:
        """Open files and caches belong to one process (DataLoader workers get fresh ones)."""
        self._pid = os.getpid()
        self._files: dict[int, pq.ParquetFile] = {}
        self._groups: OrderedDict[tuple[int, int], dict[str, tuple[np.ndarray, memoryview]]] = OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_files={}, _groups=OrderedDict())
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._pid != os.getpid():
            self._reset_process_state()

    def _corrupt(self, shard_number: int, detail: str) -> ShardCorruptError:
        return ShardCorruptError(f"top-k shard {self._paths[shard_number]} is corrupt ({detail}); {_REPAIR_HINT}")

    def _check_size(self, shard_number: int) -> None:
        path, expected = self._paths[shard_number], self._manifest.shards[shard_number].bytes
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise self._corrupt(shard_number, "file missing") from None
        if size != expected:
            raise self._corrupt(shard_number, f"{size} bytes, the manifest says {expected}")

    def _verify_shard(self, shard_number: int) -> None:
        if shard_number in self._verified:
            return
        self._check_size(shard_number)
        digest, expected = sha256_file(self._paths[shard_number]), self._manifest.shards[shard_number].sha256
        if digest != expected:
            raise self._corrupt(shard_number, f"sha256 {digest[:12]}..., the manifest says {expected[:12]}...")
        self._verified.add(shard_number)

    def _row_group(self, shard_number: int, group: int) -> dict[str, tuple[np.ndarray, memoryview]]:
        """Payload columns of one row group as (offsets, data) pairs, from the LRU cache."""
        if self._pid != os.getpid():
            self._reset_process_state()
        key = (shard_number, group)
        cached = self._groups.get(key)
        if cached is not None:
            self._groups.move_to_end(key)
            return cached
        self._verify_shard(shard_number)
        parquet = self._files.get(shard_number)
        if parquet is None:
            parquet = self._files[shard_number] = pq.ParquetFile(self._paths[shard_number], memory_map=True)
        columns = self._codec.columns_for(self.mode)
        table = parquet.read_row_group(group, columns=list(columns))
        payload = {}
        for column in columns:
            array = table[column].combine_chunks()
            # large_binary layout: buffers = [validity, int64 offsets, data]; slicing the data
            # buffer by the offsets gives each row's bytes without a copy.
            _, offsets_buffer, data_buffer = array.buffers()
            offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[array.offset:array.offset + len(array) + 1]
            payload[column] = (offsets, memoryview(data_buffer) if data_buffer is not None else memoryview(b""))
        self._groups[key] = payload
        while len(self._groups) > self._cached_row_groups:
            self._groups.popitem(last=False)
        return payload
