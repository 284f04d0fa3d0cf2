"""The `logquant_zstd` codec, the artifact's compact default (the codec interface and the exact
`raw` reference are in `topk_store.codec`).

About 12 bits per top-k entry (~195 bytes per trained token at k=128) on LLM-like distributions
over a 128k vocabulary, ~10 bits on real SmolLM2 outputs (docs/benchmarks.md). Four ideas:

1. *Token-major ids.* Instead of storing each row's k ids (rank order costs ~5.6 bits per
   entry just for the permutation), the sample is stored as occurrence lists: the sorted
   distinct ids of the sample, how many rows each id appears in, the first such row and the
   gaps between the following rows. Neighbouring positions share much of their top-k and
   frequent tokens recur all over a sample, so most occurrences cost a small row gap instead
   of a 17-bit id. Rank order is not stored: the decoder sorts each row by its decoded
   value (ties by ascending id), which is the descending log-prob order up to entries that
   quantize to the same value.
2. *Log-space quantization relative to the row max.* Each entry's distance below the row's
   top log-prob, `d = top - logprob >= 0`, is stored as the uint8 code
   `round(log1p(d / knee) / step)`: the absolute error grows with `d` (about
   `step / 2 * (knee + d)`), which is where the probability, and so the entry's weight in any
   KD loss, is small. Codes are stored as residuals against the row's median code, which
   removes most of the per-row spread (peaked vs flat rows) from the entropy.
3. *Exact top-k mass.* The row's top log-prob is stored (float16) not as captured but as the
   value that gives the decoded row the captured top-k mass `sum_k p_k`, so that mass, and a
   "rest of the vocabulary" bucket `1 - sum_k p_k`, survive the quantization; the price is a
   small shift of the whole row (the p-weighted mean rounding error, typically < 0.02 nats).

4. *Exact tempered top-k mass.* For each tempering scale `s` the row stores (float16) the
   tempered top-k log-mass `log sum_k p_s(k)` rather than `log Z_s`; the decoder derives
   `log Z_s = logsumexp_k(s * decoded l_k) - that mass`, so the tempered tail
   `1 - sum_k p_s(k)` decodes with float16 *relative* precision whatever the quantization of
   the individual entries (2 bytes per row and temperature before zstd).

Every integer stream is split into LEB128 byte planes (low 7 bits of every value, then the
next 7 bits of the values that need them, ...) and each plane is compressed by its own zstd
frame: zstd's Huffman stage then adapts to each plane's distribution. Encoding and decoding
are vectorized numpy over the whole sample (no per-row Python loop).
"""

from __future__ import annotations

import struct
import threading
from typing import Any, Mapping, NamedTuple

import numpy as np
import zstandard

from kd_pipeline.core.topk_store.codec import TopKArrays, TopKCodec, pad_rows, register_codec

__all__ = ["LogQuantZstdCodec"]


# ---------------------------------------------------------------------------------------------
# logquant_zstd

_HEADER = struct.Struct("<IHIB")  # rows, k, distinct ids in the sample, number of streams
_MAX_ROWS = 1 << 24  # keeps (row, code, id) packable in one uint64 sort key
_EMPTY = np.zeros(0, dtype=np.uint8)

# The streams are near-memoryless, so zstd serves as an entropy coder: the "fast" strategy with
# the longest minimum match (7) keeps it from spending bits on short chance matches (at level 9
# the value stream came out ~15% above its order-0 entropy); long repeats are still found.
# Frames are magicless (the payload header says what they are: 4 bytes less per stream).
# These parameters shape the output bytes, so one artifact is written with one set.
_ZSTD_PARAMETERS = dict(strategy=zstandard.STRATEGY_FAST, window_log=20, hash_log=16, chain_log=16,
                        search_log=1, min_match=7, target_length=0, write_checksum=0, write_content_size=1,
                        format=zstandard.FORMAT_ZSTD1_MAGICLESS)
_zstd_state = threading.local()  # zstd contexts are not thread-safe and cost ~30 us to create


def _zstd_compressor() -> zstandard.ZstdCompressor:
    if not hasattr(_zstd_state, "compressor"):
        params = zstandard.ZstdCompressionParameters(**_ZSTD_PARAMETERS)
        _zstd_state.compressor = zstandard.ZstdCompressor(compression_params=params)
    return _zstd_state.compressor


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_zstd_state, "decompressor"):
        _zstd_state.decompressor = zstandard.ZstdDecompressor(format=zstandard.FORMAT_ZSTD1_MAGICLESS)
    return _zstd_state.decompressor


