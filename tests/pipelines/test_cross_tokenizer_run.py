"""`kedro run --env test` end to end with a student that has its own tokenizer
(`distill.cross_tokenizer`), in a temporary project copy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


@pytest.mark.slow
def test_whole_pipeline_with_a_cross_tokenizer_student(tmp_path, project_root, copy_project):
    project = copy_project(tmp_path / "project")
    shutil.copytree(project_root / "scripts", project / "scripts")
    env = dict(os.environ, KD_MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", KEDRO_DISABLE_TELEMETRY="true",
               PYTHONPATH=str(project / "src"))
    tokenizer_dir = "data/test/06_models/student_tokenizer"
    subprocess.run([sys.executable, "scripts/make_student_tokenizer.py", "--out", tokenizer_dir, "--vocab-size", "600",
                    "--verses", "2000", "--teacher-dir", "tests/fixtures/tiny_tokenizer"],
                   cwd=project, env=env, check=True, capture_output=True, timeout=300)
    params_file = project / "conf" / "test" / "parameters_distill.yml"
    params = yaml.safe_load(params_file.read_text())
    # Envs merge into base key by key: null clears the base's prune_teacher setting.
    params["distill"]["student_init"] = {"method": "from_config", "seed": 0, "drop_layers": None, "config": {
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "tie_word_embeddings": True}}
    params["distill"]["cross_tokenizer"] = {"student_tokenizer": tokenizer_dir}
    params_file.write_text(yaml.safe_dump(params))
    kedro = Path(sys.executable).with_name("kedro")
    result = subprocess.run([str(kedro), "run", "--env", "test"], cwd=project, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    data = project / "data" / "test"
    vocab_map = json.loads((data / "04_feature/vocab_map/vocab_map.json").read_text())
    assert (data / "04_feature/vocab_map/vocab_map.safetensors").is_file()
    summary = json.loads((data / "08_reporting/distill_summary.json").read_text())
    assert summary["cross_tokenizer"]["vocab_map"] == vocab_map["content_hash"]
    assert {"kd", "uld", "sft", "matched_mass", "aligned_agreement"} <= set(summary["final_train"])
    metrics = json.loads((data / "08_reporting/metrics.json").read_text())
    for key in ("student_bits_per_byte", "teacher_bits_per_byte", "aligned_kl_teacher_student", "aligned_agreement"):
        assert isinstance(metrics[key], float) and metrics[key] >= 0, key
    student_tokens = json.loads((data / "06_models/student/tokenizer.json").read_text())["model"]["type"]
    assert student_tokens == "Unigram"

    # MLflow (one run for the whole `kedro run`): the tokenizer pair and the map's hash.
    import sqlite3

    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        tags = dict(db.execute("SELECT key, value FROM tags WHERE key IN "
                               "('vocab_map_sha256', 'student_tokenizer_fingerprint', 'teacher_tokenizer_fingerprint')"))
    assert tags == {"vocab_map_sha256": vocab_map["content_hash"],
                    "student_tokenizer_fingerprint": vocab_map["student_fingerprint"],
                    "teacher_tokenizer_fingerprint": vocab_map["teacher_fingerprint"]}, tags
