"""`make viz` (kedro-viz in .venv-viz layered on .venv): `kedro viz run` starts on a copy of the
project and its REST API serves the four pipelines with their nodes.

kedro-viz is not a project dependency (it pulls ipython, plotly, fastapi, ...), so this runs with
the interpreter named by KD_VIZ_PYTHON (e.g. `KD_VIZ_PYTHON=.venv-viz/bin/python`), or the test
interpreter if it has kedro_viz; otherwise it is skipped.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _viz_python() -> str | None:
    candidates = [os.environ.get("KD_VIZ_PYTHON"), str(PROJECT_ROOT / ".venv-viz" / "bin" / "python"), sys.executable]
    for python in filter(None, candidates):
        if Path(python).is_file() and subprocess.run([python, "-c", "import kedro_viz"],
                                                     capture_output=True).returncode == 0:
            return python
    return None


def _free_port() -> int:
    """A free port below 49152: kedro-viz refuses the ephemeral range the OS hands out for port 0."""
    for port in random.sample(range(20000, 49000), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-49000")


@pytest.mark.slow
def test_kedro_viz_serves_the_pipelines(tmp_path):
    python = _viz_python()
    if python is None:
        pytest.skip("kedro-viz is not installed (make viz installs it in .venv-viz)")
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy(PROJECT_ROOT / name, project / name)
    shutil.copytree(PROJECT_ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
    (project / "conf" / "local").mkdir()
    shutil.copytree(PROJECT_ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    port = _free_port()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(KEDRO_DISABLE_TELEMETRY="true", KD_MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    server = subprocess.Popen([python, "-m", "kedro", "viz", "run", "--no-browser", "--host", "127.0.0.1",
                               "--port", str(port)], cwd=project, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/main", timeout=5) as response:
                    graph = json.loads(response.read())
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"kedro viz exited ({server.returncode}):\n{server.stdout.read()[-4000:]}")
                assert time.monotonic() < deadline, "kedro viz did not serve /api/main in 120 s"
                time.sleep(1)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()

    pipelines = {pipeline["id"] for pipeline in graph["pipelines"]}
    assert {"__default__", "corpus_prep", "teacher_logits", "distill", "evaluate"} <= pipelines, pipelines
    tasks = {node["name"] for node in graph["nodes"] if node["type"] == "task"}
    assert {"prepare_teacher_model", "tokenize_corpus", "extract_teacher_topk", "train_student",
            "summarize_training", "evaluate_student", "generate_samples", "track_evaluation"} <= tasks, tasks
    datasets = {node["name"] for node in graph["nodes"] if node["type"] == "data"}
    assert {"teacher_topk", "student_model", "eval_metrics"} <= datasets, datasets
