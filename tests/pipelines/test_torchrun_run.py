"""The pipeline under `torchrun --nproc-per-node 2` (gloo, CPU) in the test env, end to end:
corpus prep once (one process), then `teacher_logits` and `distill` on 2 ranks each: extraction
sharded by rank with one merged manifest, training on 2 ranks, the student saved once, and
exactly one MLflow run per command (rank 0's)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from kd_pipeline.core.topk_store import TopKReader


def _run(command: list[str], project: Path, env: dict, timeout: float) -> str:
    process = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # torchrun and its workers
            process.wait()
    assert process.returncode == 0, output[-6000:]
    return output


def _runs(database: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(database) as connection:
        return connection.execute("SELECT run_uuid, name FROM runs ORDER BY start_time").fetchall()


@pytest.mark.slow
def test_teacher_logits_and_distill_under_torchrun(tmp_path, copy_project):
    project = tmp_path / "project"
    copy_project(project)
    database = tmp_path / "mlflow.db"
    env = dict(os.environ, KD_MLFLOW_TRACKING_URI=f"sqlite:///{database}", KEDRO_DISABLE_TELEMETRY="true",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(project / "src"))
    kedro_run = [sys.executable, "-m", "kd_pipeline", "--env", "test", "--pipelines"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                "-m", "kd_pipeline", "--env", "test", "--pipelines"]

    _run([*kedro_run, "corpus_prep"], project, env, timeout=300)
    assert len(_runs(database)) == 1

    output = _run([*torchrun, "teacher_logits"], project, env, timeout=300)
    assert "rank 1: MLflow tracking off" in output
    runs = _runs(database)
    # One run per stage, named from what varies (kd_pipeline.tracking.run_name).
    assert [name for _, name in runs] == ["corpus_prep kjv_chat random_init", "teacher_logits k8 logquant_zstd"]
    topk = project / "data/test/04_feature/teacher_topk"
    manifest = json.loads((topk / "manifest.json").read_text())
    run = json.loads((topk / "extraction_run.json").read_text())["runs"][-1]
    assert run["world_size"] == 2
    reader = TopKReader(topk)
    from kd_pipeline.core.corpus import TokenizedCorpus

    corpus = TokenizedCorpus.load(project / "data/test/03_primary/tokenized_corpus")
    assert sorted(reader.sample_ids()) == sorted(corpus.samples["sample_id"].to_pylist())
    assert manifest["world_size"] == 2
    assert {shard["rank"] for shard in manifest["shards"]} == {0, 1}  # both ranks' shards, one manifest

    output = _run([*torchrun, "distill"], project, env, timeout=400)
    runs = _runs(database)
    assert [name for _, name in runs] == ["corpus_prep kjv_chat random_init", "teacher_logits k8 logquant_zstd",
                                          "distill kd fwd_kl w1 T1 sft0.5 k8"]
    distill_run = runs[-1][0]
    with sqlite3.connect(database) as connection:
        metrics = {key for (key,) in connection.execute("SELECT DISTINCT key FROM metrics WHERE run_uuid = ?",
                                                       (distill_run,))}
        params = {key for (key,) in connection.execute("SELECT key FROM params WHERE run_uuid = ?", (distill_run,))}
    assert {"train/loss", "train/kd", "heldout/loss", "heldout/sft"} <= metrics  # our step-metrics callback
    assert any(key.startswith("distill.trainer") for key in params)
    student = project / "data/test/06_models/student"
    summary = json.loads((student / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 4
    assert (student / "model.safetensors").is_file()
    # Saved once, by rank 0, with no temporary folder left beside it.
    assert output.count("distill: saved the student to") == 1
    # The folder locks (core/locking.py) live beside their folders and stay; nothing else is written there.
    assert sorted(path.name for path in student.parent.iterdir() if path.suffix != ".lock") == [
        "student", "teacher"]  # keep_checkpoints: false removes the finished run's checkpoints
