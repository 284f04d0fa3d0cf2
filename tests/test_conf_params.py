"""Every shipped parameter file builds the core configs its nodes build (no unknown keys, valid
values), so a default edited in conf/ fails here in seconds instead of minutes into `make run`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from transformers import TrainingArguments

from kd_pipeline.core.corpus import CorpusConfig
from kd_pipeline.core.corpus_sources import KJVChatSource
from kd_pipeline.core.cross_tokenizer.config import CrossTokenizerConfig
from kd_pipeline.core.evaluation.generation import GenerationConfig
from kd_pipeline.core.evaluation.metrics import EvalConfig
from kd_pipeline.core.extraction.config import ExtractionConfig
from kd_pipeline.core.losses import KDLossConfig
from kd_pipeline.core.models.student import StudentInit, select_layers
from kd_pipeline.core.models.teacher import TeacherSource
from kd_pipeline.core.params import require_choice, require_int
from kd_pipeline.core.topk_store import VERIFY_MODES
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
    require_int("distill", "k", distill["k"], minimum=1, allow_none=True)
    require_choice("distill", "topk_verify", distill["topk_verify"], VERIFY_MODES)
    EvalConfig.from_params(params["evaluate"]["metrics"])
    GenerationConfig.from_params(params["evaluate"]["generation"])
    assert CrossTokenizerConfig.from_params(distill["cross_tokenizer"]) is None  # shipped: the teacher's tokenizer


def test_default_student_drops_the_deep_block_and_keeps_the_last_three_layers():
    init = StudentInit.from_params(_params("base")["distill"]["student_init"])
    keep = select_layers(30, init.keep_layers, init.keep_every, init.num_layers, init.drop_layers)
    assert keep == list(range(22)) + [27, 28, 29]


# --------------------------------------------------------------------------------------------
# One source of defaults: conf/base holds the dataclass defaults

#: Fields conf/base sets differently from the dataclass default on purpose, and why.
DELIBERATE = {
    ("distill.student_init", "drop_layers"): "SmolLM2-135M's own layer choice; the library default "
                                             "(a third of the layers, evenly spaced) fits a teacher of any depth",
    ("distill.loss", "chunk_size"): "256 suits the SmolLM2 student on CPU (1.5x faster loss than the automatic 64, "
                                    "+50 MB); the library's automatic size keeps any shape near its memory floor",
    ("distill.trainer", "arguments"): "Hugging Face TrainingArguments, passed through: their defaults are HF's, "
                                      "conf/base gives the project's values",
}


def _base_sections() -> dict:
    params = _params("base")
    corpus, distill, evaluate = params["corpus_prep"], params["distill"], params["evaluate"]

    def own(values: dict, skip: tuple[str, ...]) -> dict:
        return {key: value for key, value in values.items() if key not in skip}

    return {
        "corpus_prep": (CorpusConfig, CorpusConfig.from_params(own(corpus, ("source", "teacher")))),
        "corpus_prep.teacher": (TeacherSource, TeacherSource.from_params(corpus["teacher"])),
        "corpus_prep.source": (KJVChatSource, KJVChatSource(**own(corpus["source"], ("kind",)))),
        "teacher_logits": (ExtractionConfig, ExtractionConfig.from_params(params["teacher_logits"])),
        "distill.student_init": (StudentInit, StudentInit.from_params(distill["student_init"])),
        "distill.loss": (KDLossConfig, KDLossConfig.from_dict(distill["loss"])),
        "distill.trainer": (TrainConfig, TrainConfig.from_dict(distill["trainer"])),
        "evaluate.metrics": (EvalConfig, EvalConfig.from_params(evaluate["metrics"])),
        "evaluate.generation": (GenerationConfig, GenerationConfig.from_params(evaluate["generation"])),
    }


@pytest.mark.parametrize("section", sorted(_base_sections()))
def test_base_parameters_are_the_dataclass_defaults(section):
    cls, configured = _base_sections()[section]
    defaults = cls()
    for spec in dataclasses.fields(cls):
        if (section, spec.name) in DELIBERATE:
            continue
        shipped, default = getattr(configured, spec.name), getattr(defaults, spec.name)
        assert shipped == default, f"{section}.{spec.name}: conf/base has {shipped!r}, the dataclass default is {default!r}"


def test_base_trainer_arguments_are_training_arguments_names():
    trainer = _params("base")["distill"]["trainer"]
    own = {spec.name for spec in dataclasses.fields(TrainConfig)}
    passed = {key for key in trainer if key not in own}
    assert passed and passed == set(TrainConfig.from_dict(trainer).arguments)
    assert passed <= {spec.name for spec in dataclasses.fields(TrainingArguments)}
