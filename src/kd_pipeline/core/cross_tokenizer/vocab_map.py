"""Vocabulary map of a (teacher tokenizer, student tokenizer) pair: both vocabularies onto classes.

The cross-tokenizer loss compares, at the first token of an aligned span (`alignment.py`), the
teacher's distribution over its next token with the student's over its next token. Both are
distributions over "how the text continues"; the map says which events of the two vocabularies
are the same. It puts every teacher id and every student id into a *class*:

1. **Exact matches.** Entries that stand for the same bytes (`token_bytes.py` strips the
   byte-level `Ġ`/byte table, SentencePiece `▁` and `<0xNN>` spellings) share a class.
2. **Multi-token projection** (X-Token's idea, arXiv 2605.21699, made a partition here). An
   entry with no exact match is re-tokenized by the *other* tokenizer (so its pre-tokenizer
   rules hold: a digit-splitting teacher cuts `" 2024"` into `Ġ 2 0 2 4`); when that does not
   spell the same bytes (a SentencePiece tokenizer prepending `▁`, a partial UTF-8 byte piece),
   the fewest-pieces split over the other vocabulary is used (ties: longest first piece). If it
   has at most `max_pieces` pieces, the entry joins the class of the *first piece*. Student
   `"2024"` against a digit-splitting teacher joins the teacher's `"2"`, because "the student
   emits `2024`" is one way of "the teacher's next token is `2`"; teacher `" their"` against a
   student without it joins the student's `" the"`. So the teacher's
   probability of `"2"` is compared with the student's total probability of `"2"`, `"20"`,
   `"2024"`, ... and multi-digit numerals are matched instead of being thrown into the
   unmatched set (the failure X-Token reports for partition-only maps). Within a class the two
   sides' masses are summed, so the projection is one-hot: a class is one bucket of the KD loss.
   The alternative, X-Token's weighted rows (weight `0.9 * 0.1**i` on the i-th piece, rows
   renormalized), also sends mass to later pieces, which are events of *later* positions; we do
   not do that.
3. **Special tokens** have no bytes; they are paired by equal content (`<|endoftext|>` on both
   sides) or by explicit `special_pairs` (e.g. the two EOS ids).

Classes holding ids of both sides are *matched* (exact KD on their mass); the rest are
unmatched (sorted-probability ULD term). When both tokenizers spell every id the same, the map
is the identity (class = id), so the loss reduces to the same-tokenizer one.

Stored as safetensors (`teacher_class`, `student_class`, int64) with metadata holding the two
tokenizers' fingerprints, the parameters and a sha256 `content_hash` of all of it, written
atomically and verified on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from kd_pipeline.core.atomic import atomic_path, canonical_json
from kd_pipeline.core.cross_tokenizer.token_bytes import TokenBytes, backend_of, token_bytes
from kd_pipeline.core.params import require_int

VOCAB_MAP_VERSION = 1
VOCAB_MAP_FILE = "vocab_map.safetensors"
"""File name of the map inside the pipeline's vocab_map folder."""
DEFAULT_MAX_PIECES = 8
"""X-Token cuts re-tokenizations at 4 pieces; a digit-splitting teacher spells a space and a
4-digit year in 5, so the default is larger (the cap only bounds how far classes merge)."""


def fingerprint(pieces: TokenBytes) -> str:
    """sha256 of a tokenizer's id -> bytes table (and special contents): equal iff same spelling."""
    digest = hashlib.sha256(pieces.kind.encode())
    for token_id, piece in enumerate(pieces.pieces):
        if piece is None:
            marker = pieces.special_contents.get(token_id, "").encode("utf-8")
            digest.update(b"S" + len(marker).to_bytes(4, "little") + marker)
        else:
            digest.update(b"B" + len(piece).to_bytes(4, "little") + piece)
    return digest.hexdigest()


class _UnionFind:
    def __init__(self, size: int):
        self.parent = list(range(size))

    def find(self, node: int) -> int:
        root = node
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[node] != root:
            self.parent[node], node = root, self.parent[node]
        return root

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)


def _byte_index(pieces: TokenBytes) -> dict[bytes, list[int]]:
    index: dict[bytes, list[int]] = {}
    for token_id, piece in enumerate(pieces.pieces):
        if piece:
            index.setdefault(piece, []).append(token_id)
    return index


