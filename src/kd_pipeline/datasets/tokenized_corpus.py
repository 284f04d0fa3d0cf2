"""Catalog entry for the tokenized corpus (samples.parquet + corpus_meta.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from kd_pipeline.core.corpus import META_FILE, TokenizedCorpus


class TokenizedCorpusDataset(AbstractDataset[TokenizedCorpus, TokenizedCorpus]):
    def __init__(self, path: str, metadata: dict | None = None):
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> TokenizedCorpus:
        return TokenizedCorpus.load(self._path)

    def save(self, data: TokenizedCorpus) -> None:
        data.save(self._path)

    def _exists(self) -> bool:
        return (self._path / META_FILE).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
