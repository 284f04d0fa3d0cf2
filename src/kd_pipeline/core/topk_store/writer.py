"""Writes teacher top-k rows into a directory of Parquet shards plus `manifest.json`, readable by
`TopKReader`; an interrupted write resumes to the same bytes an uninterrupted one would give.

Layout of the directory:

- `shard-r{rank:02d}-{index:05d}.parquet`: one row per sample, columns `sample_id` (string),
  `num_positions` (int32) and the codec's binary payload columns; row groups of
  `samples_per_row_group` samples. A shard is closed as soon as it holds `shard_tokens` trained
  tokens or more, and at the end. Written as `<name>.tmp-<pid>`, fsynced, then renamed.
- `manifest-r{rank:02d}.partial.json`: the rank's progress: the manifest fields plus its
  finished shards (name, sizes, sha256) and a `progress` entry `{"rank", "complete"}`; rewritten
  atomically after every shard.
- `manifest.json`: written last, atomically, only when every rank has finished
  (`merge_manifests`, which a single-process writer calls itself in `close`).

Only one run writes a directory at a time: from opening to `close`/`abort`, rank 0's writer holds
the directory's `FolderLock` (`<directory>.lock` beside it) and rank r > 0 the lock of its own
files (`<directory>.rNN.lock`); a second writer fails at open, naming the holder's PID, before it
touches a file (it would otherwise delete the first one's shard in progress as torn).

Resume protocol. Shard bytes depend only on the samples they hold (in order), the codec and the
layout settings, and shard cuts depend only on the samples fed. So, given the same sample order:

1. Open the writer on the same directory (`resume=True`, the default). It deletes this rank's
   temp files (torn writes) and `manifest.json`, checks its partial manifest against the new
   settings (a mismatch raises `ManifestMismatchError` naming the field), keeps each recorded
   shard whose sha256 still matches, and deletes this rank's other shard files.
2. `writer.completed_sample_ids` lists the samples of the kept shards: skip them and feed every
   other sample in the original order. New shards take the lowest free indices, so a killed run
   continues where it stopped and a deleted or corrupt shard is rebuilt under its old name,
   byte-identical.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kd_pipeline.core.atomic import sha256_file, temp_path_for, write_json_atomic
from kd_pipeline.core.locking import FolderLock
from kd_pipeline.core.topk_store.codec import TopKArrays, TopKCodec
from kd_pipeline.core.topk_store.logquant import LogQuantZstdCodec
from kd_pipeline.core.topk_store.manifest import (
    COVERAGE_BINS,
    MANIFEST_NAME,
    ArtifactSource,
    Manifest,
    ManifestMismatchError,
    ShardInfo,
    TopKStoreError,
    coverage_histogram,
)

__all__ = ["TopKShardWriter", "merge_manifests", "partial_manifest_name", "shard_name"]

log = logging.getLogger(__name__)

DEFAULT_SHARD_TOKENS = 1 << 18
DEFAULT_SAMPLES_PER_ROW_GROUP = 64
_SHARD_PATTERN = re.compile(r"^shard-r(\d+)-(\d+)\.parquet$")
_PARTIAL_PATTERN = re.compile(r"^manifest-r(\d+)\.partial\.json$")
# Fixed Parquet options: equal input gives equal bytes (no statistics, no dictionary pages, no
# page index; payloads are incompressible or raw by design, so no Parquet compression).
_PARQUET_OPTIONS: dict[str, Any] = dict(compression="none", use_dictionary=False, write_statistics=False,
                                        version="2.6", data_page_version="1.0", write_page_index=False,
                                        write_page_checksum=False, store_schema=True)


def shard_name(rank: int, index: int) -> str:
    return f"shard-r{rank:02d}-{index:05d}.parquet"


def partial_manifest_name(rank: int) -> str:
    return f"manifest-r{rank:02d}.partial.json"


def shard_schema(codec: TopKCodec, mode: str = "topk") -> pa.Schema:
    """Parquet schema of a shard written with `codec` for capture `mode`."""
    return pa.schema([pa.field("sample_id", pa.string(), nullable=False),
                      pa.field("num_positions", pa.int32(), nullable=False)]
                     + [pa.field(column, pa.large_binary(), nullable=False) for column in codec.columns_for(mode)])


def read_shard_sample_ids(path: Path) -> list[str]:
    """The `sample_id` column of a shard, in row order (reads only that column)."""
    return pq.read_table(path, columns=["sample_id"])["sample_id"].to_pylist()


class TopKShardWriter:
    """Writes one rank's samples into shards; see the module docstring for layout and resume.

    Use as a context manager: a normal exit calls `close()` (last shard, complete partial
    manifest, and `manifest.json` when `world_size == 1`); an exception calls `abort()`, which
    leaves the finished shards for a resume and writes no manifest.

    ```
    with TopKShardWriter(directory, source, LogQuantZstdCodec()) as writer:
        for sample_id, positions, ids, logprobs, target in samples_in_fixed_order:
            if sample_id not in writer.completed_sample_ids:
                writer.add(sample_id, positions, ids, logprobs, target)
    ```

    Args:
        directory: the artifact directory (created if needed).
        source: what the rows were made from (teacher, tokenizer, corpus, k, ...).
        codec: payload codec (default: `LogQuantZstdCodec()`).
        rank, world_size: this process's rank and the number of writing processes.
        shard_tokens: close a shard once it holds this many trained tokens (or more).
        samples_per_row_group: Parquet row group size in samples (the reader's unit of I/O).
        resume: keep this rank's verified shards from an earlier run (False: delete them).

    Raises:
        ManifestMismatchError: resuming over shards written with other settings.
        FolderLockedError: another live process is writing this directory (or this rank's share).
    """

    def __init__(self, directory: str | os.PathLike, source: ArtifactSource, codec: TopKCodec | None = None, *,
                 rank: int = 0, world_size: int = 1, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 samples_per_row_group: int = DEFAULT_SAMPLES_PER_ROW_GROUP, resume: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if shard_tokens < 1 or samples_per_row_group < 1:
            raise ValueError(f"shard_tokens ({shard_tokens}) and samples_per_row_group ({samples_per_row_group}) "
                             "must be >= 1")
        self.directory = Path(directory)
        self.codec = codec if codec is not None else LogQuantZstdCodec()
        self.rank = rank
        self.source = source
        self._shardless_manifest = Manifest.create(source, self.codec.name, self.codec.settings(),
                                               shard_tokens=shard_tokens, samples_per_row_group=samples_per_row_group,
                                               world_size=world_size)
        self._schema = shard_schema(self.codec, source.capture_mode)
        self._columns = self.codec.columns_for(source.capture_mode)
        self._shards: dict[int, ShardInfo] = {}
        self._completed: set[str] = set()
        self._in_current_shard: set[str] = set()
        # The shard being filled: its Parquet writer on the temp file, pending row-group rows.
        self._index: int | None = None
        self._parquet: pq.ParquetWriter | None = None
        self._pending: list[tuple[str, int, dict[str, bytes]]] = []
        self._shard_rows = 0
        self._shard_tokens = 0
        self._shard_histogram = np.zeros(COVERAGE_BINS, dtype=np.int64)
        self._shard_coverage_sum = 0.0
        self._shard_entries = 0
        self._closed = False

        self._lock = FolderLock(self.directory, purpose=f"teacher top-k writer, rank {rank} of {world_size}",
                                part=None if rank == 0 else f"r{rank:02d}").acquire()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_torn_files()
            with contextlib.suppress(FileNotFoundError):
                (self.directory / MANIFEST_NAME).unlink()  # the artifact is being modified
            if resume:
                self._resume()
            else:
                self._delete_rank_files()
        except BaseException:
            self._lock.release()
            raise

    # -- public API ------------------------------------------------------------------------------

    @property
    def completed_sample_ids(self) -> frozenset[str]:
        """Samples already in finished shards of this rank (from an earlier run or this one)."""
        return frozenset(self._completed)

    @property
    def manifest(self) -> Manifest:
        """This rank's manifest so far (finished shards only)."""
        return self._shardless_manifest.with_shards(self._shards[i] for i in sorted(self._shards))

    def add(self, sample_id: str, positions: Any, topk_ids: Any, topk_logprobs: Any, target_logprobs: Any,
            logz: Any = None, row_lengths: Any = None, counts: Any = None) -> None:
        """Encode one sample and append it to the current shard.

        Args:
            sample_id: the corpus sample id (unique in the artifact).
            positions: (n,) trained positions, increasing (docs/architecture.md).
            topk_ids: (n, k) teacher ids; topk_logprobs: (n, k) full-vocabulary log-probs,
                descending per row; target_logprobs: (n,) log-prob of the actual next token;
                logz: (n, T) the rows' log-normalizers at `source.logz_temperatures` (see
                `TopKArrays.logz`), or None when the only temperature is the capture one
                (its column is 0). numpy arrays or CPU torch tensors.
            row_lengths: (n,) entries per row for `top_p` / `sampled` artifacts (their ids and
                log-probs padded beyond it); counts: (n, k) draw counts (`sampled`); see
                `TopKArrays`. Must match the source's `capture_mode`.

        Raises:
            ValueError: bad shapes/values or a sample id already written; names the sample.
        """
        if self._closed:
            raise RuntimeError("TopKShardWriter.add after close/abort")
        if not isinstance(sample_id, str) or not sample_id:
            raise ValueError(f"sample_id must be a non-empty str, got {sample_id!r}")
        if sample_id in self._completed or sample_id in self._in_current_shard:
            raise ValueError(f"sample {sample_id} was already written to {self.directory} "
                             "(skip writer.completed_sample_ids when resuming)")
        try:
            scales = self.source.logz_scales
            if logz is None:
                if len(scales) > 1:
                    raise ValueError(f"logz is missing: the artifact stores log-normalizers at temperatures "
                                     f"{list(self.source.logz_temperatures)}")
                logz = np.zeros((len(positions), len(scales)), dtype=np.float32)
            sample = TopKArrays.from_any(positions, topk_ids, topk_logprobs, target_logprobs, logz, scales,
                                         row_lengths, counts)
            if sample.mode != self.source.capture_mode:
                raise ValueError(f"rows laid out for capture mode {sample.mode!r} (row_lengths "
                                 f"{'given' if row_lengths is not None else 'None'}, counts "
                                 f"{'given' if counts is not None else 'None'}), the artifact's is "
                                 f"{self.source.capture_mode!r}")
            k, vocab_size = self.source.k, self.source.vocab_size
            if sample.topk_ids.shape[1] != k:
                raise ValueError(f"topk_ids has k={sample.topk_ids.shape[1]}, the artifact has k={k}")
            if sample.topk_ids.size and sample.topk_ids.max() >= vocab_size:
                raise ValueError(f"topk_ids holds id {int(sample.topk_ids.max())} >= vocab_size {vocab_size}")
            payload = self.codec.encode(sample)
        except ValueError as error:
            raise ValueError(f"sample {sample_id}: {error}") from error

        histogram, coverage_sum = coverage_histogram(sample.topk_logprobs)
        self._pending.append((sample_id, sample.num_positions, payload))
        self._in_current_shard.add(sample_id)
        self._shard_rows += 1
        self._shard_tokens += sample.num_positions
        self._shard_histogram += histogram
        self._shard_coverage_sum += coverage_sum
        self._shard_entries += sample.num_entries
        if len(self._pending) >= self._shardless_manifest.samples_per_row_group:
            self._flush_row_group()
        if self._shard_tokens >= self._shardless_manifest.shard_tokens:
            self._finish_shard()

    def close(self) -> Manifest | None:
        """Finish the last shard and mark this rank complete.

        Returns:
            The final manifest when `world_size == 1` (then `manifest.json` is written), else
            None: rank 0 calls `merge_manifests(directory, world_size)` after a barrier.
        """
        if self._closed:
            raise RuntimeError("TopKShardWriter closed twice")
        try:
            if self._shard_rows:
                self._finish_shard()
            self._write_partial(complete=True)
            self._closed = True
            if self._shardless_manifest.world_size == 1:
                return merge_manifests(self.directory, 1)
            return None
        finally:
            if self._closed:
                self._lock.release()

    def abort(self) -> None:
        """Drop the shard in progress (its temp file); finished shards stay for a resume."""
        if self._closed:
            return
        self._closed = True
        if self._parquet is not None:
            with contextlib.suppress(Exception):
                self._parquet.close()
        self._parquet = None
        with contextlib.suppress(FileNotFoundError):
            temp_path_for(self.directory / shard_name(self.rank, self._current_index())).unlink()
        self._lock.release()

    def __enter__(self) -> "TopKShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._closed:  # closed or aborted explicitly inside the block
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- shards ----------------------------------------------------------------------------------

    def _current_index(self) -> int:
        """Lowest shard index this rank has not finished: where the next shard goes."""
        if self._index is None:
            index = 0
            while index in self._shards:
                index += 1
            self._index = index
        return self._index

    def _flush_row_group(self) -> None:
        if not self._pending:
            return
        if self._parquet is None:
            temp = temp_path_for(self.directory / shard_name(self.rank, self._current_index()))
            self._parquet = pq.ParquetWriter(temp, self._schema, **_PARQUET_OPTIONS)
        columns = {
            "sample_id": pa.array([row[0] for row in self._pending], pa.string()),
            "num_positions": pa.array([row[1] for row in self._pending], pa.int32()),
        }
        for column in self._columns:
            columns[column] = pa.array([row[2][column] for row in self._pending], pa.large_binary())
        self._parquet.write_table(pa.table(columns, schema=self._schema), row_group_size=len(self._pending))
        self._pending.clear()

    def _finish_shard(self) -> None:
        self._flush_row_group()
        index = self._current_index()
        final = self.directory / shard_name(self.rank, index)
        temp = temp_path_for(final)
        assert self._parquet is not None
        self._parquet.close()
        self._parquet = None
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        info = ShardInfo(file=final.name, rank=self.rank, index=index, rows=self._shard_rows,
                         trained_tokens=self._shard_tokens, bytes=temp.stat().st_size, sha256=sha256_file(temp),
                         coverage_histogram=tuple(self._shard_histogram.tolist()),
                         coverage_sum=self._shard_coverage_sum, entries=self._shard_entries)
        os.replace(temp, final)
        self._shards[index] = info
        self._completed |= self._in_current_shard
        self._in_current_shard = set()
        self._write_partial(complete=False)
        log.debug("wrote %s: %d samples, %d trained tokens, %d bytes", final.name, info.rows,
                  info.trained_tokens, info.bytes)
        self._index = None
        self._shard_rows = self._shard_tokens = 0
        self._shard_histogram = np.zeros(COVERAGE_BINS, dtype=np.int64)
        self._shard_coverage_sum = 0.0
        self._shard_entries = 0

    def _write_partial(self, complete: bool) -> None:
        data = self.manifest.to_dict()
        data["progress"] = {"rank": self.rank, "complete": complete}
        write_json_atomic(self.directory / partial_manifest_name(self.rank), data)

    # -- resume ----------------------------------------------------------------------------------

    def _rank_files(self) -> Iterable[Path]:
        for path in self.directory.iterdir():
            match = _SHARD_PATTERN.match(path.name)
            if match and int(match.group(1)) == self.rank:
                yield path

    def _remove_torn_files(self) -> None:
        """Temp files of this rank are writes a killed process never finished."""
        prefixes = (f"shard-r{self.rank:02d}-", f"{partial_manifest_name(self.rank)}.tmp-")
        for path in self.directory.iterdir():
            torn = ".tmp-" in path.name and path.name.startswith(prefixes)
            torn |= self.rank == 0 and path.name.startswith(f"{MANIFEST_NAME}.tmp-")
            if torn:
                log.info("removing torn temp file %s", path)
                path.unlink(missing_ok=True)

    def _delete_rank_files(self) -> None:
        for path in self._rank_files():
            path.unlink()
        (self.directory / partial_manifest_name(self.rank)).unlink(missing_ok=True)

    def _resume(self) -> None:
        partial_path = self.directory / partial_manifest_name(self.rank)
        recorded: list[ShardInfo] = []
        if partial_path.exists():
            previous = _read_partial(partial_path)[0]
            for name, value in sorted(self._shardless_manifest.header().items()):
                if previous.field_value(name) != value:
                    raise ManifestMismatchError(
                        f"{partial_path}: field {name!r} is {previous.field_value(name)!r} but this writer has "
                        f"{value!r}; delete {self.directory} (or open the writer with resume=False) to start over")
            recorded = list(previous.shards)
        kept = {}
        for info in recorded:
            path = self.directory / info.file
            if path.exists() and path.stat().st_size == info.bytes and sha256_file(path) == info.sha256:
                kept[info.index] = info
            else:
                log.warning("shard %s is missing or does not match its recorded sha256: it will be rewritten", path)
        for path in self._rank_files():
            if int(_SHARD_PATTERN.match(path.name).group(2)) not in kept:
                log.info("removing unrecorded or corrupt shard %s", path)
                path.unlink()
        self._shards = kept
        for info in kept.values():
            self._completed.update(read_shard_sample_ids(self.directory / info.file))
        if recorded:
            self._write_partial(complete=False)  # drop the shards just deleted from the record
            log.info("resuming %s rank %d: %d finished shards, %d samples", self.directory, self.rank,
                     len(kept), len(self._completed))


def _read_partial(path: Path) -> tuple[Manifest, int, bool]:
    """A rank's progress file: (manifest so far, rank, complete)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        progress = data.pop("progress")
        rank, complete = int(progress["rank"]), bool(progress["complete"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TopKStoreError(f"{path}: not a readable partial manifest ({error!r})") from error
    return Manifest.from_dict(data, origin=str(path)), rank, complete


def merge_manifests(directory: str | os.PathLike, world_size: int) -> Manifest:
    """Combine the ranks' complete partial manifests into `manifest.json` (rank 0, after a barrier).

    Checks that every rank finished, that all ranks wrote with the same settings, and that no
    sample id appears twice; shard files of ranks >= world_size (left from an earlier run with
    more processes) are deleted.

    Returns:
        The final manifest (shards ordered by rank, then index).

    Raises:
        TopKStoreError: a rank has not finished, or sample ids repeat.
        ManifestMismatchError: ranks disagree on a field.
    """
    directory = Path(directory)
    parts: list[Manifest] = []
    for rank in range(world_size):
        path = directory / partial_manifest_name(rank)
        if not path.exists():
            raise TopKStoreError(f"{path} is missing: rank {rank} of {world_size} has not written any progress")
        manifest, recorded_rank, complete = _read_partial(path)
        if recorded_rank != rank or not complete:
            raise TopKStoreError(f"{path}: rank {rank} has not finished (complete={complete})")
        if manifest.world_size != world_size:
            raise ManifestMismatchError(f"{path}: field 'world_size' is {manifest.world_size} but the merge "
                                        f"has {world_size}")
        if parts:
            reference = parts[0].header()
            for name, value in sorted(manifest.header().items()):
                if value != reference[name]:
                    raise ManifestMismatchError(f"{path}: field {name!r} is {value!r} but rank 0 has "
                                                f"{reference[name]!r}")
        parts.append(manifest)

    for path in sorted(directory.iterdir()):
        match = _SHARD_PATTERN.match(path.name) or _PARTIAL_PATTERN.match(path.name)
        if match and int(match.group(1)) >= world_size:
            log.warning("removing %s: left from an earlier run with more than %d ranks", path, world_size)
            path.unlink()

    shards = [shard for part in parts for shard in part.shards]
    seen: dict[str, str] = {}
    for shard in shards:
        for sample_id in read_shard_sample_ids(directory / shard.file):
            if sample_id in seen:
                raise TopKStoreError(f"sample {sample_id} is in both {seen[sample_id]} and {shard.file} "
                                     f"in {directory}: the ranks were given overlapping samples")
            seen[sample_id] = shard.file
    final = parts[0].with_shards(shards)
    write_json_atomic(directory / MANIFEST_NAME, final.to_dict())
    return final