def first_piece(data: bytes, vocabulary: Mapping[bytes, Any], max_pieces: int, max_len: int) -> bytes | None:
    """First piece of the decomposition of `data` into the fewest entries of `vocabulary`.

    Ties between equally short decompositions are broken by the longest first piece. Returns
    None when `data` needs more than `max_pieces` entries (or cannot be split at all).
    """
    length = len(data)
    inf = max_pieces + 1
    fewest = [inf] * (length + 1)  # fewest[i]: pieces needed for data[i:]
    fewest[length] = 0
    first_len = [0] * (length + 1)
    for start in range(length - 1, -1, -1):
        for size in range(min(max_len, length - start), 0, -1):  # longest first on ties
            rest = fewest[start + size]
            if rest + 1 < fewest[start] and data[start:start + size] in vocabulary:
                fewest[start], first_len[start] = rest + 1, size
    if fewest[0] > max_pieces:
        return None
    return data[: first_len[0]]


@dataclass(frozen=True)
class ProjectionTensors:
    """The map as the loss uses it (torch, on one device).

    Attributes:
        teacher_class: (V_t,) int64 class of each teacher id.
        class_student_ptr: (C + 1,) int64 CSR row pointers of the student members of each class.
        class_student_ids: (V_s,) int64 student ids sorted by class.
        class_matched: (C,) bool, the class has members on both sides.
        student_unmatched: (V_s,) bool, the student id's class has no teacher member.
    """

    teacher_class: torch.Tensor
    class_student_ptr: torch.Tensor
    class_student_ids: torch.Tensor
    class_matched: torch.Tensor
    student_unmatched: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(self.class_matched.shape[0])


