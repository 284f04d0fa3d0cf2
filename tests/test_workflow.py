"""The DVC + MLflow workflow end to end, on a temporary git copy of the project (tiny test env).

`KEDRO_ENV=test dvc repro` twice (the second a no-op); `dvc exp run -S ...kd_loss_weight=0`
runs the SFT-only baseline (distill and evaluate only: the teacher artifact is kept) and
`dvc exp show` lists both with metrics; an override in git-ignored conf/local, under the default
env, re-runs evaluate only; a `--temp` experiment (run in a `.dvc/tmp/exps` copy) logs into the
same MLflow store; `mlflow server` over that store serves the runs with their params, metrics
and tags through the REST API, and is stopped by its PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DISTILL_PARAMS = "conf/test/parameters_distill.yml"
KD_WEIGHT_KEY = "distill.loss.kd_loss_weight"
EVALUATE_PARAMS = "conf/test/parameters_evaluate.yml"
OVERLAP_KEY = "evaluate.metrics.overlap_k"
STAGES = ("corpus_prep", "teacher_logits", "distill", "evaluate")
RESOLVED = "resolved_params.yaml"  # the params file of every stage (kd_pipeline/resolved_params.py)


# --------------------------------------------------------------------------------------------
# Fast: the tracking URI of a DVC temp copy is the user's project store


def _fake_project(root: Path) -> Path:
    (root / "conf" / "base").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[tool.kedro]\n")
    return root


def test_tracking_uri_of_a_dvc_temp_copy_is_the_project_store(tmp_path, monkeypatch):
    from kedro.config import OmegaConfigLoader

    from kd_pipeline.paths import home_project_root, mlflow_tracking_uri
    from kd_pipeline.settings import CONFIG_LOADER_ARGS

    root = _fake_project(tmp_path / "project")
    copy = _fake_project(root / ".dvc" / "tmp" / "exps" / "tmpk3x9_a1")
    shutil.copy(PROJECT_ROOT / "conf" / "base" / "mlflow.yml", copy / "conf" / "base" / "mlflow.yml")
    monkeypatch.delenv("KD_MLFLOW_TRACKING_URI", raising=False)

    monkeypatch.chdir(copy / "conf")  # anywhere inside the temp copy
    assert home_project_root() == root.resolve()
    assert mlflow_tracking_uri() == f"sqlite:///{root.resolve() / 'mlflow.db'}"
    # As kedro-mlflow reads it: the `mlflow` pattern over conf/base/mlflow.yml.
    loader = OmegaConfigLoader(str(copy / "conf"), base_env="base", default_run_env="base",
                               config_patterns={"mlflow": ["mlflow*", "mlflow*/**"]},
                               custom_resolvers=CONFIG_LOADER_ARGS["custom_resolvers"])
    assert loader["mlflow"]["server"]["mlflow_tracking_uri"] == f"sqlite:///{root.resolve() / 'mlflow.db'}"

    monkeypatch.chdir(root)  # the project itself maps to itself
    assert mlflow_tracking_uri() == f"sqlite:///{root.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("KD_MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert mlflow_tracking_uri() == "sqlite:////elsewhere/x.db"


def test_dvc_yaml_declares_the_four_stages_in_order():
    spec = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    assert list(spec["stages"]) == ["resolve_params", *STAGES]
    assert spec["stages"]["resolve_params"]["always_changed"] is True
    for name in STAGES:
        assert spec["stages"][name]["cmd"] == f"kedro run --pipelines {name}"
    # A training change never invalidates extraction: no stage before distill reads distill params.
    for name in ("corpus_prep", "teacher_logits"):
        keys = [key for entry in spec["stages"][name]["params"] for key in entry[RESOLVED]]
        assert not [key for key in keys if key.startswith(("distill", "evaluate"))], keys
    distill_keys = next(entry[RESOLVED] for entry in spec["stages"]["distill"]["params"])
    assert KD_WEIGHT_KEY in distill_keys


def test_evaluate_run_tags_trace_the_artifact(tmp_path, monkeypatch):
    from kd_pipeline.tracking import artifact_tags, dvc_experiment_tags, run_label

    artifact = tmp_path / "data" / "04_feature" / "teacher_topk"
    artifact.mkdir(parents=True)
    (artifact / "manifest.json").write_text("{}")
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {"teacher_logits": {"outs": [
        {"path": "data/04_feature/teacher_topk", "hash": "md5", "md5": "abc123.dir"},
        {"path": "data/08_reporting/teacher_logits_report.json", "hash": "md5", "md5": "def"}]}}}))
    monkeypatch.chdir(tmp_path)
    tags = artifact_tags(Path("data/04_feature/teacher_topk"), lock)
    assert tags == {"teacher_topk_dvc_md5": "abc123.dir",
                    "teacher_topk_manifest_sha256": "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"}
    lock.unlink()  # not produced by DVC: the manifest hash alone
    assert list(artifact_tags(artifact, lock)) == ["teacher_topk_manifest_sha256"]

    monkeypatch.setenv("DVC_EXP_NAME", "sft-only")
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    assert dvc_experiment_tags() == {"dvc_exp_name": "sft-only"}
    assert run_label({"loss": {"kd_loss_weight": 0}}) == "SFT-only"
    assert run_label({"loss": {"kd_loss_weight": 0.5}}) == "KD+SFT"


def test_plots_overlay_kd_and_sft_only_once_both_ran(tmp_path, monkeypatch):
    from kd_pipeline.pipelines.evaluate.nodes import plot_training_curves

    root = _fake_project(tmp_path / "project")
    monkeypatch.chdir(root)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    summary = {"log_history": [{"step": 1, "loss": 2.0, "sft": 3.0}, {"step": 1, "eval_loss": 2.1, "eval_sft": 3.1}]}
    plots = root / "data" / "plots"
    plot_training_curves(summary, {"loss": {"kd_loss_weight": 1.0}}, {"history_dir": "hist"})(plots)
    assert [p.name for p in sorted(plots.glob("*.png"))] == ["training_curves.png"]
    monkeypatch.setenv("DVC_EXP_NAME", "exp-b")
    plot_training_curves(summary, {"loss": {"kd_loss_weight": 0}}, {"history_dir": "hist"})(plots)
    assert [p.name for p in sorted(plots.glob("*.png"))] == ["kd_vs_sft.png", "training_curves.png"]
    assert sorted(p.name for p in (root / "hist").iterdir()) == ["kd_sft.json", "sft_only.json"]
    assert json.loads((root / "hist" / "kd_sft.json").read_text())["dvc_exp_name"] == "exp-a"
    assert (plots / "held_out_loss.csv").read_text() == "step,held_out_loss\n1,3.1\n"


# --------------------------------------------------------------------------------------------
# Slow: the whole loop in a temporary git repository


def _project_files() -> list[str]:
    """Tracked files plus untracked ones git does not ignore (the project before its first commit)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=PROJECT_ROOT, capture_output=True, check=True).stdout.decode()
    return [name for name in out.split("\0") if name and (PROJECT_ROOT / name).is_file()]


