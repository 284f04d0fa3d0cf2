"""Tokenized training corpus: rows -> (input_ids, loss_mask) samples with stable ids and split.

A sample's `loss_mask` is aligned with its `input_ids`: `loss_mask[t] == 1` means token `t` is
a training target (predicted from position `t - 1`), so `loss_mask[0]` is always 0. The three
row formats are `text` (train on every token), `prompt` + `response` (train on the response)
and `messages` (chat; train on assistant turns only).
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kd_pipeline.core.atomic import atomic_path, canonical_json, write_json_atomic
from kd_pipeline.core.corpus_sources import SourceRow
from kd_pipeline.core.params import dataclass_from_params

logger = logging.getLogger(__name__)

SPLIT_TRAIN = "train"
SPLIT_VALIDATION = "validation"
SAMPLES_FILE = "samples.parquet"
META_FILE = "corpus_meta.json"
CORPUS_SCHEMA_VERSION = 1
_ROLES = ("system", "user", "assistant", "tool")


class BadRowError(ValueError):
    """A source row that cannot become a sample; names the file, line and field."""

    def __init__(self, row: SourceRow, field_name: str, reason: str):
        self.where, self.field_name, self.reason = row.where, field_name, reason
        super().__init__(f"bad row at {row.where}, field {field_name!r}: {reason}")


@dataclass(frozen=True)
class CorpusConfig:
    """How rows become samples (parameters `corpus_prep`, minus `source`)."""

    max_length: int = 512
    length_policy: str = "truncate"  # truncate | drop
    on_bad_row: str = "error"  # error | skip
    validation_fraction: float = 0.1
    split_salt: str = "kd_pipeline-split-v1"
    # prompt+response rows are rendered as a user/assistant chat when the tokenizer has a
    # chat template; plain concatenation otherwise (or when this is False).
    prompt_response_as_chat: bool = True
    append_eos_to_text: bool = True

    def __post_init__(self):
        if self.length_policy not in ("truncate", "drop"):
            raise ValueError(f"corpus_prep.length_policy must be 'truncate' or 'drop', got {self.length_policy!r}")
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"corpus_prep.on_bad_row must be 'error' or 'skip', got {self.on_bad_row!r}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"corpus_prep.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.max_length < 2:
            raise ValueError(f"corpus_prep.max_length must be >= 2, got {self.max_length}")

    @classmethod
    def from_params(cls, params: dict) -> "CorpusConfig":
        return dataclass_from_params(cls, params, "corpus_prep")


# ---------------------------------------------------------------------------------------
# Row validation and normalization


def _normalize_text(text: str) -> str:
    # Same content, same id: Unicode NFC and unified line endings; nothing else is changed.
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))


def _require_text(row: SourceRow, value: Any, field_name: str) -> str:
    if value is None:
        raise BadRowError(row, field_name, "missing")
    if not isinstance(value, str):
        raise BadRowError(row, field_name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRowError(row, field_name, "empty")
    return _normalize_text(value)


def normalize_row(row: SourceRow) -> dict:
    """The validated, normalized content of a row: exactly one of the three formats."""
    if row.decode_error is not None:
        raise BadRowError(row, "<line>", row.decode_error)
    data = row.data
    if not isinstance(data, dict):
        raise BadRowError(row, "<row>", f"expected a JSON object, got {type(data).__name__}")
    present = {key for key in ("text", "prompt", "response", "messages") if data.get(key) is not None}
    if present == {"text"}:
        return {"text": _require_text(row, data["text"], "text")}
    if present == {"prompt", "response"}:
        return {
            "prompt": _require_text(row, data["prompt"], "prompt"),
            "response": _require_text(row, data["response"], "response"),
        }
    if present == {"messages"}:
        return {"messages": _normalize_messages(row, data["messages"])}
    if present in ({"prompt"}, {"response"}):
        missing = "response" if present == {"prompt"} else "prompt"
        raise BadRowError(row, missing, "missing (prompt and response come together)")
    if not present:
        raise BadRowError(row, "<row>", "none of the fields 'text', 'prompt'+'response' or 'messages' is present")
    raise BadRowError(row, "<row>", f"ambiguous row: fields {sorted(present)} belong to different formats")


def _normalize_messages(row: SourceRow, messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRowError(row, "messages", "expected a non-empty list of {role, content} objects")
    normalized = []
    for index, message in enumerate(messages):
        name = f"messages[{index}]"
        if not isinstance(message, dict):
            raise BadRowError(row, name, f"expected an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in _ROLES:
            raise BadRowError(row, f"{name}.role", f"expected one of {list(_ROLES)}, got {role!r}")
        normalized.append({"role": role, "content": _require_text(row, message.get("content"), f"{name}.content")})
    if not any(message["role"] == "assistant" for message in normalized):
        raise BadRowError(row, "messages", "no assistant turn to train on")
    return normalized


def sample_id_of(record: dict) -> str:
    """Content hash of a normalized row: 32 hex chars, stable across order and re-runs."""
    return hashlib.sha256(canonical_json(record).encode("utf-8")).hexdigest()[:32]


def split_of(sample_id: str, validation_fraction: float, salt: str) -> str:
    """Deterministic split by hash of the sample id (independent of row order and count)."""
    digest = hashlib.sha256(f"{salt}:{sample_id}".encode()).digest()
    unit = int.from_bytes(digest[:8], "big") / 2.0**64
    return SPLIT_VALIDATION if unit < validation_fraction else SPLIT_TRAIN


# ---------------------------------------------------------------------------------------
# Tokenization with loss masks


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return _encode(tokenizer, text)


def tokenize_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Render with the tokenizer's chat template; mask on each assistant turn's tokens.

    Each assistant turn's span is found by rendering the conversation up to it with the
    generation prompt (start) and including it (end). That needs the template to render
    prefixes as prefixes, which is checked rather than assumed.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("messages rows need a tokenizer with a chat template; this tokenizer has none")
    input_ids = _render_chat(tokenizer, messages, add_generation_prompt=False)
    loss_mask = [0] * len(input_ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render_chat(tokenizer, messages[:index], add_generation_prompt=True)) if index else 0
        upto = _render_chat(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if input_ids[: len(upto)] != upto:
            raise ValueError("the chat template does not render a conversation prefix as a token prefix; "
                             "assistant-only masking cannot be derived for it")
        for position in range(start, len(upto)):
            loss_mask[position] = 1
    loss_mask[0] = 0
    return input_ids, loss_mask


def record_text(tokenizer, record: dict, config: CorpusConfig) -> list[str]:
    """The texts whose tokenizations, concatenated (then EOS where the format appends one), are
    the sample's `input_ids` (`tokenize_record`): the rendered chat, or prompt and response, or
    the text."""
    if "messages" in record or ("prompt" in record and config.prompt_response_as_chat
                                and getattr(tokenizer, "chat_template", None)):
        messages = record.get("messages") or [
            {"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
        return [tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)]
    if "prompt" in record:
        return [record["prompt"], record["response"]]
    return [record["text"]]


def text_and_byte_ends(tokenizer, record: dict, config: CorpusConfig, input_ids: list[int],
                       pieces=None) -> tuple[str, list[int]]:
    """The sample's text and the UTF-8 byte end of each of its tokens (`input_ids`).

    Kept in the corpus so that a student with another tokenizer can align with the teacher's
    tokens without the teacher (`core/cross_tokenizer`). An appended EOS is zero-width (it ends
    where the text ends).

    Raises:
        ValueError: the tokenizer's offsets do not reproduce `input_ids` (names the ids).
    """
    from kd_pipeline.core.cross_tokenizer.alignment import encode_with_byte_ends
    from kd_pipeline.core.cross_tokenizer.token_bytes import token_bytes

    pieces = pieces if pieces is not None else token_bytes(tokenizer)
    ids: list[int] = []
    ends: list[int] = []
    offset = 0
    parts = record_text(tokenizer, record, config)
    for part in parts:
        part_ids, part_ends = encode_with_byte_ends(tokenizer, part, pieces=pieces)
        ids.extend(part_ids.tolist())
        ends.extend((part_ends + offset).tolist())
        offset += len(part.encode("utf-8"))
    extra = len(input_ids) - len(ids)
    if extra not in (0, 1) or ids != list(input_ids[: len(ids)]):
        raise ValueError(f"the tokenizer's offsets encode {len(ids)} tokens but the sample has {len(input_ids)}: "
                         "byte ends cannot be derived")
    ends.extend([offset] * extra)  # the appended EOS
    return "".join(parts), ends


def tokenize_record(tokenizer, record: dict, config: CorpusConfig) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) for one normalized record."""
    if "messages" in record:
        return tokenize_chat(tokenizer, record["messages"])
    if "prompt" in record:
        if config.prompt_response_as_chat and getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
            return tokenize_chat(tokenizer, messages)
        prompt_ids = _encode(tokenizer, record["prompt"])
        response_ids = _encode(tokenizer, record["response"]) + _eos(tokenizer)
        return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)
    input_ids = _encode(tokenizer, record["text"]) + (_eos(tokenizer) if config.append_eos_to_text else [])
    return input_ids, [0] + [1] * (len(input_ids) - 1)


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