@dataclass(frozen=True)
class VocabMap:
    """Classes of teacher and student ids (see the module docstring).

    Attributes:
        teacher_class: (V_t,) int64 class id of each teacher id, in [0, num_classes).
        student_class: (V_s,) int64 class id of each student id.
        metadata: string metadata (version, fingerprints, kinds, max_pieces, counts).
    """

    teacher_class: np.ndarray
    student_class: np.ndarray
    metadata: dict[str, str]

    @property
    def num_classes(self) -> int:
        return int(max(self.teacher_class.max(initial=-1), self.student_class.max(initial=-1)) + 1)

    @property
    def content_hash(self) -> str:
        """sha256 of the class arrays and the metadata (the run records it)."""
        return _content_hash(self.teacher_class, self.student_class, self.metadata)

    @property
    def is_identity(self) -> bool:
        return bool(
            self.teacher_class.shape == self.student_class.shape
            and np.array_equal(self.teacher_class, np.arange(len(self.teacher_class)))
            and np.array_equal(self.student_class, self.teacher_class)
        )

    def class_has_teacher(self) -> np.ndarray:
        has = np.zeros(self.num_classes, dtype=bool)
        has[self.teacher_class] = True
        return has

    def class_has_student(self) -> np.ndarray:
        has = np.zeros(self.num_classes, dtype=bool)
        has[self.student_class] = True
        return has

    def matched_teacher_ids(self) -> np.ndarray:
        """Boolean (V_t,): the teacher id's class has a student member."""
        return self.class_has_student()[self.teacher_class]

    def matched_student_ids(self) -> np.ndarray:
        """Boolean (V_s,): the student id's class has a teacher member."""
        return self.class_has_teacher()[self.student_class]

    def projection(self, device: torch.device | str = "cpu") -> ProjectionTensors:
        """The loss-side tensors (`ProjectionTensors`)."""
        num_classes = self.num_classes
        order = np.argsort(self.student_class, kind="stable")
        counts = np.bincount(self.student_class, minlength=num_classes)
        ptr = np.concatenate([[0], np.cumsum(counts)])
        matched = self.class_has_teacher() & self.class_has_student()
        return ProjectionTensors(
            teacher_class=torch.as_tensor(self.teacher_class, dtype=torch.int64, device=device),
            class_student_ptr=torch.as_tensor(ptr, dtype=torch.int64, device=device),
            class_student_ids=torch.as_tensor(order, dtype=torch.int64, device=device),
            class_matched=torch.as_tensor(matched, dtype=torch.bool, device=device),
            student_unmatched=torch.as_tensor(~matched[self.student_class], device=device),
        )

    def save(self, path: str | os.PathLike) -> str:
        """Writes the map atomically as safetensors; returns the content hash."""
        from safetensors.torch import save_file

        content_hash = self.content_hash
        metadata = dict(self.metadata, content_hash=content_hash)
        tensors = {
            "teacher_class": torch.as_tensor(self.teacher_class, dtype=torch.int64),
            "student_class": torch.as_tensor(self.student_class, dtype=torch.int64),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return content_hash

    @classmethod
    def load(cls, path: str | os.PathLike) -> VocabMap:
        """Reads a map written by `save` and verifies its content hash.

        Raises:
            ValueError: the file lacks a field, has another version, or its hash does not match
                its content (names the file).
        """
        from safetensors import safe_open

        path = Path(path)
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            names = set(handle.keys())
            missing = {"teacher_class", "student_class"} - names
            if missing:
                raise ValueError(f"vocabulary map {path}: missing tensor(s) {sorted(missing)}")
            teacher_class = handle.get_tensor("teacher_class").numpy()
            student_class = handle.get_tensor("student_class").numpy()
        stored_hash = metadata.pop("content_hash", None)
        if stored_hash is None:
            raise ValueError(f"vocabulary map {path}: metadata field 'content_hash' is missing")
        if metadata.get("version") != str(VOCAB_MAP_VERSION):
            raise ValueError(
                f"vocabulary map {path}: version {metadata.get('version')!r}, expected "
                f"{VOCAB_MAP_VERSION}"
            )
        vocab_map = cls(teacher_class, student_class, metadata)
        if vocab_map.content_hash != stored_hash:
            raise ValueError(
                f"vocabulary map {path}: content hash {vocab_map.content_hash} does not match "
                f"the stored {stored_hash} (file corrupted or edited)"
            )
        return vocab_map


def _heads(
    pieces: list[bytes],
    other_tokenizer: Any,
    other: TokenBytes,
    other_index: Mapping[bytes, list[int]],
    max_pieces: int,
    other_max_len: int,
) -> dict[bytes, bytes]:
    """First piece (bytes of an entry of the other vocabulary) of each piece that has one."""
    texts, decodable = [], []
    for piece in pieces:
        try:
            texts.append(piece.decode("utf-8"))
            decodable.append(piece)
        except UnicodeDecodeError:
            pass
    heads: dict[bytes, bytes] = {}
    encodings = backend_of(other_tokenizer).encode_batch(texts, add_special_tokens=False) if texts else []
    for piece, encoding in zip(decodable, encodings):
        spelled = [other.pieces[i] for i in encoding.ids]
        if spelled and None not in spelled and b"".join(spelled) == piece:
            if len(spelled) <= max_pieces:
                heads[piece] = spelled[0]
    for piece in pieces:
        if piece not in heads:
            head = first_piece(piece, other_index, max_pieces, other_max_len)
            if head is not None:
                heads[piece] = head
    return heads


def _content_hash(teacher_class: np.ndarray, student_class: np.ndarray, metadata: Mapping[str, str]) -> str:
    digest = hashlib.sha256(canonical_json(dict(metadata)).encode("utf-8"))
    for array in (teacher_class, student_class):
        data = np.ascontiguousarray(array, dtype="<i8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data.tobytes())
    return digest.hexdigest()


def build_vocab_map(
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    max_pieces: int = DEFAULT_MAX_PIECES,
    special_pairs: Mapping[int, int] | None = None,
) -> VocabMap:
    """Builds the class map of a tokenizer pair (see the module docstring).

    Args:
        teacher_tokenizer: fast tokenizer (or its `tokenizers.Tokenizer`) of the teacher.
        student_tokenizer: same for the student.
        max_pieces: most pieces of the other vocabulary a non-matching entry may split into to
            join its first piece's class (X-Token's 4 by default; 1 = exact matches only).
        special_pairs: teacher special id -> student special id to match (e.g. the EOS ids),
            besides specials of equal content.

    Returns:
        The `VocabMap`.

    Raises:
        ValueError: `max_pieces < 1`, or a special pair with an id outside a vocabulary.
    """
    require_int("distill.cross_tokenizer", "max_pieces", max_pieces, minimum=1)
    teacher, student = token_bytes(teacher_tokenizer), token_bytes(student_tokenizer)
    pairs = {int(t): int(s) for t, s in (special_pairs or {}).items()}
    for t_id, s_id in pairs.items():
        if not (0 <= t_id < teacher.vocab_size and 0 <= s_id < student.vocab_size):
            raise ValueError(
                f"special pair {t_id} -> {s_id} outside the vocabularies "
                f"({teacher.vocab_size}, {student.vocab_size})"
            )
    metadata = {
        "version": str(VOCAB_MAP_VERSION),
        "max_pieces": str(max_pieces),
        "teacher_kind": teacher.kind,
        "student_kind": student.kind,
        "teacher_fingerprint": fingerprint(teacher),
        "student_fingerprint": fingerprint(student),
        "special_pairs": canonical_json(sorted(pairs.items())),
    }
    num_t, num_s = teacher.vocab_size, student.vocab_size
    if metadata["teacher_fingerprint"] == metadata["student_fingerprint"]:
        # Same spelling of every id: the same tokenizer, the identity map.
        identity = np.arange(num_t, dtype=np.int64)
        metadata.update(_counts(identity, identity.copy(), num_exact_teacher=num_t))
        return VocabMap(identity, identity.copy(), metadata)

    union = _UnionFind(num_t + num_s)  # teacher ids, then student ids shifted by num_t
    num_exact_teacher = _join_classes(union, teacher_tokenizer, teacher, student_tokenizer, student, pairs, max_pieces)

    roots = np.fromiter((union.find(node) for node in range(num_t + num_s)), np.int64, num_t + num_s)
    _, classes = np.unique(roots, return_inverse=True)  # roots are min node ids: stable order
    classes = classes.astype(np.int64)
    teacher_class, student_class = classes[:num_t], classes[num_t:]
    metadata.update(_counts(teacher_class, student_class, num_exact_teacher))
    return VocabMap(teacher_class, student_class, metadata)


def _join_classes(union: "_UnionFind", teacher_tokenizer, teacher, student_tokenizer, student,
                  pairs: dict[int, int], max_pieces: int) -> int:
    """Joins in `union` (teacher ids, then student ids shifted by the teacher's vocabulary size)
    the ids of each class: same bytes on either side, an unmatched entry with its re-tokenization's
    first piece (at most `max_pieces` pieces), specials of equal content and `pairs` (updated
    with them). Returns how many teacher ids have an exact match."""
    num_t = teacher.vocab_size
    t_index, s_index = _byte_index(teacher), _byte_index(student)
    for ids in t_index.values():
        for other in ids[1:]:
            union.union(ids[0], other)
    for ids in s_index.values():
        for other in ids[1:]:
            union.union(num_t + ids[0], num_t + other)
    num_exact_teacher = 0
    for piece, t_ids in t_index.items():
        s_ids = s_index.get(piece)
        if s_ids:
            union.union(t_ids[0], num_t + s_ids[0])
            num_exact_teacher += len(t_ids)
    t_max = max((len(p) for p in t_index), default=0)
    s_max = max((len(p) for p in s_index), default=0)
    if max_pieces > 1:
        s_heads = _heads([p for p in s_index if p not in t_index], teacher_tokenizer, teacher, t_index, max_pieces, t_max)
        for piece, head in s_heads.items():
            union.union(num_t + s_index[piece][0], t_index[head][0])
        t_heads = _heads([p for p in t_index if p not in s_index], student_tokenizer, student, s_index, max_pieces, s_max)
        for piece, head in t_heads.items():
            union.union(t_index[piece][0], num_t + s_index[head][0])
    student_specials = {content: s_id for s_id, content in student.special_contents.items()}
    for t_id, content in teacher.special_contents.items():
        if content in student_specials:
            pairs.setdefault(t_id, student_specials[content])
    for t_id, s_id in pairs.items():
        union.union(t_id, num_t + s_id)
    return num_exact_teacher


def _counts(teacher_class: np.ndarray, student_class: np.ndarray, num_exact_teacher: int) -> dict[str, str]:
    num_classes = int(max(teacher_class.max(initial=-1), student_class.max(initial=-1)) + 1)
    has_t = np.zeros(num_classes, dtype=bool)
    has_t[teacher_class] = True
    has_s = np.zeros(num_classes, dtype=bool)
    has_s[student_class] = True
    matched = has_t & has_s
    return {
        "num_classes": str(num_classes),
        "num_matched_classes": str(int(matched.sum())),
        "teacher_vocab_size": str(len(teacher_class)),
        "student_vocab_size": str(len(student_class)),
        "teacher_exact_ids": str(num_exact_teacher),
        "teacher_matched_ids": str(int(matched[teacher_class].sum())),
        "student_matched_ids": str(int(matched[student_class].sum())),
    }


def describe(vocab_map: VocabMap) -> str:
    """One line of counts for logs."""
    meta = vocab_map.metadata
    return json.dumps({key: meta[key] for key in sorted(meta) if key.endswith(("ids", "classes", "size"))})
