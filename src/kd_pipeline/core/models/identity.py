"""Content identities of models and tokenizers: what the weights, architecture and tokenization
are, independent of paths and of who wrote the files (recorded in manifests and run records)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Mapping

from kd_pipeline.core.atomic import canonical_json, sha256_update_file
from kd_pipeline.core.models.loading import require_local_dir

# Keys of config.json that record who wrote the file rather than what the model is.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_model_name_or_path", "_commit_hash")


def _canonical_config(config: Mapping[str, Any]) -> dict:
    return {key: value for key, value in config.items() if key not in _VOLATILE_CONFIG_KEYS}


def model_identity(path: str | os.PathLike) -> dict:
    """Content identity of a model folder: what the weights and architecture are.

    Returns:
        `config_sha256`: sha256 of `config.json` as canonical JSON, without the keys that only
        say who wrote it (`transformers_version`, `_name_or_path`); `weights_sha256`: sha256 over
        the `*.safetensors` files in sorted name order (each name, then its bytes, streamed);
        `weights_files`, `weights_bytes`.
    """
    folder = require_local_dir(path, "model")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    weight_files = sorted(folder.glob("*.safetensors"))
    if not weight_files:
        raise FileNotFoundError(f"model folder {folder} has no *.safetensors weights")
    digest = hashlib.sha256()
    total = 0
    for weight_file in weight_files:
        digest.update(weight_file.name.encode("utf-8") + b"\0")
        total += sha256_update_file(digest, weight_file)
    return {
        "config_sha256": hashlib.sha256(canonical_json(_canonical_config(config)).encode("utf-8")).hexdigest(),
        "weights_sha256": digest.hexdigest(),
        "weights_files": [weight_file.name for weight_file in weight_files],
        "weights_bytes": total,
    }


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what decides how a tokenizer turns chats into ids.

    Hashes the whole token -> id map as the tokenizer resolves it (`get_vocab()`: the model's
    vocabulary plus added and special tokens, with each added token's flags), the backend
    tokenizer's JSON (merges, normalizer, pre-tokenizer, post-processor), the special tokens map
    and the chat template: two tokenizers of equal size that differ in one token, or in which
    token has which id, hash differently. The backend's truncation/padding state is left out:
    calling the tokenizer with `truncation=True` changes it at run time without changing the
    tokenizer. Equal across save/reload.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"tokenizer_hash needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    backend_state = json.loads(backend.to_str())
    backend_state.pop("truncation", None)
    backend_state.pop("padding", None)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    parts = {
        "token_ids": sorted([token, int(index)] for token, index in tokenizer.get_vocab().items()),
        "added_tokens": {str(index): {"content": str(token), "special": bool(getattr(token, "special", False)),
                                      "lstrip": bool(getattr(token, "lstrip", False)),
                                      "rstrip": bool(getattr(token, "rstrip", False)),
                                      "normalized": bool(getattr(token, "normalized", True)),
                                      "single_word": bool(getattr(token, "single_word", False))}
                         for index, token in sorted(added.items())},
        "backend": backend_state,
        "special_tokens": {key: str(value) for key, value in tokenizer.special_tokens_map.items()},
        "chat_template": tokenizer.chat_template,
    }
    return hashlib.sha256(canonical_json(parts).encode("utf-8")).hexdigest()


def folder_files_sha256(folder: Path, names: list[str]) -> str:
    """sha256 over the given files of a folder (name, then content), in sorted order."""
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode("utf-8") + b"\0")
        sha256_update_file(digest, folder / name)
    return digest.hexdigest()


def count_safetensors_parameters(folder: Path) -> int:
    """Number of stored weights, read from the safetensors headers (tied weights count once).

    A safetensors file starts with an 8-byte little-endian header length and a JSON header
    giving each tensor's shape, so this needs no tensor data.
    """
    total = 0
    for weight_file in sorted(folder.glob("*.safetensors")):
        with open(weight_file, "rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_length))
        total += sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
    return total