def _varint_planes(values: np.ndarray) -> list[np.ndarray]:
    """Split non-negative integers (< 2**35) into LEB128 byte planes.

    Plane 0 holds the low 7 bits of every value, with the high bit set when more bits follow;
    plane j holds bits 7j..7j+6 of the values still continuing. Keeping the planes apart lets
    each zstd frame model one distribution (the many small gaps vs the few large ones).
    """
    remaining = values.astype(np.uint64, copy=False)
    planes = []
    while True:
        continues = remaining >= 0x80
        planes.append(((remaining & 0x7F) | (continues.astype(np.uint64) << 7)).astype(np.uint8))
        remaining = remaining[continues] >> 7
        if remaining.size == 0:
            return planes


def _from_varint_planes(planes: list[np.ndarray], count: int) -> np.ndarray:
    """Inverse of `_varint_planes`: `count` int64 values."""
    plane = planes[0]
    if plane.size != count:
        raise ValueError(f"corrupt logquant_zstd payload: varint stream holds {plane.size} values, expected {count}")
    values = (plane & 0x7F).astype(np.int64)
    continuing = np.flatnonzero(plane & 0x80)  # indices of the values that have more planes
    shift = 7
    for plane in planes[1:]:
        if plane.size != continuing.size:
            raise ValueError("corrupt logquant_zstd payload: varint plane sizes disagree")
        values[continuing] |= (plane & 0x7F).astype(np.int64) << shift
        continuing = continuing[np.flatnonzero(plane & 0x80)]
        shift += 7
    return values


def _float16_planes(values: np.ndarray) -> list[np.ndarray]:
    """float16 values as two byte planes: high bytes (sign, exponent: compress well) and low bytes."""
    bits = np.asarray(values, dtype=np.float64).astype("<f2").view("<u2")
    return [(bits >> 8).astype(np.uint8), (bits & 0xFF).astype(np.uint8)]


def _from_float16_planes(high: np.ndarray, low: np.ndarray, count: int) -> np.ndarray:
    if high.size != count or low.size != count:
        raise ValueError(f"corrupt logquant_zstd payload: float16 stream holds {high.size} values, expected {count}")
    bits = (high.astype(np.uint16) << 8) | low
    return bits.view("<f2").astype(np.float32)


def _row_logsumexp(values: np.ndarray) -> np.ndarray:
    """(n, k) -> (n,) log sum_k exp, max-shifted (rows have a finite max)."""
    top = values.max(axis=1, keepdims=True)
    return top[:, 0] + np.log(np.exp(values - top).sum(axis=1))


