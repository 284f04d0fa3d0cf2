"""Kedro datasets that delegate to the core library's own formats."""

from kd_pipeline.datasets.directory import DirectoryDataset
from kd_pipeline.datasets.tokenized_corpus import TokenizedCorpusDataset

__all__ = ["DirectoryDataset", "TokenizedCorpusDataset"]
