"""core.evaluation against an independent float64 reference on tiny random models.

The reference runs each sample alone (no batching, no padding), takes the full `[T, V]` logits
of a float64 copy of the model and applies the metric definitions position by position.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from kd_pipeline.core.batching import PositionMismatchError
from kd_pipeline.core.evaluation.generation import (
    GenerationConfig,
    chat_prompt_ids,
    format_generations,
    generate_greedy,
)
from kd_pipeline.core.evaluation.metrics import STUDENT_METRICS, TEACHER_METRICS, EvalConfig, evaluate_student
from kd_pipeline.core.plots import curves, held_out_loss_key, plot_loss_curves, train_loss_key
from kd_pipeline.core.tiny import tiny_llama_config

K = 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_model(seed: int, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = tiny_llama_config(**overrides)
    model_type = config.pop("model_type")
    # A wide init so that the next-token distributions are far from uniform (the metrics then
    # sit well above float noise, and argmax / top-k have clear gaps).
    config.setdefault("initializer_range", 0.4)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).float().eval()


def make_samples(seed: int = 0, n: int = 7, vocab: int = 512) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids, masks, sample_ids = [], [], []
    for index in range(n):
        length = int(rng.integers(4, 23))
        mask = (rng.random(length) < 0.6).astype(np.int8)
        mask[0] = 0
        if index == 3:
            mask[:] = 0  # a sample without trained tokens: no rows, no effect
        ids.append(rng.integers(0, vocab, length).astype(np.int32).tolist())
        masks.append(mask.tolist())
        sample_ids.append(f"{index:032x}")
    return pa.table({
        "sample_id": pa.array(sample_ids, pa.string()),
        "input_ids": pa.array(ids, pa.list_(pa.int32())),
        "loss_mask": pa.array(masks, pa.list_(pa.int8())),
    })


_F64_CACHE: dict = {}


def full_logprobs_f64(model, input_ids: list[int]) -> np.ndarray:
    """[T, V] float64 log-softmax of a float64 copy of `model` on one unpadded sample (cached)."""
    import copy

    key = (id(model), tuple(input_ids))
    if key not in _F64_CACHE:
        double = _F64_CACHE.setdefault(id(model), copy.deepcopy(model).double())
        with torch.no_grad():
            logits = double(torch.tensor([input_ids])).logits[0]
        _F64_CACHE[key] = torch.log_softmax(logits, dim=-1).numpy()
    return _F64_CACHE[key]


class FakeReader:
    """An artifact reader built from a teacher's float64 log-probs, as TopKReader would decode it."""

    def __init__(self, teacher, samples: pa.Table, k: int = K, as_dict: bool = False, shift: int = 0):
        self.records, self.as_dict = {}, as_dict
        for sample_id, ids, mask in zip(*(samples[c].to_pylist() for c in ("sample_id", "input_ids", "loss_mask"))):
            positions = np.flatnonzero(mask) - 1
            logprobs = full_logprobs_f64(teacher, ids)[positions]  # [n, V]
            order = np.argsort(-logprobs, axis=-1, kind="stable")[:, :k]
            self.records[sample_id] = {
                "positions": positions + shift,
                "topk_ids": order.astype(np.int32),
                "topk_logprobs": np.take_along_axis(logprobs, order, -1).astype(np.float32),
                "target_logprobs": logprobs[np.arange(len(positions)), np.asarray(ids)[positions + 1]].astype(np.float32),
            }

    def get_many(self, sample_ids):
        if self.as_dict:
            return {sample_id: self.records[sample_id] for sample_id in sample_ids}
        return [self.records[sample_id] for sample_id in sample_ids]