# ---------------------------------------------------------------------------------------
# The corpus


@dataclass
class TokenizedCorpus:
    """Samples (an Arrow table, one row per sample, sorted by sample_id) plus metadata:
    tokenizer identity, fingerprint, statistics and the report of everything not kept."""

    samples: pa.Table
    meta: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def split(self, name: str) -> pa.Table:
        return self.samples.filter(pc.equal(self.samples["split"], name))

    def save(self, directory: str | Path) -> None:
        """Write samples.parquet then corpus_meta.json, each atomically (meta last = complete)."""
        directory = Path(directory)
        with atomic_path(directory / SAMPLES_FILE) as tmp:
            pq.write_table(self.samples, tmp, compression="zstd")
        write_json_atomic(directory / META_FILE, self.meta)

    @classmethod
    def load(cls, directory: str | Path) -> "TokenizedCorpus":
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"no tokenized corpus at {directory} ({META_FILE} missing): run `kedro run --pipelines corpus_prep`")
        import json

        meta = json.loads(meta_path.read_text())
        if meta.get("schema_version") != CORPUS_SCHEMA_VERSION:
            raise ValueError(f"{meta_path}: schema_version {meta.get('schema_version')!r}, expected {CORPUS_SCHEMA_VERSION}")
        samples = pq.read_table(directory / SAMPLES_FILE)
        corpus = cls(samples, meta)
        actual = corpus_fingerprint(samples, meta["tokenizer_hash"])
        if actual != meta["fingerprint"]:
            raise ValueError(f"{directory / SAMPLES_FILE} does not match the fingerprint in {META_FILE}: "
                             "the corpus was altered; re-run `kedro run --pipelines corpus_prep`")
        return corpus