def _varint_bytes(value: int) -> bytes:
    """LEB128 bytes of one non-negative int (header fields)."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(buffer: memoryview, offset: int) -> tuple[int, int]:
    """One LEB128 int at `offset` -> (value, offset after it)."""
    value = shift = 0
    while True:
        if offset >= len(buffer):
            raise ValueError("corrupt logquant_zstd payload: header runs past the end")
        byte = buffer[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, offset


class _FrameCursor:
    """Hands out the decompressed frames in the order the encoder wrote them."""

    def __init__(self, frames: list[np.ndarray]):
        self._frames = frames
        self._next = 0

    def take(self) -> np.ndarray:
        if self._next >= len(self._frames):
            raise ValueError("corrupt logquant_zstd payload: fewer frames than streams")
        frame = self._frames[self._next]
        self._next += 1
        return frame

    def remaining(self) -> int:
        return len(self._frames) - self._next

    def varint(self, count: int) -> np.ndarray:
        """Decode one varint stream of `count` values; its plane count follows from the data."""
        planes = [self.take()]
        while count and np.any(planes[-1] & 0x80):
            planes.append(self.take())
        return _from_varint_planes(planes, count)


@register_codec
class LogQuantZstdCodec(TopKCodec):
    """Compact default codec: token-major ids, log-space uint8 value codes, zstd per byte plane.

    Args:
        step: quantization step in `log1p(d / knee)` units, `d` = nats below the row's top
            log-prob. Smaller is more precise and larger. The default 0.08 keeps the KD loss
            within 1% of `raw` for a student ~0.3 nats/token (KL) from its teacher; the loss
            error grows about as `step**2` and, in absolute terms, does not depend on the
            student (docs/benchmarks.md).
        knee: nats; for `d` below the knee the step in `d` is about `step * knee`, above it the
            step grows about linearly with `d` (constant relative precision).

    Bounds, per entry: decoded minus raw log-prob is the quantization error, at most
    `knee * expm1(step / 2) * (1 + d / knee)` (about `step / 2 * (knee + d)`), plus one shift
    per row (float16 rounding of the row offset, plus the p-weighted mean quantization error,
    which renormalizing to the exact top-k mass moves into every entry). Ids are exact as a set
    per row; the row order is exact except among entries whose decoded values are equal
    (those come in ascending id order). Entries more than `max_distance` nats below the top
    (about 7e8 at the defaults: in effect -inf) decode to `top - max_distance`.
    """

    name = "logquant_zstd"
    columns = ("payload",)

    def __init__(self, step: float = 0.08, knee: float = 1.0):
        if not 0.01 <= float(step) <= 1.0:
            raise ValueError(f"logquant_zstd step must be in [0.01, 1], got {step}")
        if not 0.0 < float(knee) <= 100.0:
            raise ValueError(f"logquant_zstd knee must be in (0, 100], got {knee}")
        self.step = float(step)
        self.knee = float(knee)
        codes = np.arange(256, dtype=np.float64)
        code_value = -self.knee * np.expm1(codes * self.step)  # value below the top, 0 for code 0
        # Decode is a table lookup plus one per-row offset; the float64 weights let the encoder
        # pick the offset that gives the decoded row its exact top-k mass.
        self._code_value = code_value.astype(np.float32)
        self._code_weight = np.exp(self._code_value.astype(np.float64))
        self.max_distance = float(-code_value[-1])

    def settings(self) -> dict[str, Any]:
        return {"knee": self.knee, "step": self.step}

    def quantize(self, topk_logprobs: np.ndarray) -> np.ndarray:
        """(n, k) log-probs, descending per row -> (n, k) uint8 codes (0 = the row's top)."""
        logprobs = topk_logprobs.astype(np.float64)
        distance = logprobs[:, :1] - logprobs  # >= 0; +inf for -inf entries
        scaled = np.log1p(distance / self.knee) / self.step
        return np.rint(np.minimum(scaled, 255.0)).astype(np.uint8)

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, sample: TopKArrays) -> dict[str, bytes]:
        _check_encodable(sample)
        n, k = sample.topk_ids.shape
        logprobs = sample.topk_logprobs
        # Variable rows (`top_p`, `sampled`) enter with their stored entries only.
        lengths = np.full(n, k, np.int64) if sample.row_lengths is None else sample.row_lengths.astype(np.int64)
        valid = None if sample.row_lengths is None else np.arange(k)[None, :] < lengths[:, None]
        occurrences = _token_major(sample.topk_ids, valid)

        codes = self.quantize(logprobs)
        # Median code of each row (codes ascend along a row): subtracting it (mod 256, lossless)
        # takes the peaked-vs-flat spread between rows out of the value stream (~1 bit per entry less).
        reference = codes[np.arange(n), lengths // 2]
        residuals = (codes - reference[:, None]).reshape(-1)[occurrences.order]  # uint8 arithmetic wraps mod 256

        # Per-row offset = decoded log-prob of the top: chosen so that the decoded row carries
        # exactly the raw top-k mass, log sum_k p_k (a K+1 "rest" bucket stays exact).
        logprobs64 = logprobs.astype(np.float64)
        mass = logprobs64[:, 0] + np.log(np.exp(logprobs64 - logprobs64[:, :1]).sum(axis=1))
        weights = self._code_weight[codes]
        top = mass - np.log(weights.sum(axis=1) if valid is None else np.where(valid, weights, 0.0).sum(axis=1))
        position_steps = np.diff(sample.positions.astype(np.int64), prepend=-1) - 1
        tempered_mass = self._tempered_topk_logmass(logprobs64, sample.logz, sample.logz_scales)
        # Variable rows: their lengths, and for sampled rows the draw counts in token-major order.
        variable = [] if valid is None else [*_varint_planes(lengths - 1)]
        if sample.counts is not None:
            variable += _varint_planes(sample.counts.reshape(-1)[occurrences.order].astype(np.int64) - 1)

        streams: list[np.ndarray] = [
            *_varint_planes(position_steps),
            *_float16_planes(sample.target_logprobs),
            *_float16_planes(top),
            reference,
            *_varint_planes(np.diff(occurrences.distinct_ids, prepend=-1) - 1),
            *_varint_planes(occurrences.counts - 1),
            *_varint_planes(occurrences.first_rows),
            *_varint_planes(occurrences.row_gaps),
            residuals,
            *(plane for column in tempered_mass for plane in _float16_planes(column)),
            *variable,
        ]
        return {"payload": _pack_streams(streams, n, k, occurrences.distinct_ids.size)}

    # -- decoding -------------------------------------------------------------------------------

    @staticmethod
    def _tempered_topk_logmass(logprobs64: np.ndarray, logz: np.ndarray, scales: tuple[float, ...]) -> list:
        """Per scale s, (n,) `log sum_k p_s(k) = logsumexp_k(s * l_k) - log Z_s` (float64). Kept at
        s = 1 too: there it repairs the float16 rounding of the row offset, so that a tail of
        1e-4 next to a top log-prob of -1 still decodes to 1e-4 (the decoded `log Z_1` is then
        that small correction instead of 0)."""
        return [_row_logsumexp(scale * logprobs64) - logz[:, j].astype(np.float64)
                for j, scale in enumerate(scales)]

    def decode(self, payload: Mapping[str, Any], num_positions: int, k: int,
               logz_scales: tuple[float, ...] = (), mode: str = "topk") -> TopKArrays:
        n, stored_k, num_distinct, frames = _read_frames(payload["payload"])
        if n != num_positions or stored_k != k:
            raise ValueError(f"logquant_zstd payload holds {n} rows of k={stored_k}, expected {num_positions} of k={k}")
        streams = _FrameCursor(frames)

        positions = np.cumsum(streams.varint(n) + 1) - 1
        target_logprobs = _from_float16_planes(streams.take(), streams.take(), n)
        top = _from_float16_planes(streams.take(), streams.take(), n)
        reference = streams.take()
        distinct_ids = np.cumsum(streams.varint(num_distinct) + 1) - 1
        counts = streams.varint(num_distinct) + 1
        entries = int(counts.sum())
        first_rows = streams.varint(num_distinct)
        row_gaps = streams.varint(entries - num_distinct)
        residuals = streams.take()
        tempered_mass = [_from_float16_planes(streams.take(), streams.take(), n) for _ in logz_scales]
        lengths = None if mode == "topk" else streams.varint(n) + 1
        draws = streams.varint(entries) + 1 if mode == "sampled" else None
        if streams.remaining():
            raise ValueError(f"corrupt logquant_zstd payload: {streams.remaining()} frames left over "
                             f"(expected log-normalizers at {len(logz_scales)} temperatures, mode {mode})")
        expected_entries = n * k if lengths is None else int(lengths.sum())
        if reference.size != n or residuals.size != entries or entries != expected_entries:
            raise ValueError("corrupt logquant_zstd payload: stream sizes do not match the rows' entries")
        if lengths is not None and n and (lengths.min() < 1 or lengths.max() > k):
            raise ValueError(f"corrupt logquant_zstd payload: a row length outside [1, k={k}]")
        if entries == 0:
            return TopKArrays(positions.astype(np.int32), np.zeros((0, k), np.int64),
                              np.zeros((0, k), np.float32), target_logprobs,
                              np.zeros((0, len(logz_scales)), np.float32), tuple(logz_scales),
                              None if lengths is None else lengths.astype(np.int32),
                              None if draws is None else np.zeros((0, k), np.int32))

        # Row of every occurrence, in token-major order: each id's run starts at its first row
        # and advances by gap + 1; one cumulative sum with a per-run correction does all runs.
        first_index = np.cumsum(counts) - counts
        row_steps = np.empty(entries, dtype=np.int64)
        continuing = np.ones(entries, dtype=bool)
        continuing[first_index] = False
        row_steps[continuing] = row_gaps + 1
        row_steps[first_index] = first_rows
        running = np.cumsum(row_steps, out=row_steps)
        rows = running - np.repeat(running[first_index] - first_rows, counts)
        if rows.min() < 0 or rows.max() >= n:
            raise ValueError("corrupt logquant_zstd payload: an occurrence row is out of range")
        codes = residuals + reference[rows]  # uint8: wraps mod 256, undoing the encoder
        topk_ids, row_codes, draws = self._row_major(rows, codes, distinct_ids, counts, n, k, lengths, draws)
        topk_logprobs = self._code_value[row_codes]
        topk_logprobs += top[:, None]
        if lengths is not None:
            pad_rows(topk_ids, topk_logprobs, lengths, draws)
        logz = np.empty((n, len(logz_scales)), dtype=np.float32)
        decoded64 = topk_logprobs.astype(np.float64) if logz_scales else None
        for j, scale in enumerate(logz_scales):  # the decoded row carries the exact tempered mass
            logz[:, j] = _row_logsumexp(scale * decoded64) - tempered_mass[j]
        return TopKArrays(positions.astype(np.int32), topk_ids, topk_logprobs, target_logprobs, logz,
                          tuple(logz_scales), None if lengths is None else lengths.astype(np.int32), draws)

    @staticmethod
    def _row_major(rows: np.ndarray, codes: np.ndarray, distinct_ids: np.ndarray, counts: np.ndarray, n: int,
                   k: int, lengths: np.ndarray | None, draws: np.ndarray | None):
        """(ids (n, k), codes (n, k) uint8, draw counts (n, k) or None) from the token-major
        occurrences; each row sorted by code, ties by id (variable rows left-aligned, the
        padding slots still to fill)."""
        # Sort all entries by (row, code, id) with one uint64 value sort; code ascending is
        # log-prob descending. The id and code come back out of the sorted keys, no gather.
        # (Built in place: at k=128 the temporaries otherwise spill out of the L2 cache.)
        id_bits = max(1, int(distinct_ids[-1]).bit_length())
        keys = rows.view(np.uint64)
        keys <<= np.uint64(8)
        keys |= codes
        keys <<= np.uint64(id_bits)
        keys |= np.repeat(distinct_ids.view(np.uint64), counts)
        if draws is None:
            keys.sort()
        else:  # the draw counts follow their entries: an argsort (keys are distinct: ids are, per row)
            permutation = np.argsort(keys)
            keys, draws = keys[permutation], draws[permutation]
        row_shift = np.uint64(id_bits + 8)
        if lengths is None:
            keys = keys.reshape(n, k)
            expected_rows = np.arange(n, dtype=np.uint64)
            # Sorted keys: if every row's first and last entry carry that row, every row has k entries.
            if not (np.array_equal(keys[:, 0] >> row_shift, expected_rows)
                    and np.array_equal(keys[:, -1] >> row_shift, expected_rows)):
                raise ValueError("corrupt logquant_zstd payload: rows do not each hold k entries")
        else:
            if not np.array_equal(np.bincount((keys >> row_shift).astype(np.int64), minlength=n), lengths):
                raise ValueError("corrupt logquant_zstd payload: rows do not hold their stored lengths")
            starts = np.cumsum(lengths) - lengths
            flat = np.repeat(np.arange(n) * k - starts, lengths) + np.arange(keys.size)
            padded = np.zeros(n * k, np.uint64)
            padded[flat] = keys
            keys = padded.reshape(n, k)
            if draws is not None:
                padded_draws = np.zeros(n * k, np.int32)
                padded_draws[flat] = draws
                draws = padded_draws.reshape(n, k)
        topk_ids = (keys & np.uint64((1 << id_bits) - 1)).view(np.int64)
        keys >>= np.uint64(id_bits)
        return topk_ids, keys.astype(np.uint8), draws


def _read_frames(payload) -> tuple[int, int, int, list[np.ndarray]]:
    """(rows, k, distinct ids, the decompressed byte frames) of one encoded sample."""
    buffer = memoryview(payload).cast("B")
    n, stored_k, num_distinct, num_frames = _HEADER.unpack_from(buffer, 0)
    decompressor = _zstd_decompressor()
    offset = _HEADER.size
    lengths = []
    for _ in range(num_frames):
        value, offset = _read_varint(buffer, offset)
        lengths.append(value)
    frames = []
    for value in lengths:
        length, is_raw = value >> 1, value & 1
        chunk = buffer[offset:offset + length]
        frames.append(np.frombuffer(chunk if is_raw else decompressor.decompress(chunk), np.uint8))
        offset += length
    if offset != len(buffer):
        raise ValueError(f"corrupt logquant_zstd payload: {len(buffer)} bytes, the header accounts for {offset}")
    return n, stored_k, num_distinct, frames


def _check_encodable(sample: TopKArrays) -> None:
    """What the compact codec's layout can hold (shape limits, finite sorted rows)."""
    n, k = sample.topk_ids.shape
    logprobs = sample.topk_logprobs
    if not 1 <= k < 1 << 16 or n >= _MAX_ROWS or n * k >= 1 << 32:
        raise ValueError(f"logquant_zstd needs 1 <= k < 65536, fewer than {_MAX_ROWS} rows and n * k < 2**32, "
                         f"got {n} rows of k={k}")
    if np.isnan(logprobs).any() or (n and not np.isfinite(logprobs[:, 0]).all()):
        raise ValueError("logquant_zstd needs no NaN log-probs and a finite top log-prob in every row")
    if np.any(logprobs[:, 1:] > logprobs[:, :-1]):
        raise ValueError("logquant_zstd needs topk_logprobs sorted descending within each row")


class _Occurrences(NamedTuple):
    """A sample's stored entries in token-major order (sorted by (id, row)).

    Attributes:
        order: (E,) flat index `row * k + slot` of each occurrence.
        distinct_ids: (D,) the distinct ids, ascending.
        counts: (D,) occurrences of each.
        first_rows: (D,) the row of each id's first occurrence.
        row_gaps: (E - D,) rows skipped between an id's consecutive occurrences.
    """

    order: np.ndarray
    distinct_ids: np.ndarray
    counts: np.ndarray
    first_rows: np.ndarray
    row_gaps: np.ndarray


def _token_major(topk_ids: np.ndarray, valid: np.ndarray | None) -> _Occurrences:
    """The (n, k) ids' occurrences (`valid` slots only, all when None) by (id, row). Packing the
    id above the flat index lets numpy's (SIMD) value sort do it and hands back the permutation
    for free.

    Raises:
        ValueError: an id occurs twice in one row.
    """
    n, k = topk_ids.shape
    flat_index = (np.arange(n * k, dtype=np.uint64) if valid is None
                  else np.flatnonzero(valid.reshape(-1)).astype(np.uint64))
    entries = int(flat_index.size)
    index_bits = max(1, int(n * k - 1).bit_length())
    keys = topk_ids.reshape(-1)[flat_index.astype(np.int64)].astype(np.uint64) << np.uint64(index_bits)
    keys |= flat_index
    keys.sort()
    order = (keys & np.uint64((1 << index_bits) - 1)).astype(np.int64)
    ids_sorted = (keys >> np.uint64(index_bits)).astype(np.int64)
    rows_sorted = order // k
    is_first = np.empty(entries, dtype=bool)
    is_first[:1] = True
    np.not_equal(ids_sorted[1:], ids_sorted[:-1], out=is_first[1:])
    first_index = np.flatnonzero(is_first)
    row_gaps = np.diff(rows_sorted)[~is_first[1:]] - 1
    if row_gaps.size and row_gaps.min() < 0:
        raise ValueError("topk_ids holds the same token id twice in one row")
    return _Occurrences(order, ids_sorted[first_index], np.diff(np.append(first_index, entries)),
                        rows_sorted[first_index], row_gaps)


def _pack_streams(streams: list[np.ndarray], n: int, k: int, num_distinct: int) -> bytes:
    """Header + per-stream lengths + frames. Each stream is a zstd frame, or its raw bytes when
    zstd would not make it smaller (short per-row streams of short samples). The header lists,
    per stream, a varint of `length * 2 + is_raw`."""
    compressor = _zstd_compressor()
    frames, lengths = [], bytearray()
    for stream in streams:
        raw = stream.tobytes()
        frame = compressor.compress(raw) if raw else b""
        is_raw = len(frame) >= len(raw)
        frames.append(raw if is_raw else frame)
        lengths += _varint_bytes(len(frames[-1]) * 2 + is_raw)
    return _HEADER.pack(n, k, num_distinct, len(frames)) + bytes(lengths) + b"".join(frames)
