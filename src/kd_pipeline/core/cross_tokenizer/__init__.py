"""Cross-tokenizer distillation from the stored teacher artifact.

- `token_bytes`: the bytes each id of a tokenizer stands for (byte-level BPE, SentencePiece
  `▁`/byte-fallback, WordPiece).
- `alignment`: UTF-8 byte ends of tokens and the smallest teacher/student token groups that end
  on the same byte.
- `vocab_map`: the (teacher, student) vocabulary map (exact matches + first-piece multi-token
  projection, as classes), hashed and stored as safetensors.
- `loss`: KD on the mapped mass + ULD on the rest + SFT, chunked over student rows.
- `reference`: the naive float64 spec of that loss.

Submodules are imported by name (this package imports none of them), so that corpus prep, which
only needs `alignment` and `token_bytes`, does not depend on the loss code.
"""
