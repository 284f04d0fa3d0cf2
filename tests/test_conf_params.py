"""Every shipped parameter file builds the core configs its nodes build (no unknown keys, valid
values), so a default edited in conf/ fails here in seconds instead of minutes into `make run`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kd_pipeline.core.corpus import CorpusConfig
from kd_pipeline.core.evaluation.generation import GenerationConfig
from kd_pipeline.core.evaluation.metrics import EvalConfig
from kd_pipeline.core.extraction.config import ExtractionConfig
from kd_pipeline.core.losses import KDLossConfig
from kd_pipeline.core.models.student import StudentInit, select_layers
from kd_pipeline.core.models.teacher import TeacherSource
from kd_pipeline.core.training.config import TrainConfig

CONF = Path(__file__).resolve().parents[1] / "conf"


def _params(env: str) -> dict:
    params = {}
    for path in sorted((CONF / env).glob("parameters_*.yml")):
        params.update(yaml.safe_load(path.read_text()) or {})
    return params


@pytest.mark.parametrize("env", ["base", "test"])
def test_shipped_parameters_build_the_core_configs(env):
    params = _params(env)
    corpus = params["corpus_prep"]
    TeacherSource.from_params(corpus["teacher"])
    CorpusConfig.from_params({key: value for key, value in corpus.items() if key not in ("source", "teacher")})
    ExtractionConfig.from_params(params["teacher_logits"])
    distill = params["distill"]
    StudentInit.from_params(distill["student_init"])
    KDLossConfig.from_dict(distill["loss"])
    TrainConfig.from_dict(distill["trainer"])
    EvalConfig.from_params(params["evaluate"]["metrics"])
    GenerationConfig.from_params(params["evaluate"]["generation"])


def test_default_student_drops_the_deep_block_and_keeps_the_last_three_layers():
    init = StudentInit.from_params(_params("base")["distill"]["student_init"])
    keep = select_layers(30, init.keep_layers, init.keep_every, init.num_layers, init.drop_layers)
    assert keep == list(range(22)) + [27, 28, 29]
