"""The registered pipelines run in process: Kedro's SequentialRunner over a DataCatalog built here
(the project's own dataset types under a temporary folder, memory for reports) with the test
env's parameters. Checks the wiring of nodes, datasets and parameters without a `kedro run`
subprocess or MLflow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.json import JSONDataset
from kedro_datasets.text import TextDataset

from kd_pipeline.core.topk_store import MANIFEST_NAME, Manifest, TopKReader
from kd_pipeline.datasets import DirectoryDataset, TokenizedCorpusDataset
from kd_pipeline.pipeline_registry import register_pipelines

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _test_params(tmp_path: Path) -> dict:
    params = {}
    for path in sorted((PROJECT_ROOT / "conf" / "test").glob("parameters_*.yml")):
        params.update(yaml.safe_load(path.read_text()) or {})
    params["corpus_prep"]["teacher"]["tokenizer_path"] = str(PROJECT_ROOT / "tests" / "fixtures" / "tiny_tokenizer")
    params["evaluate"]["plots"]["history_dir"] = str(tmp_path / "curve_history")  # absolute: stays in tmp_path
    params["distill"]["tracking"]["log_student"] = False
    return params


def _param_datasets(params: dict, prefix: str = "params:") -> dict:
    """`params:a`, `params:a.b`, ... as Kedro's context provides them."""
    datasets = {}
    for key, value in params.items():
        datasets[f"{prefix}{key}"] = MemoryDataset(value)
        if isinstance(value, dict):
            datasets.update(_param_datasets(value, f"{prefix}{key}."))
    return datasets


class KeptMemoryDataset(MemoryDataset):
    """A MemoryDataset the runner does not release after its last consumer, to be read afterwards."""

    def _release(self) -> None:
        pass


def _catalog(root: Path, params: dict) -> DataCatalog:
    datasets = {
        "teacher_model": DirectoryDataset(str(root / "teacher"), marker="teacher_source.json"),
        "tokenized_corpus": TokenizedCorpusDataset(str(root / "tokenized_corpus")),
        "teacher_topk": DirectoryDataset(str(root / "teacher_topk"), marker=MANIFEST_NAME),
        "student_model": DirectoryDataset(str(root / "student"), marker="training_summary.json"),
        "eval_plots": DirectoryDataset(str(root / "plots"), marker="training_curves.png"),
        **{name: JSONDataset(filepath=str(root / f"{name}.json"))
           for name in ("corpus_report", "teacher_logits_report", "distill_summary", "eval_metrics")},
        "eval_generations": TextDataset(filepath=str(root / "generations.txt")),
        "eval_mlflow_metrics": KeptMemoryDataset(),
    }
    return DataCatalog(datasets={**datasets, **_param_datasets(params)})


@pytest.fixture(scope="module")
def run_default(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("in_process")
    root = tmp_path / "data"
    catalog = _catalog(root, _test_params(tmp_path))
    SequentialRunner().run(register_pipelines()["__default__"], catalog)
    return root, catalog


def test_default_pipeline_runs_every_stage_in_process(run_default):
    root, catalog = run_default
    corpus_report = catalog["corpus_report"].load()
    assert corpus_report["rows_read"] == 24 and corpus_report["samples_kept"] > 0
    manifest = Manifest.read(root / "teacher_topk" / MANIFEST_NAME)
    assert manifest.source.k == 8 and manifest.num_samples == corpus_report["samples_kept"]
    assert catalog["teacher_logits_report"].load()["samples"] == manifest.num_samples
    summary = catalog["distill_summary"].load()
    assert summary["global_step"] == 4
    assert summary == json.loads((root / "student" / "training_summary.json").read_text())
    metrics = catalog["eval_metrics"].load()
    assert metrics["overlap_k"] == 8 and all(math.isfinite(value) for value in metrics.values())
    # The teacher run again on the validation split: the mode-independent full-vocabulary KL.
    assert metrics["kl_teacher_student_full"] > 0 and 0 <= metrics["top1_agreement_full"] <= 1
    assert "heldout/kl_teacher_student_full" in catalog["eval_mlflow_metrics"].load()
    assert manifest.source.capture_mode == "topk" and catalog["teacher_logits_report"].load()["capture_mode"] == "topk"
    assert catalog["eval_mlflow_metrics"].load()["heldout/student_nll"] == {"value": metrics["student_nll"], "step": 0}
    assert "### student" in catalog["eval_generations"].load()
    assert sorted(path.name for path in (root / "plots").iterdir()) == ["held_out_loss.csv", "training_curves.png"]


def test_teacher_logits_rerun_in_process_resumes_without_recomputing(run_default):
    root, catalog = run_default
    before = {path.name: path.read_bytes() for path in (root / "teacher_topk").glob("shard-*.parquet")}
    SequentialRunner().run(register_pipelines()["teacher_logits"], catalog)
    report = catalog["teacher_logits_report"].load()
    assert report["last_run"]["samples_computed"] == 0 and report["last_run"]["samples_skipped_done"] > 0
    after = {path.name: path.read_bytes() for path in (root / "teacher_topk").glob("shard-*.parquet")}
    assert after == before
    assert len(TopKReader(root / "teacher_topk").get_many([catalog["tokenized_corpus"].load().samples["sample_id"][0].as_py()])) == 1
