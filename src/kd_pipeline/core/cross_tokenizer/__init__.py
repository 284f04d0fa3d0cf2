"""Cross-tokenizer distillation from the stored teacher artifact.

- `token_bytes`: the bytes each id of a tokenizer stands for (byte-level BPE, SentencePiece
  `▁`/byte-fallback, WordPiece).
- `alignment`: UTF-8 byte ends of tokens and the smallest teacher/student token groups that end
  on the same byte.
- `vocab_map`: the (teacher, student) vocabulary map (exact matches + first-piece multi-token
  projection, as classes), hashed and stored as safetensors.
- `loss`: KD on the mapped mass + ULD on the rest + SFT, chunked over student rows.
- `reference`: the naive float64 spec of that loss.
"""

from kd_pipeline.core.cross_tokenizer.alignment import (
    AlignedGroups,
    align_by_byte_ends,
    encode_with_byte_ends,
    token_byte_ends,
)
from kd_pipeline.core.cross_tokenizer.loss import (
    SPAN_MERGES,
    AlignedGroupBatch,
    CrossTokenizerLossOutput,
    CrossTokenizerOptions,
    cross_tokenizer_kd_loss,
)
from kd_pipeline.core.cross_tokenizer.token_bytes import TokenBytes, detect_kind, token_bytes
from kd_pipeline.core.cross_tokenizer.vocab_map import ProjectionTensors, VocabMap, build_vocab_map

__all__ = [
    "SPAN_MERGES",
    "AlignedGroupBatch",
    "AlignedGroups",
    "CrossTokenizerLossOutput",
    "CrossTokenizerOptions",
    "ProjectionTensors",
    "TokenBytes",
    "VocabMap",
    "align_by_byte_ends",
    "build_vocab_map",
    "cross_tokenizer_kd_loss",
    "detect_kind",
    "encode_with_byte_ends",
    "token_byte_ends",
    "token_bytes",
]
