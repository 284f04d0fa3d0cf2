"""The UTF-8 bytes each token id of a tokenizer stands for, whatever its vocabulary spelling.

Vocabulary entries are spelled differently by each tokenizer family; comparing two vocabularies
(`vocab_map.py`) and splitting shared character offsets into bytes (`alignment.py`) both need
the plain bytes. Supported families, detected from the `tokenizers` JSON of a fast tokenizer:

- `byte_level` (GPT-2 / Llama-3 / Qwen / SmolLM): every character of an entry is one byte
  through the GPT-2 `bytes_to_unicode` table (`Ġ` is the space, `Ċ` the newline).
- `metaspace` (SentencePiece-style Unigram or BPE, Llama-2 / T5 / Gemma): `▁` is the space and
  `<0xNN>` byte-fallback entries are the single byte NN.
- `wordpiece` (BERT): `##x` continues a word and is the bytes of `x`; any other entry starts a
  word and is given a leading space (`" x"`), its most common context. WordPiece drops the
  spaces themselves, so this spelling is a convention, not a round trip.

Special (added) tokens have no text bytes here: they are `None`; they never take part in a
vocabulary decomposition and are matched by explicit pairing only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

TOKENIZER_KINDS = ("byte_level", "metaspace", "wordpiece")
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's `bytes_to_unicode`: printable stand-in character -> byte value."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = list(printable)
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + shift)
            shift += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


def backend_of(tokenizer: Any):
    """The `tokenizers.Tokenizer` behind a Hugging Face fast tokenizer (or the object itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str") or not hasattr(backend, "encode"):
        raise ValueError(
            f"need a fast tokenizer (tokenizers.Tokenizer or PreTrainedTokenizerFast), got "
            f"{type(tokenizer).__name__}"
        )
    return backend


def _components(spec: Any) -> list[dict]:
    """Flattens a tokenizers component spec (possibly a `Sequence`) into its parts."""
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        parts = spec.get("pretokenizers") or spec.get("decoders") or spec.get("normalizers") or []
        return [part for sub in parts for part in _components(sub)]
    return [spec]


def detect_kind(tokenizer: Any) -> str:
    """`byte_level`, `metaspace` or `wordpiece` from the tokenizer's pipeline components.

    Raises:
        ValueError: naming the model type when no supported spelling is recognized.
    """
    spec = json.loads(backend_of(tokenizer).to_str())
    types = {
        part.get("type")
        for key in ("pre_tokenizer", "decoder", "normalizer")
        for part in _components(spec.get(key))
    }
    if "ByteLevel" in types:
        return "byte_level"
    if "Metaspace" in types or "Replace" in types and any(
        "▁" in json.dumps(part) for part in _components(spec.get("normalizer"))
    ):
        return "metaspace"
    if spec.get("model", {}).get("type") == "WordPiece" or "WordPiece" in types:
        return "wordpiece"
    raise ValueError(
        f"unsupported tokenizer spelling (model {spec.get('model', {}).get('type')!r}, "
        f"components {sorted(t for t in types if t)}): expected one of {list(TOKENIZER_KINDS)}"
    )


@dataclass(frozen=True)
class TokenBytes:
    """Per-id bytes of one tokenizer.

    Attributes:
        kind: the spelling family (`TOKENIZER_KINDS`).
        pieces: `pieces[id]` is the token's bytes, or None for special / unknown-spelling ids.
        special_contents: id -> content string of the special (added) tokens.
    """

    kind: str
    pieces: tuple[bytes | None, ...]
    special_contents: dict[int, str]

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def byte_length(self, token_id: int) -> int:
        """Bytes of the token (0 for special tokens)."""
        piece = self.pieces[token_id]
        return 0 if piece is None else len(piece)


def token_bytes(tokenizer: Any) -> TokenBytes:
    """Decodes every vocabulary entry of `tokenizer` to its bytes (see the module docstring).

    Args:
        tokenizer: a `tokenizers.Tokenizer` or a Hugging Face fast tokenizer.

    Returns:
        The `TokenBytes`; its length is the backend's vocabulary size including added tokens.

    Raises:
        ValueError: for unsupported spellings, or a byte-level entry with a character outside
            the byte table (names the id and the entry).
    """
    backend = backend_of(tokenizer)
    kind = detect_kind(backend)
    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1 if vocab else 0
    spec = json.loads(backend.to_str())
    special = {
        int(entry["id"]): entry["content"]
        for entry in spec.get("added_tokens", [])
        if entry.get("special", False)
    }
    prefix = spec.get("model", {}).get("continuing_subword_prefix") or "##"
    decoder = byte_level_decoder()
    pieces: list[bytes | None] = [None] * size
    for entry, token_id in vocab.items():
        if token_id in special:
            continue
        if kind == "byte_level":
            try:
                pieces[token_id] = bytes(decoder[ch] for ch in entry)
            except KeyError as error:
                # Added non-special tokens of byte-level tokenizers are stored as plain text.
                if any(added.get("content") == entry for added in spec.get("added_tokens", [])):
                    pieces[token_id] = entry.encode("utf-8")
                else:
                    raise ValueError(
                        f"byte-level token id {token_id} ({entry!r}) has a character outside the "
                        f"GPT-2 byte table: {error}"
                    ) from None
        elif kind == "metaspace":
            fallback = _BYTE_FALLBACK.match(entry)
            if fallback:
                pieces[token_id] = bytes([int(fallback.group(1), 16)])
            else:
                pieces[token_id] = entry.replace("▁", " ").encode("utf-8")
        else:
            if entry.startswith(prefix):
                pieces[token_id] = entry[len(prefix):].encode("utf-8")
            else:
                pieces[token_id] = (" " + entry).encode("utf-8")
    return TokenBytes(kind=kind, pieces=tuple(pieces), special_contents=special)
