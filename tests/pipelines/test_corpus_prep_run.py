"""`kedro run --pipelines corpus_prep --env test` end to end, in a temporary project copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kd_pipeline.core.corpus import TokenizedCorpus


@pytest.mark.slow
def test_corpus_prep_runs_end_to_end_in_test_env(tmp_path, copy_project):
    project = copy_project(tmp_path / "project")
    env = dict(os.environ, KD_MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", KEDRO_DISABLE_TELEMETRY="true")
    kedro = Path(sys.executable).with_name("kedro")
    result = subprocess.run([str(kedro), "run", "--pipelines", "corpus_prep", "--env", "test"], cwd=project,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    teacher = project / "data/test/06_models/teacher"
    assert (teacher / "teacher_source.json").is_file() and (teacher / "model.safetensors").is_file()
    corpus = TokenizedCorpus.load(project / "data/test/03_primary/tokenized_corpus")
    report = json.loads((project / "data/test/08_reporting/corpus_report.json").read_text())
    assert report["fingerprint"] == corpus.fingerprint
    assert report["samples_kept"] == corpus.samples.num_rows > 0
    assert report["samples_kept"] + sum(report["skipped"].values()) == report["rows_read"] == 24
    assert set(corpus.samples["split"].to_pylist()) == {"train", "validation"}
    assert (tmp_path / "mlflow.db").is_file()  # kedro-mlflow logged to the configured store
