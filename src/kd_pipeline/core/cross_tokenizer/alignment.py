"""Byte-span alignment of two tokenizations of the same text.

Each token is reduced to the UTF-8 byte offset where it ends in the text. Fast tokenizers report
*character* offsets, which are converted with a cumulative UTF-8 length table; tokens that share
or overlap one character span (a byte-level BPE cutting an emoji into byte pieces, a SentencePiece
`▁` reported on the first letter of the word) are given consecutive ends from the right, using
each token's byte length, when the lengths add up, and else all get the cluster's end (they then
always fall in one group, which is the safe outcome). Zero-width tokens (special tokens added by
a post-processor) end where the previous token ended, so they join its group.

Groups (`align_by_byte_ends`) are the smallest runs of teacher tokens and student tokens that end
on the same byte: two pointers advance the side whose current token ends earlier, and a group
closes when both end at the same byte (GOLD's `_align_by_byte_offsets` rule). Further tokens of
either side that end on that same byte (zero-width ones) join the closing group. Tokens after the
last common boundary (texts truncated at different points) form no group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from kd_pipeline.core.cross_tokenizer.token_bytes import TokenBytes, backend_of, token_bytes


def char_to_byte_table(text: str) -> np.ndarray:
    """(len(text) + 1,) int64: byte offset of each character index (and of the end)."""
    table = np.zeros(len(text) + 1, dtype=np.int64)
    if text:
        table[1:] = np.cumsum([len(ch.encode("utf-8")) for ch in text])
    return table


def token_byte_ends(
    text: str, char_offsets: Sequence[tuple[int, int]], byte_lengths: Sequence[int]
) -> np.ndarray:
    """Byte offset at which each token of `text` ends.

    Args:
        text: the encoded text.
        char_offsets: per token (start, end) character offsets from the fast tokenizer.
        byte_lengths: per token number of bytes it stands for (`TokenBytes.byte_length`; 0 for
            special tokens).

    Returns:
        (n,) int64 non-decreasing byte ends.

    Raises:
        ValueError: lengths differ, an offset lies outside the text, or the ends go backwards
            (names the token index).
    """
    n = len(char_offsets)
    if len(byte_lengths) != n:
        raise ValueError(f"{n} offsets but {len(byte_lengths)} byte lengths")
    table = char_to_byte_table(text)
    offsets = np.asarray(char_offsets, dtype=np.int64).reshape(n, 2)
    if n and (offsets.min() < 0 or offsets.max() > len(text)):
        bad = int(np.flatnonzero((offsets < 0).any(1) | (offsets > len(text)).any(1))[0])
        raise ValueError(
            f"token {bad}: character offsets {tuple(offsets[bad].tolist())} outside the text "
            f"(length {len(text)})"
        )
    starts, ends = table[offsets[:, 0]], table[offsets[:, 1]]
    lengths = np.asarray(byte_lengths, dtype=np.int64)
    out = ends.copy()
    previous_end = 0
    i = 0
    while i < n:
        if starts[i] == ends[i]:  # zero-width (special) token
            out[i] = max(starts[i], previous_end)
            previous_end = out[i]
            i += 1
            continue
        stop, cluster_end = i + 1, ends[i]
        while stop < n and starts[i] <= starts[stop] < cluster_end and starts[stop] != ends[stop]:
            cluster_end = max(cluster_end, ends[stop])
            stop += 1
        if stop - i > 1:
            # Ends from the right: token t ends where the bytes of the tokens after it begin.
            suffix = np.concatenate([np.cumsum(lengths[i + 1:stop][::-1])[::-1], [0]])
            assigned = cluster_end - suffix
            if (assigned >= starts[i]).all() and (lengths[i:stop] > 0).all():
                out[i:stop] = assigned
            else:
                out[i:stop] = cluster_end
        else:
            out[i] = cluster_end
        previous_end = out[stop - 1]
        i = stop
    backwards = np.flatnonzero(np.diff(out) < 0) if n > 1 else np.array([], dtype=np.int64)
    if backwards.size:
        bad = int(backwards[0]) + 1
        raise ValueError(
            f"token {bad}: byte end {int(out[bad])} is before the previous token's end "
            f"{int(out[bad - 1])} (offsets not monotonic)"
        )
    return out


def encode_with_byte_ends(
    tokenizer: Any,
    text: str,
    add_special_tokens: bool = False,
    pieces: TokenBytes | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Encodes `text` and returns `(ids, byte_ends)`, both (n,) int64.

    Args:
        tokenizer: a fast tokenizer (`tokenizers.Tokenizer` or `PreTrainedTokenizerFast`).
        text: the text.
        add_special_tokens: whether the post-processor adds BOS/EOS (they are zero-width).
        pieces: the tokenizer's `TokenBytes` (computed when None; pass it when encoding many
            texts).
    """
    backend = backend_of(tokenizer)
    pieces = pieces if pieces is not None else token_bytes(backend)
    encoding = backend.encode(text, add_special_tokens=add_special_tokens)
    ids = np.asarray(encoding.ids, dtype=np.int64)
    lengths = [pieces.byte_length(int(token_id)) for token_id in ids]
    return ids, token_byte_ends(text, encoding.offsets, lengths)