def _env(repo: Path) -> dict:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("DVC_", "MLFLOW_", "KEDRO_ENV", "KD_MLFLOW"))}
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "KEDRO_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    })
    return env


def _run(args: list[str], repo: Path, env: dict, timeout: float = 600, stdout_only: bool = False) -> str:
    """Run a command to completion; on timeout kill its whole process group (dvc's kedro child too).
    Returns stdout + stderr (or stdout alone)."""
    started = time.monotonic()
    process = subprocess.Popen(args, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(args)} timed out after {timeout} s:\n{(stdout + stderr)[-6000:]}")
    print(f"[{time.monotonic() - started:6.1f} s] {' '.join(args)}")
    output = stdout + stderr
    assert process.returncode == 0, f"{' '.join(args)} failed ({process.returncode}):\n{output[-6000:]}"
    return stdout if stdout_only else output


def _ran(output: str) -> list[str]:
    return [name for name in STAGES if f"Running stage '{name}'" in output]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rest(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_dvc_experiments_and_mlflow_comparison(tmp_path):
    repo = tmp_path / "project"
    for name in _project_files():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / name, repo / name)
    env = _env(repo)
    test_env = {**env, "KEDRO_ENV": "test"}  # the tiny env, as a user selects it
    git = ["git", "-c", "init.defaultBranch=main"]
    _run([*git, "init", "-q"], repo, env)
    if not (repo / ".dvc" / "config").is_file():
        _run(["dvc", "init", "-q"], repo, env)
    _run(["dvc", "config", "core.analytics", "false"], repo, env)
    _run([*git, "add", "-A"], repo, env)
    _run([*git, "commit", "-qm", "project"], repo, env)

    # 1. The whole pipeline in the test env, then a no-op. Outputs are dvc.yaml's (data/...),
    # parameters the test env's as resolved over base.
    out = _run(["dvc", "repro"], repo, test_env)
    assert _ran(out) == list(STAGES), out[-3000:]
    # Each stage ends with its summary: outputs, headline metrics, the MLflow run, how to open it.
    assert "kd_pipeline: evaluate done (Kedro env test)" in out and "held-out:" in out, out[-3000:]
    assert "  student:                data/06_models/student" in out and "mlflow ui --backend-store-uri sqlite:///" in out
    resolved = yaml.safe_load((repo / RESOLVED).read_text())
    assert resolved["kedro_env"] == "test" and resolved["teacher_logits"]["k"] == 8, resolved
    assert not (repo / "data/test/06_models").exists()
    metrics = json.loads((repo / "data/08_reporting/metrics.json").read_text())
    for key in ("student_nll", "student_ppl", "teacher_nll", "kl_teacher_student_topk", "kl_student_teacher_topk",
                "top1_agreement", "topk_overlap", "kl_teacher_student_full", "top1_agreement_full"):
        assert isinstance(metrics[key], float), key
    assert (repo / "data/08_reporting/plots/training_curves.png").is_file()
    assert "## Prompt 1" in (repo / "data/08_reporting/generations.txt").read_text()
    out = _run(["dvc", "repro"], repo, test_env)
    assert _ran(out) == [] and all(f"Stage '{name}' didn't change" in out for name in STAGES), out[-3000:]
    _run([*git, "add", "-A"], repo, env)
    _run([*git, "commit", "-qm", "baseline run"], repo, env)
    artifact_lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["teacher_logits"]["outs"]

    # 2. A training parameter changes: the SFT-only baseline as an experiment. Only distill and
    # evaluate run; the teacher artifact is the cached one. Both rows in `dvc exp show`.
    # (It also registers its student: `distill.tracking.register_as`.)
    out = _run(["dvc", "exp", "run", "-n", "sft-only", "-S", f"{DISTILL_PARAMS}:{KD_WEIGHT_KEY}=0",
                "-S", f"{DISTILL_PARAMS}:distill.tracking.register_as=kd-student"], repo, test_env)
    assert _ran(out) == ["distill", "evaluate"], out[-3000:]
    assert yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["teacher_logits"]["outs"] == artifact_lock
    assert (repo / "data/08_reporting/plots/kd_vs_sft.png").is_file()  # both kinds now exist
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], repo, env, stdout_only=True))
    rows = _exp_rows(shown)
    assert {"sft-only"} <= set(rows), rows.keys()
    baseline = rows["__baseline__"]
    assert baseline["kd_loss_weight"] != 0 and rows["sft-only"]["kd_loss_weight"] == 0
    for row in (baseline, rows["sft-only"]):
        assert isinstance(row["metrics"].get("student_nll"), float), row
        assert isinstance(row["metrics"].get("kl_teacher_student_topk"), float), row
    # `dvc plots show`: the held-out curve once, against the optimizer step; the PNG; no errors.
    plots = json.loads(_run(["dvc", "plots", "show", "--json"], repo, env, stdout_only=True))
    assert not plots.get("errors"), plots.get("errors")
    curves = [spec for entries in plots["data"].values() for spec in entries if spec["type"] == "vega"]
    assert len(curves) == 1 and curves[0]["content"]["encoding"]["x"]["field"] == "step", curves
    assert [name for name, entries in plots["data"].items() if entries[0]["type"] == "image"] == [
        "data/08_reporting/plots/training_curves.png"]

    # 3. The user's own override in git-ignored conf/local, under the default env (`local`):
    # the test env's files there (a user's full local config) with one evaluate key changed.
    # Resolved values differ from the baseline in that key only: evaluate alone re-runs.
    _run([*git, "checkout", "--", "."], repo, env)
    _run(["dvc", "checkout", "-q"], repo, env)
    for test_file in sorted((repo / "conf" / "test").glob("parameters_*.yml")):
        shutil.copy(test_file, repo / "conf" / "local" / test_file.name)
    local_evaluate = repo / "conf" / "local" / "parameters_evaluate.yml"
    local_evaluate.write_text(local_evaluate.read_text().replace("overlap_k: null", "overlap_k: 4"))
    out = _run(["dvc", "repro"], repo, env)
    assert _ran(out) == ["evaluate"], out[-3000:]
    resolved = yaml.safe_load((repo / RESOLVED).read_text())
    assert resolved["kedro_env"] == "local" and resolved["evaluate"]["metrics"]["overlap_k"] == 4, resolved
    assert json.loads((repo / "data/08_reporting/metrics.json").read_text())["overlap_k"] == 4.0
    for local_file in (repo / "conf" / "local").glob("parameters_*.yml"):
        local_file.unlink()

    # 4. A --temp experiment runs in .dvc/tmp/exps/... and logs to the same store. (It changes an
    # evaluate parameter, so that only evaluate runs: the temp-copy mechanics are the same.)
    _run([*git, "checkout", "--", "."], repo, env)
    _run(["dvc", "checkout", "-q"], repo, env)
    out = _run(["dvc", "exp", "run", "--temp", "-n", "overlap-2", "-S", f"{EVALUATE_PARAMS}:{OVERLAP_KEY}=2"],
               repo, test_env)
    assert _ran(out) == ["evaluate"], out[-3000:]
    assert not list((repo / ".dvc" / "tmp" / "exps").rglob("mlflow.db"))
    shown = _exp_rows(json.loads(_run(["dvc", "exp", "show", "--json"], repo, env, stdout_only=True)))
    assert shown["overlap-2"]["metrics"]["overlap_k"] == 2.0, shown["overlap-2"]

    # 5. mlflow server over the project's store: runs, params, metrics, inputs and models,
    # read through MLflow's client (REST) and raw REST.
    port = _free_port()
    server = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{repo / 'mlflow.db'}", "--workers", "1"],
        cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, "mlflow server exited"
            assert time.monotonic() < deadline, "mlflow server did not answer /health in 60 s"
            time.sleep(0.5)
        _check_mlflow(base, artifact_lock)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and its workers
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