def reference_metrics(student, samples: pa.Table, reader: FakeReader | None, overlap_k: int = K) -> dict:
    """The metric definitions applied token by token in float64."""
    per_token: dict[str, list[float]] = {name: [] for name in (
        "student_nll", "teacher_nll", "kl_ts", "kl_st", "top1", "overlap", "t_mass", "s_mass")}
    for sample_id, ids, mask in zip(*(samples[c].to_pylist() for c in ("sample_id", "input_ids", "loss_mask"))):
        logprobs = full_logprobs_f64(student, ids)
        record = reader.records[sample_id] if reader else None
        row = 0
        for t in range(1, len(ids)):
            if not mask[t]:
                continue
            p = t - 1  # the output at position p predicts token t = p + 1
            per_token["student_nll"].append(-logprobs[p, ids[t]])
            if record is None:
                continue
            assert record["positions"][row] == p
            top_ids = record["topk_ids"][row].astype(np.int64)
            teacher_lp = record["topk_logprobs"][row].astype(np.float64)
            teacher_p = np.exp(teacher_lp) / np.exp(teacher_lp).sum()
            student_p = np.exp(logprobs[p, top_ids]) / np.exp(logprobs[p, top_ids]).sum()
            per_token["teacher_nll"].append(-float(record["target_logprobs"][row]))
            per_token["kl_ts"].append(float(np.sum(teacher_p * np.log(teacher_p / student_p))))
            per_token["kl_st"].append(float(np.sum(student_p * np.log(student_p / teacher_p))))
            per_token["top1"].append(float(np.argmax(logprobs[p]) == top_ids[0]))
            student_top = set(np.argsort(-logprobs[p])[:overlap_k].tolist())
            per_token["overlap"].append(len(student_top & set(top_ids[:overlap_k].tolist())) / overlap_k)
            per_token["t_mass"].append(float(np.exp(teacher_lp).sum()))
            per_token["s_mass"].append(float(np.exp(logprobs[p, top_ids]).sum()))
            row += 1
        if record is not None:
            assert row == len(record["positions"])
    mean = {name: float(np.mean(values)) if values else None for name, values in per_token.items()}
    out = {"num_samples": samples.num_rows, "num_tokens": len(per_token["student_nll"]),
           "student_nll": mean["student_nll"], "student_ppl": math.exp(mean["student_nll"])}
    if reader is not None:
        out.update({
            "teacher_nll": mean["teacher_nll"], "teacher_ppl": math.exp(mean["teacher_nll"]),
            "nll_gap": mean["student_nll"] - mean["teacher_nll"],
            "kl_teacher_student_topk": mean["kl_ts"], "kl_student_teacher_topk": mean["kl_st"],
            "top1_agreement": mean["top1"], "topk_overlap": mean["overlap"], "overlap_k": overlap_k,
            "teacher_topk_mass": mean["t_mass"], "student_mass_on_teacher_topk": mean["s_mass"],
        })
    return out


@pytest.fixture(scope="module")
def student():
    return tiny_model(seed=1)


@pytest.fixture(scope="module")
def teacher():
    return tiny_model(seed=2)


@pytest.fixture(scope="module")
def samples():
    return make_samples()


@pytest.fixture(scope="module")
def reader(teacher, samples):
    return FakeReader(teacher, samples)