@dataclass(frozen=True)
class AlignedGroups:
    """Groups of teacher and student tokens that cover the same bytes.

    Group g holds teacher tokens `teacher_start[g] : teacher_stop[g]` and student tokens
    `student_start[g] : student_stop[g]` (indices into the two token sequences) and ends at
    byte `byte_end[g]`; groups are in text order and both index ranges are contiguous and
    non-empty.
    """

    teacher_start: np.ndarray
    teacher_stop: np.ndarray
    student_start: np.ndarray
    student_stop: np.ndarray
    byte_end: np.ndarray

    @property
    def num_groups(self) -> int:
        return int(self.byte_end.shape[0])

    def pairs(self) -> list[tuple[list[int], list[int]]]:
        """[(teacher indices, student indices)] per group (for tests and debugging)."""
        return [
            (list(range(ts, te)), list(range(ss, se)))
            for ts, te, ss, se in zip(
                self.teacher_start.tolist(), self.teacher_stop.tolist(),
                self.student_start.tolist(), self.student_stop.tolist(),
            )
        ]


def align_by_byte_ends(teacher_ends: Sequence[int], student_ends: Sequence[int]) -> AlignedGroups:
    """Smallest groups of tokens whose byte boundaries coincide (see the module docstring).

    Args:
        teacher_ends: (n,) non-decreasing byte ends of the teacher tokens.
        student_ends: (m,) non-decreasing byte ends of the student tokens.

    Returns:
        The `AlignedGroups`.
    """
    t_ends = np.asarray(teacher_ends, dtype=np.int64)
    s_ends = np.asarray(student_ends, dtype=np.int64)
    n, m = len(t_ends), len(s_ends)
    columns: list[list[int]] = [[], [], [], [], []]
    i = j = t_first = s_first = 0
    while i < n and j < m:
        if t_ends[i] < s_ends[j]:
            i += 1
        elif s_ends[j] < t_ends[i]:
            j += 1
        else:
            boundary = t_ends[i]
            while i < n and t_ends[i] == boundary:
                i += 1
            while j < m and s_ends[j] == boundary:
                j += 1
            for column, value in zip(columns, (t_first, i, s_first, j, boundary)):
                column.append(int(value))
            t_first, s_first = i, j
    arrays = [np.asarray(column, dtype=np.int64) for column in columns]
    return AlignedGroups(*arrays)


def trained_byte_count(byte_ends: np.ndarray, loss_mask: np.ndarray) -> int:
    """Bytes of text covered by the trained tokens (token t covers `ends[t-1]:ends[t]`).

    Bits per byte = (sum of the trained tokens' NLL in nats) / (ln 2 * this): comparable across
    tokenizers on the same text, unlike per-token NLL.
    """
    ends = np.asarray(byte_ends, dtype=np.int64)
    sizes = np.diff(np.concatenate([[0], ends]))
    return int(sizes[np.asarray(loss_mask).astype(bool)].sum())