HELD_OUT = ("heldout/student_nll", "heldout/teacher_nll", "heldout/kl_teacher_student_topk",
            "heldout/kl_student_teacher_topk", "heldout/top1_agreement", "heldout/topk_overlap")


def _check_mlflow(base: str, artifact_lock: list[dict]) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=base, registry_uri=base)
    experiment = client.get_experiment_by_name("kd_pipeline")
    # Opens as a model-training experiment (runs table), not MLflow 3's GenAI view.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development", experiment.tags
    runs = {run.info.run_id: run for run in client.search_runs([experiment.experiment_id], max_results=100)}
    names = sorted(run.info.run_name for run in runs.values())
    # Named from what varies (the test env: fwd_kl, weight 1, T 1, k 8), or the DVC experiment.
    assert names == sorted(["corpus_prep kjv_chat random_init", "teacher_logits k8 logquant_zstd",
                            "distill kd fwd_kl w1 T1 sft0.5 k8", "evaluate kd fwd_kl w1 T1 sft0.5 k8",
                            "distill sft-only", "evaluate sft-only", "evaluate kd fwd_kl w1 T1 sft0.5 k8",
                            "evaluate overlap-2"]), names

    # The same flattened project params (all four stages) in every run, whatever the route; none
    # of HF's TrainingArguments or model config; no tag holding an object repr.
    param_keys = {frozenset(run.data.params) for run in runs.values()}
    assert len(param_keys) == 1, [sorted(keys)[:5] for keys in param_keys]
    keys = next(iter(param_keys))
    assert {KD_WEIGHT_KEY, "distill.trainer.learning_rate", "teacher_logits.k", OVERLAP_KEY,
            "corpus_prep.source.kind", "evaluate.generation.max_new_tokens"} <= keys
    assert not {"hub_token", "learning_rate", "per_device_train_batch_size"} & keys and len(keys) < 120, len(keys)
    assert not [run.data.tags for run in runs.values() if "object at 0x" in " ".join(run.data.tags.values())]

    teacher_md5 = _md5_of(artifact_lock)
    by_name: dict[str, list] = {}
    for run in runs.values():
        by_name.setdefault(run.info.run_name, []).append(run)

    # distill: step metrics from our callback (held-out at eval_steps 2 and 4), dataset inputs.
    kd_distill, = by_name["distill kd fwd_kl w1 T1 sft0.5 k8"]
    history = client.get_metric_history(kd_distill.info.run_id, "heldout/sft")
    assert [point.step for point in history] == [0, 2, 4], history  # eval_on_start, then every 2 steps
    assert [point.step for point in client.get_metric_history(kd_distill.info.run_id, "train/loss")] == [1, 2, 3, 4]
    assert "loss" not in kd_distill.data.metrics and "eval_loss" not in kd_distill.data.metrics
    assert sorted(kd_distill.data.metrics)[0].startswith("heldout/"), sorted(kd_distill.data.metrics)
    # Logged first (eval_on_start), so listed first: the UI's default metric in the compare view.
    assert next(iter(_rest(base, f"/api/2.0/mlflow/runs/get?run_id={kd_distill.info.run_id}")["run"]["data"][
        "metrics"]))["key"].startswith("heldout/")
    inputs = _inputs(kd_distill)
    assert inputs["teacher_topk"] == ("training", teacher_md5), inputs
    assert inputs["tokenized_corpus"][0] == "training" and inputs["tokenized_corpus"][1].endswith(".dir"), inputs
    sft_distill, = by_name["distill sft-only"]
    assert set(_inputs(sft_distill)) == {"tokenized_corpus"}  # an SFT-only student never reads the artifact

    # The student, logged once per distill run as an MLflow transformers model; the sft-only
    # one registered as requested.
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert sorted(model.source_run_id for model in models) == sorted([kd_distill.info.run_id, sft_distill.info.run_id])
    model_dir = Path(models[0].artifact_location.removeprefix("file://"))
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    assert "transformers" in mlmodel["flavors"] and mlmodel["flavors"]["transformers"]["task"] == "text-generation"
    assert "Continue this passage" in (model_dir / mlmodel["saved_input_example_info"]["artifact_path"]).read_text()
    assert "components" in mlmodel["flavors"]["transformers"] and "tokenizer" in mlmodel["flavors"]["transformers"][
        "components"], mlmodel["flavors"]["transformers"]
    versions = _rest(base, "/api/2.0/mlflow/model-versions/search?filter=name%3D%27kd-student%27")["model_versions"]
    assert [(v["version"], v["run_id"]) for v in versions] == [("1", sft_distill.info.run_id)], versions

    # evaluate: held-out metrics under names that sort first, params and tags to compare by.
    evaluated = []
    for run in runs.values():
        if not run.info.run_name.startswith("evaluate"):
            continue
        assert set(HELD_OUT) <= set(run.data.metrics), run.data.metrics
        tags = run.data.tags
        assert tags["teacher_topk_dvc_md5"] == teacher_md5, tags
        assert len(tags["teacher_topk_manifest_sha256"]) == 64
        assert _inputs(run)["teacher_topk"] == ("evaluation", teacher_md5)
        params = run.data.params
        evaluated.append((tags.get("dvc_exp_name", "workspace"), float(params[KD_WEIGHT_KEY]), params[OVERLAP_KEY]))
    assert sorted(evaluated) == [("overlap-2", 1.0, "2"), ("sft-only", 0.0, "None"), ("workspace", 1.0, "4"),
                                 ("workspace", 1.0, "None")], evaluated
    # The temp experiment really ran in a temporary copy.
    overlap_run, = by_name["evaluate overlap-2"]
    assert "/.dvc/tmp/exps/" in overlap_run.data.tags["project_path"], overlap_run.data.tags