def assert_metrics_close(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert actual[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("batch_size,token_chunk_size", [(1, 512), (3, 5), (16, 1)])
def test_metrics_match_float64_reference(student, samples, reader, batch_size, token_chunk_size):
    config = EvalConfig(batch_size=batch_size, token_chunk_size=token_chunk_size)
    actual = evaluate_student(student, samples, reader, config)
    expected = reference_metrics(student, samples, reader)
    assert_metrics_close(actual, expected)
    # Far from trivial values, so the comparison means something.
    assert expected["kl_teacher_student_topk"] > 0.05 and expected["kl_student_teacher_topk"] > 0.05
    assert 0 < expected["topk_overlap"] < 1


def test_overlap_k_and_dict_reader(student, teacher, samples):
    reader = FakeReader(teacher, samples, as_dict=True)
    actual = evaluate_student(student, samples, reader, EvalConfig(batch_size=2, overlap_k=3))
    assert_metrics_close(actual, reference_metrics(student, samples, reader, overlap_k=3))


def test_student_only_without_artifact(student, samples):
    actual = evaluate_student(student, samples, None, EvalConfig(batch_size=4))
    assert sorted(actual) == sorted(STUDENT_METRICS)
    assert_metrics_close(actual, reference_metrics(student, samples, None))


def test_teacher_equal_to_student_gives_zero_divergence(student, samples):
    reader = FakeReader(student, samples)
    metrics = evaluate_student(student, samples, reader, EvalConfig(batch_size=4))
    assert set(TEACHER_METRICS) <= set(metrics)
    assert metrics["kl_teacher_student_topk"] == pytest.approx(0, abs=1e-5)
    assert metrics["kl_student_teacher_topk"] == pytest.approx(0, abs=1e-5)
    assert metrics["top1_agreement"] == 1.0 and metrics["topk_overlap"] == 1.0
    assert metrics["nll_gap"] == pytest.approx(0, abs=1e-5)
    assert metrics["student_mass_on_teacher_topk"] == pytest.approx(metrics["teacher_topk_mass"], rel=1e-5)


def test_max_samples_takes_first_by_sample_id(student, samples, reader):
    first = samples.sort_by("sample_id").slice(0, 2)
    actual = evaluate_student(student, samples, reader, EvalConfig(max_samples=2))
    assert_metrics_close(actual, reference_metrics(student, first, reader))


def test_misaligned_artifact_is_refused(student, teacher, samples):
    shifted = FakeReader(teacher, samples, shift=1)
    with pytest.raises(PositionMismatchError, match="sample 0+"):
        evaluate_student(student, samples, shifted)


def test_overlap_k_larger_than_artifact_k_is_refused(student, samples, reader):
    with pytest.raises(ValueError, match="overlap_k=9 exceeds the artifact's k=8"):
        evaluate_student(student, samples, reader, EvalConfig(overlap_k=9))


def test_config_validation():
    with pytest.raises(ValueError, match="unknown key"):
        EvalConfig.from_params({"batch_size": 2, "bogus": 1})
    with pytest.raises(ValueError, match="batch_size"):
        EvalConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"evaluate.metrics.topk_verify must be one of \['auto', 'full', 'lazy'\], "
                                         r"got True \(YAML reads a bare true/false, yes/no or on/off as a boolean\)"):
        EvalConfig.from_params({"topk_verify": True})
    assert EvalConfig.from_params({"topk_verify": "lazy"}).topk_verify == "lazy"
    with pytest.raises(ValueError, match="prompts"):
        GenerationConfig(prompts=["", "x"])


def test_greedy_generation_in_chat_format(student, tiny_tokenizer):
    config = GenerationConfig(prompts=("Who begat Enos?", "In the beginning"), max_new_tokens=6)
    outputs = generate_greedy(student, tiny_tokenizer, config)
    assert len(outputs) == 2 and all(isinstance(text, str) for text in outputs)
    assert outputs == generate_greedy(student, tiny_tokenizer, config)  # greedy: deterministic
    # The first generated token is the argmax after the rendered chat prompt.
    ids = chat_prompt_ids(tiny_tokenizer, config.prompts[0])
    assert tiny_tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        first = int(student(torch.tensor([ids])).logits[0, -1].argmax())
    manual = tiny_tokenizer.decode([first], skip_special_tokens=True)
    assert outputs[0].startswith(manual)
    text = format_generations(config, {"student": outputs, "teacher": outputs})
    assert "## Prompt 2\nIn the beginning" in text and text.count("### student") == 2
    blank = format_generations(GenerationConfig(prompts=("p",)), {"student": ["\n\n"]})
    assert "### student\n(whitespace only: '\\n\\n')\n" in blank


def _history(offset: float) -> dict:
    entries = []
    for step in range(1, 11):
        entries.append({"step": step, "epoch": step / 10, "loss": 3 - 0.1 * step + offset, "kd": 1 / step,
                        "sft": 2 - 0.05 * step, "learning_rate": 1e-3 * (1 - step / 10), "grad_norm": 1.0})
        if step % 5 == 0:
            entries.append({"step": step, "eval_loss": 2.5 - 0.05 * step + offset, "eval_sft": 2.0 - 0.1 * step,
                            "eval_runtime": 0.1})
    entries.append({"step": 10, "train_runtime": 3.0, "train_loss": 2.4})
    return {"log_history": entries}


def test_loss_curve_plots(tmp_path):
    kd, sft = _history(0.0), _history(0.3)
    series = curves(kd)
    assert series["eval_loss"] == [(5, 2.25), (10, 2.0)]
    assert "train_loss" not in series and "eval_runtime" not in series

    paths = plot_loss_curves(kd, tmp_path / "plots")
    assert [p.name for p in paths] == ["training_curves.png"]
    paths = plot_loss_curves(kd, tmp_path / "plots", comparison={"KD+SFT": kd, "SFT-only": sft})
    assert [p.name for p in paths] == ["training_curves.png", "kd_vs_sft.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
    # The held-out curve is the label cross-entropy (eval_sft), comparable across loss weights.
    assert held_out_loss_key(series) == "eval_sft" and train_loss_key(series) == "sft"
    assert held_out_loss_key({"eval_loss": []}) == "eval_loss" and train_loss_key({"loss": []}) == "loss"
    rows = (tmp_path / "plots" / "held_out_loss.csv").read_text().splitlines()
    assert rows == ["step,held_out_loss", "5,1.5", "10,1.0"]
    assert not list((tmp_path / "plots").glob("*.tmp-*"))


def test_plots_accept_a_bare_history_list_and_empty_history(tmp_path):
    assert plot_loss_curves([], tmp_path)[0].read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="log_history"):
        curves({"steps": 3})


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite", "qwen2-padded"])
def test_student_metrics_follow_the_models_own_head_for_each_family(family):
    """Soft-cap / logit scale / logits scaling are applied as the model's forward does, and head
    rows past the tokenizer get no mass: the NLL equals the float64 one from `model(...).logits`."""
    import copy

    from kd_pipeline.core.tiny import tiny_family_lm

    model, num_tokens = tiny_family_lm(family)
    samples = make_samples(seed=4, n=5, vocab=num_tokens)
    actual = evaluate_student(model, samples, None, EvalConfig(batch_size=2), num_tokens=num_tokens)
    double, nll = copy.deepcopy(model).double(), []
    for ids, mask in zip(samples["input_ids"].to_pylist(), samples["loss_mask"].to_pylist()):
        with torch.no_grad():
            logprobs = torch.log_softmax(double(torch.tensor([ids])).logits[0, :, :num_tokens], dim=-1)
        for t in np.flatnonzero(mask):
            nll.append(-float(logprobs[t - 1, ids[t]]))
    assert actual["num_tokens"] == len(nll)
    assert actual["student_nll"] == pytest.approx(float(np.mean(nll)), rel=1e-5)


def test_full_vocabulary_kl_against_the_teacher_run_again(student, teacher, samples):
    """`kl_teacher_student_full`: KL(teacher || student) over the whole vocabulary, the teacher run
    again on the same samples; float64 reference from both models' full log-softmax."""
    actual = evaluate_student(student, samples, None, EvalConfig(batch_size=3, token_chunk_size=5),
                              teacher_model=teacher)
    kl, agree = [], []
    for ids, mask in zip(samples["input_ids"].to_pylist(), samples["loss_mask"].to_pylist()):
        p, q = full_logprobs_f64(teacher, ids), full_logprobs_f64(student, ids)
        for t in np.flatnonzero(mask):
            kl.append(float((np.exp(p[t - 1]) * (p[t - 1] - q[t - 1])).sum()))
            agree.append(float(p[t - 1].argmax() == q[t - 1].argmax()))
    assert actual["kl_teacher_student_full"] == pytest.approx(float(np.mean(kl)), rel=1e-5)
    assert actual["top1_agreement_full"] == pytest.approx(float(np.mean(agree)))
    assert actual["kl_teacher_student_full"] > 0.1
    same = evaluate_student(teacher, samples, None, EvalConfig(batch_size=3), teacher_model=teacher)
    assert abs(same["kl_teacher_student_full"]) < 1e-6 and same["top1_agreement_full"] == 1.0


def test_training_curves_panels_axes_title_and_integer_steps():
    from kd_pipeline.core.plots import training_curves_figure, training_panels

    history = [{"step": step, "loss": 3.0 - 0.1 * step, "total": 3.0 - 0.1 * step, "kd": 0.3 - 0.01 * step,
                "sft": 2.8 - 0.1 * step, "learning_rate": 1e-3} for step in (1, 2, 3)]
    history.append({"step": 3, "eval_loss": 2.9, "eval_total": 2.9, "eval_kd": 0.2, "eval_sft": 2.7})
    panels = training_panels(curves(history))
    # `loss` duplicates `total`: not drawn; KD on the right-hand axis of its panel.
    assert panels == [("train loss", ["sft", "total"], ["kd"]), ("held-out loss", ["eval_sft", "eval_total"], ["eval_kd"]),
                      ("learning rate", ["learning_rate"], [])]
    assert training_panels(curves([{"step": 1, "loss": 2.0}])) == [("train loss", ["loss"], [])]

    figure = training_curves_figure(history, title="KD+SFT: distill kd fwd_kl w0.5 T1 k64")
    figure.canvas.draw()
    left_axes = figure.axes[:3]
    assert left_axes[0].get_title() == "KD+SFT: distill kd fwd_kl w0.5 T1 k64"
    assert [line.get_label() for line in figure.axes[3].lines] == ["kd (right axis)"]  # the twin of panel 1
    for ax in left_axes:
        ticks = [tick for tick in ax.get_xticks() if 1 <= tick <= 3]
        assert ticks and all(float(tick).is_integer() for tick in ticks), ticks


def test_variable_rows_are_scored_on_their_entries_only(student, teacher, samples):
    """A top_p / sampled artifact's padded rows (repeated first id, log-prob -inf): the top-k
    metrics equal a float64 computation on each row's stored entries alone."""
    reader = FakeReader(teacher, samples)
    rng = np.random.default_rng(0)
    expected_kl, expected_mass, expected_overlap = [], [], {K: [], 3: []}
    for sample_id, ids, mask in zip(*(samples[c].to_pylist() for c in ("sample_id", "input_ids", "loss_mask"))):
        record = reader.records[sample_id]
        q_full = full_logprobs_f64(student, ids)[np.flatnonzero(mask) - 1]
        lengths = rng.integers(1, K + 1, len(q_full))
        for row, length in enumerate(lengths):
            entries, logprobs = record["topk_ids"][row, :length], record["topk_logprobs"][row, :length].astype(float)
            p = np.exp(logprobs - np.logaddexp.reduce(logprobs))
            q = q_full[row, entries] - np.logaddexp.reduce(q_full[row, entries])
            expected_kl.append(float((p * (np.log(p) - q)).sum()))
            expected_mass.append(float(np.exp(q_full[row, entries]).sum()))
            for overlap_k, values in expected_overlap.items():  # over the row's own length when shorter
                m = min(overlap_k, length)
                values.append(len(set(np.argsort(-q_full[row])[:m]) & set(entries[:m])) / m)
            record["topk_ids"][row, length:] = record["topk_ids"][row, 0]
            record["topk_logprobs"][row, length:] = -np.inf
    metrics = evaluate_student(student, samples, reader, EvalConfig(batch_size=3))
    assert metrics["kl_teacher_student_topk"] == pytest.approx(float(np.mean(expected_kl)), rel=1e-4)
    assert metrics["student_mass_on_teacher_topk"] == pytest.approx(float(np.mean(expected_mass)), rel=1e-4)
    assert metrics["topk_overlap"] == pytest.approx(float(np.mean(expected_overlap[K])), rel=1e-12)
    assert metrics["topk_overlap"] > 0
    three = evaluate_student(student, samples, reader, EvalConfig(batch_size=3, overlap_k=3))
    assert three["topk_overlap"] == pytest.approx(float(np.mean(expected_overlap[3])), rel=1e-12)
