"""Kedro envs override base key by key, and DVC tracks the active env's resolved parameters
(resolved_params.yaml) and outputs (every env writes dvc.yaml's outs when DVC runs it)."""

from __future__ import annotations

import shutil
from functools import reduce
from pathlib import Path

import pytest
import yaml

from kd_pipeline.resolved_params import (
    RESOLVED_PARAMS_FILE,
    check_catalog_matches_dvc_outs,
    config_loader,
    resolved_parameters,
    write_resolved_params,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _project_copy(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    shutil.copytree(PROJECT_ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
    (project / "conf" / "local").mkdir()
    shutil.copy(PROJECT_ROOT / "dvc.yaml", project / "dvc.yaml")
    return project


def _base_params() -> dict:
    params = {}
    for path in sorted((PROJECT_ROOT / "conf" / "base").glob("parameters_*.yml")):
        params.update(yaml.safe_load(path.read_text()))
    return params


def _lookup(params: dict, dotted: str):
    return reduce(lambda node, key: node[key], dotted.split("."), params)


def test_a_one_key_local_override_keeps_every_other_key(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_STAGE", raising=False)
    project = _project_copy(tmp_path)
    (project / "conf" / "local" / "parameters.yml").write_text("distill: {trainer: {max_steps: 2}}\n")
    (project / "conf" / "local" / "mlflow.yml").write_text("tracking: {experiment: {name: mine}}\n")

    loader = config_loader(project, "local")
    loader.config_patterns["mlflow"] = ["mlflow*", "mlflow*/**"]  # as kedro-mlflow's hook adds it
    expected = _base_params()
    expected["distill"]["trainer"]["max_steps"] = 2
    assert loader["parameters"] == expected  # every other stage and distill key as in base
    mlflow_conf = loader["mlflow"]
    assert mlflow_conf["tracking"]["experiment"]["name"] == "mine"
    assert mlflow_conf["tracking"]["experiment"]["create_experiment_kwargs"]["artifact_location"].endswith("mlruns")
    assert mlflow_conf["server"]["mlflow_tracking_uri"].startswith("sqlite:///")

    # What failed before: every `params:` input of every pipeline must exist after the merge.
    from kd_pipeline.pipeline_registry import register_pipelines

    inputs = {name[len("params:"):] for name in register_pipelines()["__default__"].inputs()
              if name.startswith("params:")}
    assert "distill.tracking" in inputs
    for dotted in inputs:
        _lookup(loader["parameters"], dotted)


def test_lists_are_replaced_and_null_clears_a_base_key(tmp_path):
    project = _project_copy(tmp_path)
    (project / "conf" / "local" / "parameters_distill.yml").write_text(
        "distill:\n  student_init: {keep_layers: [0, 29], drop_layers: null}\n  loss: {kd_loss: jsd}\n")
    distill = config_loader(project, "local")["parameters"]["distill"]
    assert distill["student_init"] == {"method": "prune_teacher", "drop_layers": None, "keep_layers": [0, 29]}
    assert distill["loss"]["kd_loss"] == "jsd" and distill["loss"]["kd_loss_weight"] == 0.5

    from kd_pipeline.core.models.student import StudentInit

    assert StudentInit.from_params(distill["student_init"]).keep_layers == [0, 29]


def test_resolved_params_file_holds_the_env_and_every_key_dvc_tracks(tmp_path):
    project = _project_copy(tmp_path)
    path = write_resolved_params(project, "test")
    assert path == project / RESOLVED_PARAMS_FILE
    resolved = yaml.safe_load(path.read_text())
    assert resolved["kedro_env"] == "test"
    assert resolved["teacher_logits"]["k"] == 8  # conf/test
    assert resolved["distill"]["trainer"]["adam_beta2"] == 0.999  # conf/base, not repeated in conf/test
    assert {key: resolved[key] for key in resolved if key != "kedro_env"} == resolved_parameters(project, "test")

    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    tracked = 0
    for name, stage in spec["stages"].items():
        for entry in stage.get("params") or []:
            assert isinstance(entry, dict) and list(entry) == [RESOLVED_PARAMS_FILE], (name, entry)
            for dotted in entry[RESOLVED_PARAMS_FILE]:
                assert dotted.split(".")[0] == name, (name, dotted)  # a stage tracks only its own keys
                _lookup(resolved, dotted)
                tracked += 1
    assert tracked > 30

    # Unchanged values: the file is left alone; a change rewrites it.
    before = path.stat().st_mtime_ns
    write_resolved_params(project, "test")
    assert path.stat().st_mtime_ns == before
    write_resolved_params(project, "local")
    local = yaml.safe_load(path.read_text())
    assert local["kedro_env"] == "local" and local["teacher_logits"]["k"] == 64


def test_an_unknown_env_is_named(tmp_path, monkeypatch):
    project = _project_copy(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"Kedro env 'nightly' \(KEDRO_ENV\) has no folder .*conf/nightly"):
        resolved_parameters(project, "nightly")


def test_under_dvc_every_env_writes_the_dvc_outs(tmp_path, monkeypatch):
    project = _project_copy(tmp_path)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    catalog = config_loader(project, "test")["catalog"]
    assert catalog["student_model"]["path"] == "data/test/06_models/student"  # plain `kedro run --env test`
    with pytest.raises(ValueError, match=r"env 'test': catalog entry 'teacher_model' writes "
                                         r"data/test/06_models/teacher, which no dvc.yaml stage declares"):
        check_catalog_matches_dvc_outs(project, "test")

    monkeypatch.setenv("DVC_STAGE", "distill")  # what DVC sets for a stage's command
    catalog = config_loader(project, "test")["catalog"]
    assert catalog["student_model"]["path"] == "data/06_models/student"
    assert catalog["eval_plots"]["dataset"]["path"] == "data/08_reporting/plots"
    for env in ("test", "local", "base"):
        check_catalog_matches_dvc_outs(project, env)

    (project / "conf" / "local" / "catalog.yml").write_text(
        "eval_metrics: {type: json.JSONDataset, filepath: data/elsewhere/metrics.json}\n")
    with pytest.raises(ValueError, match=r"'eval_metrics' writes data/elsewhere/metrics.json"):
        check_catalog_matches_dvc_outs(project, "local")
