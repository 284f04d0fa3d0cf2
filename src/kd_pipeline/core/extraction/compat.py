"""Refusing a teacher whose vocabulary or tokenizer is not the corpus's, before it runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping


class TeacherCorpusMismatchError(ValueError):
    """The teacher (model or tokenizer) does not belong to the corpus; names the field."""

    def __init__(self, field_name: str, message: str):
        self.field_name = field_name
        super().__init__(f"teacher/corpus mismatch in field {field_name!r}: {message}")


def check_teacher_matches_corpus(teacher_dir: Path, teacher_vocab_size: int, tokenizer_vocab_size: int,
                                 teacher_tokenizer_hash: str, corpus_meta: Mapping[str, Any],
                                 corpus_where: str = "the corpus") -> None:
    """Refuse a teacher whose vocabulary or tokenizer differs from the corpus's.

    The corpus records `vocab_size` (`len(tokenizer)`) and `tokenizer_hash` of the tokenizer
    that produced its ids. The teacher's tokenizer must have the same size and hash, and its
    LM head at least that many rows (a head padded beyond the tokenizer is fine).
    """
    corpus_vocab = corpus_meta.get("vocab_size")
    if corpus_vocab != tokenizer_vocab_size or teacher_vocab_size < int(corpus_vocab or 0):
        raise TeacherCorpusMismatchError(
            "vocab_size",
            f"{corpus_where} was tokenized with vocab_size {corpus_vocab}, but the teacher at {teacher_dir} has "
            f"a tokenizer of {tokenizer_vocab_size} tokens and an LM head of {teacher_vocab_size} rows",
        )
    corpus_hash = corpus_meta.get("tokenizer_hash")
    if corpus_hash != teacher_tokenizer_hash:
        raise TeacherCorpusMismatchError(
            "tokenizer_hash",
            f"{corpus_where} has tokenizer_hash {str(corpus_hash)[:16]}..., the teacher's tokenizer at {teacher_dir} "
            f"has {teacher_tokenizer_hash[:16]}...: re-run corpus_prep with this teacher",
        )


def check_teacher_for_corpus(teacher_dir: Path, corpus_meta: Mapping[str, Any],
                             corpus_where: str = "the corpus") -> tuple[int, str]:
    """Read the teacher's vocabulary size (config.json) and tokenizer hash, and refuse them if
    they are not the corpus's (`check_teacher_matches_corpus`). Returns `(vocab_size, tokenizer_hash)`."""
    from kd_pipeline.core.models.identity import tokenizer_hash
    from kd_pipeline.core.models.loading import load_tokenizer

    teacher_config = json.loads((teacher_dir / "config.json").read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(teacher_dir)
    teacher_tokenizer_hash = tokenizer_hash(tokenizer)
    text_config = teacher_config.get("text_config") or {}
    teacher_vocab = int(teacher_config.get("vocab_size") or text_config.get("vocab_size") or 0)
    check_teacher_matches_corpus(teacher_dir, teacher_vocab, len(tokenizer), teacher_tokenizer_hash,
                                 corpus_meta, corpus_where)
    return teacher_vocab, teacher_tokenizer_hash