def _inputs(run) -> dict[str, tuple[str, str]]:
    """`dataset name -> (context, digest)` of a run's MLflow dataset inputs."""
    inputs = {}
    for dataset_input in run.inputs.dataset_inputs:
        context = next((tag.value for tag in dataset_input.tags if tag.key == "mlflow.data.context"), None)
        inputs[dataset_input.dataset.name] = (context, dataset_input.dataset.digest)
    return inputs


def _md5_of(outs: list[dict]) -> str:
    return next(out["md5"] for out in outs if out["md5"].endswith(".dir"))


def _exp_rows(shown: list) -> dict[str, dict]:
    """`name -> {kd_loss_weight, metrics}` from `dvc exp show --json` (baseline as __baseline__)."""
    rows = {}

    def row_of(entry: dict) -> dict:
        data = entry["data"]
        params = data["params"][RESOLVED]["data"]
        weight = params["distill"]["loss"]["kd_loss_weight"]
        metrics = next(iter(data.get("metrics", {}).values()), {}).get("data", {})
        return {"kd_loss_weight": weight, "metrics": metrics}

    for commit in shown:
        if commit.get("rev") == "workspace":
            continue
        rows["__baseline__"] = row_of(commit)
        for exp in commit.get("experiments") or []:
            for revision in exp.get("revs", []):
                rows[exp.get("name") or revision.get("name")] = row_of(revision)
    return rows