SAMPLES_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("loss_mask", pa.list_(pa.int8())),
    ("length", pa.int32()),
    ("num_trained", pa.int32()),
    ("split", pa.string()),
    ("source", pa.string()),
    # The text the teacher tokenized and the UTF-8 byte end of each token (cross-tokenizer
    # distillation aligns another tokenizer with them); null in corpora made before they existed.
    ("text", pa.string()),
    ("byte_ends", pa.list_(pa.int32())),
])


def corpus_fingerprint(samples: pa.Table, tokenizer_hash: str) -> str:
    """sha256 over the tokenizer identity and every sample's id, tokens, mask and split."""
    digest = hashlib.sha256(f"kd_pipeline-corpus-v{CORPUS_SCHEMA_VERSION}:{tokenizer_hash}".encode())
    for column in ("sample_id", "split"):
        for value in samples[column].to_pylist():
            digest.update(value.encode() + b"\0")
    for column, dtype in (("input_ids", np.int32), ("loss_mask", np.int8)):
        chunked = samples[column].combine_chunks()
        digest.update(np.asarray(chunked.offsets, dtype=np.int64).tobytes())
        digest.update(np.asarray(chunked.values, dtype=dtype).tobytes())
    return digest.hexdigest()


def build_corpus(rows: Iterable[SourceRow], tokenizer, tokenizer_hash: str, config: CorpusConfig) -> TokenizedCorpus:
    """Validate, tokenize, apply length and bad-row policies, de-duplicate and split.

    Everything not kept is counted by reason in `meta["report"]` (with the first examples'
    locations), so nothing is lost silently.
    """
    from kd_pipeline.core.cross_tokenizer.token_bytes import token_bytes

    pieces = token_bytes(tokenizer)
    kept: dict[str, dict] = {}
    skip = _Skips()
    truncated: list[str] = []
    bom_files: list[str] = []
    rows_per_file: Counter = Counter()
    for row in rows:
        rows_per_file[row.file] += 1
        if row.utf8_bom:
            bom_files.append(row.file)
        if row.decode_error == "blank line":
            skip("blank_line", row.where)
            continue
        try:
            record = normalize_row(row)
        except BadRowError as exc:
            if config.on_bad_row == "error":
                raise
            skip("bad_row", f"{exc.where} [{exc.field_name}] {exc.reason}")
            continue
        sample_id = sample_id_of(record)
        if sample_id in kept:
            skip("duplicate", f"{row.where} (same content as {kept[sample_id]['source']})")
            continue
        sample = _tokenized_sample(row, record, tokenizer, pieces, config, skip, truncated)
        if sample is not None:
            kept[sample_id] = {"sample_id": sample_id, **sample, "source": row.where,
                               "split": split_of(sample_id, config.validation_fraction, config.split_salt)}
    rows_read = sum(rows_per_file.values())
    if not kept:
        read = ", ".join(f"{name} ({count} rows)" for name, count in rows_per_file.items()) or "no file"
        raise ValueError(f"corpus_prep produced no samples from {rows_read} rows of {read} "
                         f"(skipped: {dict(skip.counts)}; first examples: {skip.examples})")
    records = [kept[key] for key in sorted(kept)]
    samples = pa.Table.from_pylist(records, schema=SAMPLES_SCHEMA)
    report = {
        "rows_read": rows_read,
        "samples_kept": len(records),
        "truncated": len(truncated),
        "truncated_examples": truncated[:5],
        "utf8_bom_stripped": len(bom_files),
        "utf8_bom_files": bom_files,
        "skipped": dict(sorted(skip.counts.items())),
        "skipped_examples": skip.examples,
    }
    meta = {
        "schema_version": CORPUS_SCHEMA_VERSION,
        "tokenizer_hash": tokenizer_hash,
        "vocab_size": len(tokenizer),
        "fingerprint": corpus_fingerprint(samples, tokenizer_hash),
        "config": {f.name: getattr(config, f.name) for f in fields(config)},
        "stats": corpus_stats(records),
        "report": report,
    }
    logger.info("corpus_prep: %d rows -> %d samples (%s); truncated %d%s; skipped %s; UTF-8 BOM removed in %d file(s)",
                rows_read, len(records), meta["stats"], len(truncated),
                f" (first: {', '.join(truncated[:5])})" if truncated else "", dict(skip.counts) or "none",
                len(bom_files))
    return TokenizedCorpus(samples, meta)


