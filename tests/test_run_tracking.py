"""The MLflow run's identity (name from what varies, flattened params) and the end-of-run summary."""

from __future__ import annotations

import pytest

from kd_pipeline.tracking import flatten_params, run_name, run_summary, student_description

PARAMS = {
    "corpus_prep": {"source": {"kind": "kjv_chat"}, "teacher": {"kind": "embedded_gguf"}},
    "teacher_logits": {"k": 64, "codec": "logquant_zstd"},
    "distill": {"k": None, "loss": {"kd_loss": "fwd_kl", "kd_loss_weight": 0.5, "sft_loss_weight": 1.0,
                                    "logits_scale": 1.0, "beta": 0.5}},
}


@pytest.fixture(autouse=True)
def _no_dvc_experiment(monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)


def _with_loss(**loss) -> dict:
    return {**PARAMS, "distill": {**PARAMS["distill"], "loss": {**PARAMS["distill"]["loss"], **loss}}}


def test_student_description_names_what_varies():
    assert student_description(PARAMS) == "kd fwd_kl w0.5 T1 k64"
    assert student_description(_with_loss(kd_loss="jsd", beta=0.25, logits_scale=0.5, sft_loss_weight=0.5)) \
        == "kd jsd b0.25 w0.5 T2 sft0.5 k64"
    assert student_description({**PARAMS, "distill": {**PARAMS["distill"], "k": 16}}) == "kd fwd_kl w0.5 T1 k16"
    assert student_description(_with_loss(kd_loss_weight=0)) == "sft-only"


def test_run_name_per_stage_and_dvc_experiment(monkeypatch):
    assert run_name(["distill"], PARAMS) == "distill kd fwd_kl w0.5 T1 k64"
    assert run_name(["__default__"], PARAMS) == "all kd fwd_kl w0.5 T1 k64"
    assert run_name(["evaluate", "distill"], PARAMS) == "distill+evaluate kd fwd_kl w0.5 T1 k64"
    assert run_name(["evaluate"], _with_loss(kd_loss_weight=0)) == "evaluate sft-only"
    assert run_name(["teacher_logits"], PARAMS) == "teacher_logits k64 logquant_zstd"
    assert run_name(["corpus_prep"], PARAMS) == "corpus_prep kjv_chat embedded_gguf"
    monkeypatch.setenv("DVC_EXP_NAME", "lr-sweep-3")
    assert run_name(["distill"], PARAMS) == "distill lr-sweep-3"


def test_flatten_params_matches_kedro_mlflow_keys():
    flat = flatten_params({"distill": {"loss": {"kd_loss_weight": 0.5}, "k": None, "student_init": {
        "drop_layers": [1, 2]}, "tracking": {}}})
    assert flat == {"distill.loss.kd_loss_weight": "0.5", "distill.k": "None",
                    "distill.student_init.drop_layers": "[1, 2]", "distill.tracking": "{}"}
    assert len(flatten_params({"a": "x" * 7000})["a"]) == 6000


def test_run_summary_lists_outputs_and_headline_metrics():
    text = run_summary(["distill", "evaluate"], "test",
                       {"student": "data/06_models/student", "metrics": "data/08_reporting/metrics.json"},
                       {"student_nll": 3.3401, "teacher_nll": 2.89, "top1_agreement": 0.5, "student_ppl": 28.2},
                       {"global_step": 29, "final_eval": {"eval_sft": 3.35, "eval_loss": 3.5}})
    assert text.splitlines() == [
        "kd_pipeline: distill, evaluate done (Kedro env test)",
        "  student:                data/06_models/student",
        "  metrics:                data/08_reporting/metrics.json",
        "  training:               29 steps, eval_sft 3.35, eval_loss 3.5",
        "  held-out:               student_nll 3.34, teacher_nll 2.89, top1_agreement 0.5",
    ]


def test_runner_tag_is_the_class_name():
    from kd_pipeline.hooks import _runner_name

    class SequentialRunner:
        pass

    assert _runner_name("<kedro.runner.sequential_runner.SequentialRunner object at 0x7f7afd807990>") == "SequentialRunner"
    assert _runner_name(SequentialRunner()) == "SequentialRunner"
    assert _runner_name("ParallelRunner") == "ParallelRunner" and _runner_name(None) is None


def test_the_capture_mode_and_full_vocab_kl_are_logged_as_mlflow_params():
    """The project's parameters as the hook logs them (flattened): the artifact's capture mode
    is a column of the MLflow table, next to the evaluation's full-vocabulary switch."""
    from pathlib import Path

    import yaml

    conf = Path(__file__).resolve().parents[1] / "conf" / "base"
    params = {}
    for name in ("parameters_teacher_logits.yml", "parameters_evaluate.yml"):
        params.update(yaml.safe_load((conf / name).read_text()))
    flat = flatten_params(params)
    assert flat["teacher_logits.capture.mode"] == "topk"
    assert flat["evaluate.metrics.full_vocab_kl"] == "True"


def test_vocab_map_tags_name_the_tokenizer_pair_and_the_map(tmp_path):
    import json

    from kd_pipeline.tracking import vocab_map_tags

    summary = {"content_hash": "ab" * 32, "teacher_fingerprint": "t" * 64, "student_fingerprint": "s" * 64,
               "teacher_matched_ids": "48953", "student_matched_ids": "7979"}
    (tmp_path / "vocab_map.json").write_text(json.dumps(summary))
    tags = vocab_map_tags(tmp_path, {"student_tokenizer": "data/06_models/student_tokenizer"})
    assert tags == {"cross_tokenizer_student_tokenizer": "data/06_models/student_tokenizer",
                    "teacher_tokenizer_fingerprint": "t" * 64, "student_tokenizer_fingerprint": "s" * 64,
                    "vocab_map_sha256": "ab" * 32, "vocab_map_matched_teacher_ids": "48953",
                    "vocab_map_matched_student_ids": "7979"}
    (tmp_path / "vocab_map.json").write_text(json.dumps({"cross_tokenizer": None}))
    assert vocab_map_tags(tmp_path, None) == {}  # the student shares the teacher's tokenizer
