"""`distill.cross_tokenizer` parameters: a student with its own tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from kd_pipeline.core.cross_tokenizer.loss import CrossTokenizerOptions
from kd_pipeline.core.cross_tokenizer.vocab_map import DEFAULT_MAX_PIECES
from kd_pipeline.core.params import dataclass_from_params


@dataclass(frozen=True)
class CrossTokenizerConfig:
    """A student whose tokenizer differs from the teacher's.

    Attributes:
        student_tokenizer: local folder of the student's fast tokenizer (the student model's
            vocabulary is its size).
        max_pieces: vocabulary map: most pieces an entry may split into to join its first
            piece's class (`vocab_map.build_vocab_map`).
        uld_loss_weight: weight of the sorted-probability term on unmatched mass.
        span_merge: `observed` (GOLD) or `first_token` (`loss.py`).
    """

    student_tokenizer: str
    max_pieces: int = DEFAULT_MAX_PIECES
    uld_loss_weight: float = 1.0
    span_merge: str = "observed"

    def __post_init__(self) -> None:
        if not isinstance(self.student_tokenizer, str) or not self.student_tokenizer:
            raise ValueError(f"distill.cross_tokenizer.student_tokenizer must be a path, got {self.student_tokenizer!r}")
        if isinstance(self.max_pieces, bool) or not isinstance(self.max_pieces, int) or self.max_pieces < 1:
            raise ValueError(f"distill.cross_tokenizer.max_pieces must be an int >= 1, got {self.max_pieces!r}")
        self.options  # validates uld_loss_weight and span_merge

    @property
    def options(self) -> CrossTokenizerOptions:
        return CrossTokenizerOptions(uld_loss_weight=self.uld_loss_weight, span_merge=self.span_merge)

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> CrossTokenizerConfig | None:
        """None for null / absent params (the student shares the teacher's tokenizer)."""
        if not params:
            return None
        return dataclass_from_params(cls, params, "distill.cross_tokenizer")