class _Skips:
    """Rows not kept, counted by reason, with the locations of the first five of each."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def __call__(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < 5:
            examples.append(where)


def _tokenized_sample(row: SourceRow, record, tokenizer, pieces, config: CorpusConfig, skip: _Skips,
                      truncated: list[str]) -> dict | None:
    """One normalized row's tokens, loss mask, text and byte ends after the length policy
    (truncations noted in `truncated`), or None when it is skipped (counted in `skip`)."""
    input_ids, loss_mask = tokenize_record(tokenizer, record, config)
    text, byte_ends = text_and_byte_ends(tokenizer, record, config, input_ids, pieces)
    was_truncated = False
    if len(input_ids) > config.max_length:
        if config.length_policy == "drop":
            skip("over_length_dropped", f"{row.where} ({len(input_ids)} > {config.max_length} tokens)")
            return None
        truncated.append(f"{row.where} ({len(input_ids)} -> {config.max_length} tokens)")
        input_ids, loss_mask = input_ids[: config.max_length], loss_mask[: config.max_length]
        byte_ends = byte_ends[: config.max_length]
        was_truncated = True
    if sum(loss_mask) == 0:
        skip("no_trained_tokens", f"{row.where} (nothing to train on after {'truncation' if was_truncated else 'masking'})")
        return None
    return {"input_ids": input_ids, "loss_mask": loss_mask, "length": len(input_ids),
            "num_trained": int(sum(loss_mask)), "text": text, "byte_ends": byte_ends}


def corpus_stats(records: list[dict]) -> dict:
    stats: dict[str, Any] = {}
    for split in (SPLIT_TRAIN, SPLIT_VALIDATION):
        chosen = [r for r in records if r["split"] == split]
        stats[split] = {
            "samples": len(chosen),
            "tokens": int(sum(r["length"] for r in chosen)),
            "trained_tokens": int(sum(r["num_trained"] for r in chosen)),
            "max_length": int(max((r["length"] for r in chosen), default=0)),
        }
    return stats
