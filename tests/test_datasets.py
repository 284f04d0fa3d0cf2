"""The catalog's own dataset types (kd_pipeline.datasets): files written, read back, refused."""

from __future__ import annotations

import pyarrow as pa
import pytest
from kedro.io import DatasetError

from kd_pipeline.core.corpus import SAMPLES_SCHEMA, TokenizedCorpus, corpus_fingerprint
from kd_pipeline.datasets import DirectoryDataset, TokenizedCorpusDataset


def test_directory_dataset_runs_the_writer_on_its_folder_and_loads_only_a_complete_one(tmp_path):
    folder = tmp_path / "out"
    dataset = DirectoryDataset(str(folder), marker="done.json")
    assert not dataset.exists()
    with pytest.raises(DatasetError, match=r"out is not complete \(done.json missing\)"):
        dataset.load()
    written = []

    def write(directory):
        written.append(directory)
        directory.mkdir()
        (directory / "part.bin").write_bytes(b"x")

    dataset.save(write)
    assert written == [folder] and not dataset.exists()  # no marker yet: still incomplete
    (folder / "done.json").write_text("{}")
    assert dataset.exists() and dataset.load() == folder
    with pytest.raises(DatasetError, match="expects a writer callable, got str"):
        dataset.save("not a writer")


def test_tokenized_corpus_dataset_round_trips_and_checks_the_fingerprint(tmp_path):
    samples = pa.Table.from_pylist([
        {"sample_id": "a" * 32, "input_ids": [1, 5, 7, 2], "loss_mask": [0, 0, 1, 1], "length": 4, "num_trained": 2,
         "split": "train", "source": "test:1"},
        {"sample_id": "b" * 32, "input_ids": [1, 9, 2], "loss_mask": [0, 1, 1], "length": 3, "num_trained": 2,
         "split": "validation", "source": "test:2"},
    ], schema=SAMPLES_SCHEMA)
    corpus = TokenizedCorpus(samples, {"schema_version": 1, "tokenizer_hash": "t" * 64, "vocab_size": 16,
                                       "fingerprint": corpus_fingerprint(samples, "t" * 64)})
    dataset = TokenizedCorpusDataset(str(tmp_path / "corpus"))
    assert not dataset.exists()
    dataset.save(corpus)
    assert dataset.exists()
    loaded = dataset.load()
    assert loaded.meta == corpus.meta and loaded.samples.equals(corpus.samples)
    assert loaded.split("validation")["sample_id"].to_pylist() == ["b" * 32]

    tampered = TokenizedCorpus(samples.slice(0, 1), corpus.meta)
    tampered.save(tmp_path / "corpus")  # rows no longer match the recorded fingerprint
    with pytest.raises(DatasetError, match="does not match the fingerprint"):  # Kedro wraps the ValueError
        dataset.load()
