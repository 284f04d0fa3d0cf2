"""`distill.cross_tokenizer` parameters: a student with its own tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from kd_pipeline.core.cross_tokenizer.loss import CrossTokenizerOptions
from kd_pipeline.core.cross_tokenizer.vocab_map import DEFAULT_MAX_PIECES
from kd_pipeline.core.params import dataclass_from_params, require, require_int


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
        what = "distill.cross_tokenizer"
        require(isinstance(self.student_tokenizer, str) and bool(self.student_tokenizer), what, "student_tokenizer",
                "a tokenizer folder path", self.student_tokenizer)
        require_int(what, "max_pieces", self.max_pieces, minimum=1)
        CrossTokenizerOptions(uld_loss_weight=self.uld_loss_weight, span_merge=self.span_merge)

    @property
    def options(self) -> CrossTokenizerOptions:
        return CrossTokenizerOptions(uld_loss_weight=self.uld_loss_weight, span_merge=self.span_merge)

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> CrossTokenizerConfig | None:
        """None for null / absent params (the student shares the teacher's tokenizer)."""
        if not params:
            return None
        require("student_tokenizer" in params, "distill.cross_tokenizer", "student_tokenizer", "given", None)
        return dataclass_from_params(cls, params, "distill.cross_tokenizer")
