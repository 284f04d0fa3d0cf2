"""DistillationTrainer / train_student on tiny models: loss wiring, global-token normalization,
manifest refusal, NaN stop, SFT-only path, resume after SIGKILL and 2-process DDP."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from transformers import TrainerCallback

from kd_pipeline.core.batching import trained_positions
from kd_pipeline.core.corpus import SAMPLES_SCHEMA, TokenizedCorpus, corpus_fingerprint
from kd_pipeline.core.losses import KDLossConfig, fused_topk_kd_loss
from kd_pipeline.core.models.identity import model_identity
from kd_pipeline.core.models.identity import tokenizer_hash as hash_tokenizer
from kd_pipeline.core.models.loading import load_tokenizer
from kd_pipeline.core.models.student import StudentInit, init_student
from kd_pipeline.core.models.teacher import TeacherSource, prepare_teacher
from kd_pipeline.core.tiny import TINY_VOCAB_SIZE
from kd_pipeline.core.topk_store import ArtifactMismatchError, ArtifactSource, Manifest, check_artifact_compatibility
from kd_pipeline.core.training.config import TrainConfig, training_arguments
from kd_pipeline.core.training.data import DistillCollator, DistillDataset, flat_labels
from kd_pipeline.core.training.run import SUMMARY_FILE, train_student
from kd_pipeline.core.training.trainer import DistillationTrainer, NonFiniteGradientError, NonFiniteLossError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TINY_TOKENIZER_DIR = PROJECT_ROOT / "tests" / "fixtures" / "tiny_tokenizer"
K = 8
STUDENT = StudentInit(method="prune_teacher", num_layers=2)
LOSS = KDLossConfig(kd_loss_weight=1.0, sft_loss_weight=0.5)


# --------------------------------------------------------------------------------------------
# Tiny fixtures (also imported by the subprocess worker below)


def make_teacher(directory: Path) -> Path:
    source = TeacherSource(kind="random_init", tokenizer_path=str(TINY_TOKENIZER_DIR), seed=0)
    prepare_teacher(source, directory)
    return directory


def make_corpus(tokenizer_hash: str, n: int = 28, seed: int = 0) -> TokenizedCorpus:
    """Random token samples (prompt masked, response trained), every 7th in validation."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(10, 33))
        prompt = int(rng.integers(1, length - 3))
        rows.append({
            "sample_id": hashlib.sha256(f"synthetic-{seed}-{i}".encode()).hexdigest()[:32],
            "input_ids": rng.integers(3, TINY_VOCAB_SIZE, size=length).tolist(),
            "loss_mask": [0] * prompt + [1] * (length - prompt),
            "length": length, "num_trained": length - prompt,
            "split": "validation" if i % 7 == 6 else "train", "source": f"synthetic:{i}",
        })
    rows.sort(key=lambda row: row["sample_id"])
    samples = pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)
    meta = {"schema_version": 1, "tokenizer_hash": tokenizer_hash, "vocab_size": TINY_VOCAB_SIZE,
            "fingerprint": corpus_fingerprint(samples, tokenizer_hash)}
    return TokenizedCorpus(samples, meta)


def fake_manifest(corpus_fingerprint: str, tokenizer_sha256: str, vocab_size: int, k: int,
                  teacher_config_sha256: str = "0" * 64, teacher_weights_sha256: str = "0" * 64) -> Manifest:
    """The manifest of a synthetic artifact with these contract fields (and no shards)."""
    source = ArtifactSource(
        teacher_path="synthetic", teacher_config_sha256=teacher_config_sha256,
        teacher_weights_sha256=teacher_weights_sha256,
        tokenizer_sha256=tokenizer_sha256, vocab_size=vocab_size, k=k, capture_dtype="float32",
        capture_temperature=1.0, corpus_fingerprint=corpus_fingerprint)
    return Manifest.create(source, "raw", {}, shard_tokens=200, samples_per_row_group=4, world_size=1)


class FakeTargets:
    """Dict-backed stand-in for TopKReader: per-sample teacher distributions in which the actual
    next token is the top-1 (so a batch can be checked row by row), full-vocab log-probs."""

    def __init__(self, corpus: TokenizedCorpus, tokenizer_hash: str, teacher_identity: dict, k: int = K):
        self.manifest = fake_manifest(corpus.fingerprint, tokenizer_hash, TINY_VOCAB_SIZE, k,
                                      teacher_identity["config_sha256"], teacher_identity["weights_sha256"])
        self.data = {}
        for row in corpus.samples.to_pylist():
            ids, positions = np.asarray(row["input_ids"]), trained_positions(row["loss_mask"])
            rng = np.random.default_rng(int(row["sample_id"][:8], 16))
            logits = torch.tensor(rng.normal(size=(len(positions), TINY_VOCAB_SIZE)) * 2.0)
            logits[torch.arange(len(positions)), torch.from_numpy(ids[positions + 1])] += 30.0
            values, indices = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
            self.data[row["sample_id"]] = {"positions": positions, "topk_ids": indices.numpy(),
                                           "topk_logprobs": values.float().numpy(),
                                           "target_logprobs": values[:, 0].float().numpy()}

    def get_many(self, sample_ids):
        return [self.data[sample_id] for sample_id in sample_ids]

    def write_artifact(self, directory: Path, **source_changes) -> Path:
        """The same rows as a real artifact (exact `raw` codec), readable by TopKReader;
        `source_changes` replace manifest source fields (e.g. `corpus_fingerprint`)."""
        from kd_pipeline.core.topk_store import RawCodec, TopKShardWriter

        source = dataclasses.replace(self.manifest.source, **source_changes)
        with TopKShardWriter(directory, source, RawCodec(), shard_tokens=200, samples_per_row_group=4) as writer:
            for sample_id, record in self.data.items():
                writer.add(sample_id, record["positions"], record["topk_ids"], record["topk_logprobs"],
                           record["target_logprobs"])
        return directory


def build_fixture(teacher_dir: Path):
    tokenizer = load_tokenizer(teacher_dir)
    tokenizer_hash = hash_tokenizer(tokenizer)
    corpus = make_corpus(tokenizer_hash)
    return corpus, FakeTargets(corpus, tokenizer_hash, model_identity(teacher_dir)), tokenizer_hash


def quick_config(**overrides) -> TrainConfig:
    settings = dict(max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=3e-3,
                    warmup_steps=0, save_steps=0, eval_steps=0, eval_at_end=False, logging_steps=1, disable_tqdm=True,
                    lr_scheduler_type="linear", seed=0, length_group_batches=0)
    settings.update(overrides)
    return TrainConfig.from_dict(settings)


def step_losses(summary: dict) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in summary["log_history"] if "loss" in row}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher") / "teacher")


@pytest.fixture(scope="module")
def fixture(teacher_dir):
    return build_fixture(teacher_dir)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls on a shared 2-core box: one thread avoids spin-wait contention.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_trainer(teacher_dir, corpus, targets, tmp_path, reduction="token", **config):
    model, tokenizer = init_student(STUDENT, teacher_dir)
    train = quick_config(reduction=reduction, **config)
    trainer = DistillationTrainer(
        model=model, args=training_arguments(train, tmp_path / "ckpt", False, []),
        train_dataset=DistillDataset(corpus.split("train"), targets, K),
        data_collator=DistillCollator(tokenizer.pad_token_id), loss_config=LOSS, reduction=reduction,
    )
    return trainer


def collate(corpus, targets, indices, pad_id=2):
    dataset = DistillDataset(corpus.split("train"), targets, K)
    return DistillCollator(pad_id)(dataset.__getitems__(indices))


# --------------------------------------------------------------------------------------------
# Configuration and manifest checks


def test_train_config_refuses_unknown_and_bad_values():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lr'\]"):
        TrainConfig.from_dict({"lr": 1e-3})
    with pytest.raises(ValueError, match="trainer.reduction"):
        TrainConfig.from_dict({"reduction": "batch"})
    with pytest.raises(ValueError, match="trainer.warmup_steps"):
        TrainConfig.from_dict({"warmup_steps": 1.5})
    with pytest.raises(ValueError, match=r"\['remove_unused_columns'\] are set by the trainer"):
        TrainConfig.from_dict({"remove_unused_columns": True})
    with pytest.raises(ValueError, match="trainer.liger"):
        TrainConfig.from_dict({"liger": "yes"})
    with pytest.raises(ValueError, match=r"trainer.learning_rate must be a number, got '1e-3' \(write 1.0e-3"):
        TrainConfig.from_dict(yaml.safe_load("learning_rate: 1e-3"))
    with pytest.raises(ValueError, match="trainer.max_grad_norm must be a number, got True"):
        TrainConfig.from_dict({"max_grad_norm": True})
    assert TrainConfig.from_dict(yaml.safe_load("learning_rate: 1.0e-3")).argument("learning_rate") == 1e-3
    assert TrainConfig.from_dict({"max_steps": 3}).argument("max_steps") == 3
    assert TrainConfig().argument("learning_rate") == 5e-5  # not given: Hugging Face's default


@pytest.mark.parametrize("field,value", [
    ("corpus_fingerprint", "0" * 64), ("tokenizer_sha256", "f" * 64), ("vocab_size", 1024),
    ("teacher_config_sha256", "9" * 64), ("teacher_weights_sha256", "9" * 64),
])
def test_manifest_mismatch_names_the_field(field, value):
    good = {"corpus_fingerprint": "c" * 64, "tokenizer_sha256": "t" * 64, "vocab_size": 2048, "k": 8,
            "teacher_config_sha256": "a" * 64, "teacher_weights_sha256": "b" * 64}
    expected = dict(corpus_fingerprint="c" * 64, tokenizer_hash="t" * 64, vocab_size=2048, k=None,
                    teacher_identity={"config_sha256": "a" * 64, "weights_sha256": "b" * 64})
    assert check_artifact_compatibility(fake_manifest(**good), **expected) == 8
    with pytest.raises(ArtifactMismatchError, match=f"field '{field}'"):
        check_artifact_compatibility(fake_manifest(**{**good, field: value}), **expected)


def test_manifest_k_must_cover_the_run():
    manifest = fake_manifest("c", "t", 16, 8)
    assert check_artifact_compatibility(manifest, corpus_fingerprint="c", tokenizer_hash="t", vocab_size=16, k=4) == 4
    with pytest.raises(ArtifactMismatchError, match="field 'k'"):
        check_artifact_compatibility(manifest, corpus_fingerprint="c", tokenizer_hash="t", vocab_size=16, k=16)


def test_mismatched_artifact_stops_before_the_first_step(teacher_dir, fixture, tmp_path, monkeypatch):
    corpus, targets, _ = fixture
    artifact = targets.write_artifact(tmp_path / "topk", corpus_fingerprint="f" * 64)
    spy = BatchSpy(monkeypatch)
    with pytest.raises(ArtifactMismatchError, match="manifest field 'corpus_fingerprint'"):
        train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=STUDENT, loss=LOSS,
                      train=quick_config(), output_dir=tmp_path / "student", topk_dir=artifact)
    assert not spy.batches
    assert not (tmp_path / "student").exists() and not (tmp_path / "student_checkpoints").exists()


def test_swapped_teacher_is_refused_by_distill_and_evaluate(teacher_dir, fixture, tmp_path, monkeypatch):
    """The teacher's weights change (same tokenizer and vocabulary, so the corpus fingerprint is
    unchanged) after the artifact was made: training and evaluation refuse it by field."""
    from kd_pipeline.core.evaluation.metrics import EvalConfig, evaluate_on_artifact

    corpus, targets, _ = fixture
    artifact = targets.write_artifact(tmp_path / "topk")  # made from teacher_dir's identity
    swapped = tmp_path / "teacher"
    prepare_teacher(TeacherSource(kind="random_init", tokenizer_path=str(TINY_TOKENIZER_DIR), seed=1), swapped)
    old, new = model_identity(teacher_dir), model_identity(swapped)
    assert old["config_sha256"] == new["config_sha256"] and old["weights_sha256"] != new["weights_sha256"]
    expected = (f"top-k artifact manifest field 'teacher_weights_sha256' is {old['weights_sha256']!r} but the "
                f"teacher folder {swapped} has {new['weights_sha256']!r}: the artifact was made for another corpus "
                "or teacher; re-run `kedro run --pipelines teacher_logits`")
    spy = BatchSpy(monkeypatch)
    with pytest.raises(ArtifactMismatchError) as caught:
        train_student(teacher_dir=swapped, corpus=corpus, student_init=STUDENT, loss=LOSS, train=quick_config(),
                      output_dir=tmp_path / "student", topk_dir=artifact)
    assert str(caught.value) == expected
    assert not spy.batches and not (tmp_path / "student").exists()
    with pytest.raises(ArtifactMismatchError) as caught:  # any HF student folder will do here
        evaluate_on_artifact(swapped, corpus, artifact, EvalConfig(split="validation"), teacher_dir=swapped)
    assert str(caught.value) == expected
    metrics = evaluate_on_artifact(teacher_dir, corpus, artifact, EvalConfig(split="validation"),
                                   teacher_dir=teacher_dir)
    assert metrics["num_samples"] == corpus.split("validation").num_rows


@pytest.mark.parametrize("text,shown", [
    ('"eight"', "got 'eight'"), ("2.5", "got 2.5"), ("true", "got True"), ("yes", "got True"), ("on", "got True"),
    ("0", "got 0"),
])
def test_distill_k_is_validated_before_any_work(teacher_dir, fixture, tmp_path, monkeypatch, text, shown):
    import kd_pipeline.core.training.run as run
    from kd_pipeline.pipelines.distill import nodes

    def no_work(*args, **kwargs):
        raise AssertionError("work started before distill.k was checked")

    monkeypatch.setattr(run, "init_student", no_work)
    monkeypatch.setattr(nodes.tracking, "set_tags", no_work)
    corpus, targets, _ = fixture
    k = yaml.safe_load(f"k: {text}")["k"]
    message = f"distill.k must be a positive int or null, {shown}"
    with pytest.raises(ValueError) as caught:
        train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=STUDENT, loss=LOSS, train=quick_config(),
                      output_dir=tmp_path / "student", targets=targets, k=k)
    assert str(caught.value).startswith(message)
    params = {"student_init": {"method": "prune_teacher", "num_layers": 2}, "loss": {}, "trainer": {}, "k": k}
    with pytest.raises(ValueError) as caught:
        nodes.train_student(corpus, tmp_path / "topk", teacher_dir, params)
    assert str(caught.value).startswith(message)
    if text in ("true", "yes", "on"):
        assert str(caught.value) == message + " (YAML reads a bare true/false, yes/no or on/off as a boolean)"
    assert not (tmp_path / "student").exists()


def test_a_corrupt_late_shard_stops_training_before_the_first_step(teacher_dir, fixture, tmp_path, monkeypatch):
    """distill opens the artifact with `topk_verify: auto` (full for a small artifact): a shard
    the run would reach late is found before any step; `lazy` keeps the old check-on-read."""
    from kd_pipeline.core.topk_store import ShardCorruptError

    corpus, targets, _ = fixture
    artifact = targets.write_artifact(tmp_path / "topk")
    last = sorted(artifact.glob("shard-*.parquet"))[-1]
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x01
    last.write_bytes(bytes(data))
    spy = BatchSpy(monkeypatch)
    with pytest.raises(ShardCorruptError, match=rf"1 of \d+ shards are corrupt .*: {last.name}; re-run"):
        train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=STUDENT, loss=LOSS, train=quick_config(),
                      output_dir=tmp_path / "student", topk_dir=artifact)
    assert not spy.batches
    # lazy: opening passes; the shard is found when a batch first reads from it.
    with pytest.raises(ShardCorruptError, match=rf"top-k shard {re.escape(str(last))} is corrupt \(sha256 "):
        train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=STUDENT, loss=LOSS,
                      train=quick_config(max_steps=10), output_dir=tmp_path / "student", topk_dir=artifact,
                      topk_verify="lazy")
    with pytest.raises(ValueError, match=r"distill.topk_verify must be one of \['auto', 'full', 'lazy'\], got True "
                                         r"\(YAML reads a bare true/false, yes/no or on/off as a boolean\)"):
        train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=STUDENT, loss=LOSS, train=quick_config(),
                      output_dir=tmp_path / "student", topk_dir=artifact, topk_verify=True)


# --------------------------------------------------------------------------------------------
# The loss wiring


def test_compute_loss_equals_a_direct_loss_call(teacher_dir, fixture, tmp_path):
    corpus, targets, _ = fixture
    trainer = make_trainer(teacher_dir, corpus, targets, tmp_path)
    batch = collate(corpus, targets, [0, 1, 2])
    loss = trainer.compute_loss(trainer.model, batch)

    model = trainer.model.student
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["kd_positions_mask"]
    n = int(mask.sum())
    direct = fused_topk_kd_loss(hidden[mask], model.lm_head.weight, None, batch["kd_topk_ids"],
                                batch["kd_topk_logprobs"], flat_labels(batch), torch.full((n,), 1.0 / n), LOSS)
    torch.testing.assert_close(loss, direct.loss)
    # And the same thing from full logits, the plain way: SFT is cross-entropy on the labels.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    cross_entropy = torch.nn.functional.cross_entropy(logits[:, :-1][mask[:, :-1]], flat_labels(batch))
    torch.testing.assert_close(direct.sft, cross_entropy.detach())


def _step_gradients(trainer, micro_batches):
    """Gradients of one optimizer step over `micro_batches`, through the trainer's own counting."""
    model = trainer.model
    model.zero_grad()
    samples, num_items = trainer.get_batch_samples(iter(micro_batches), len(micro_batches), torch.device("cpu"))
    total = 0.0
    for batch in samples:
        loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items)
        loss.backward()
        total += float(loss.detach())
    return total, {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_grad_accumulation_equals_the_concatenated_batch(teacher_dir, fixture, tmp_path, reduction):
    corpus, targets, _ = fixture
    trainer = make_trainer(teacher_dir, corpus, targets, tmp_path, reduction=reduction)
    trainer.model.train()
    # Uneven micro-batches (1 and 3 sequences, different token counts): a mean of micro-batch
    # means would differ from the step mean.
    loss_ga, grads_ga = _step_gradients(trainer, [collate(corpus, targets, [0]), collate(corpus, targets, [1, 2, 3])])
    loss_one, grads_one = _step_gradients(trainer, [collate(corpus, targets, [0, 1, 2, 3])])
    assert loss_ga == pytest.approx(loss_one, rel=1e-5)
    assert grads_ga.keys() == grads_one.keys() and grads_one
    for name in grads_one:
        torch.testing.assert_close(grads_ga[name], grads_one[name], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Whole runs


class BatchSpy:
    """Wraps DistillationTrainer.compute_loss to record every training micro-batch."""

    def __init__(self, monkeypatch):
        self.batches = []
        original = DistillationTrainer.compute_loss
        spy = self

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                spy.batches.append({key: (value.clone() if torch.is_tensor(value) else value)
                                    for key, value in inputs.items()})
            return original(self, model, inputs, return_outputs, num_items_in_batch)

        monkeypatch.setattr(DistillationTrainer, "compute_loss", compute_loss)


def test_trainer_run_keeps_rows_in_place_and_saves_an_hf_folder(teacher_dir, fixture, tmp_path, monkeypatch):
    """Shuffled data, gradient accumulation 2, an eval: every batch the loss sees keeps the
    invariant; the final student is a loadable HF folder with its summary and loss curve."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    corpus, targets, _ = fixture
    spy = BatchSpy(monkeypatch)
    train = quick_config(max_steps=3, per_device_train_batch_size=3, gradient_accumulation_steps=2,
                         eval_steps=3, save_steps=2)
    artifact = targets.write_artifact(tmp_path / "topk")
    summary = train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=STUDENT, loss=LOSS, train=train,
                            output_dir=tmp_path / "student", topk_dir=artifact)
    assert len(spy.batches) == 6
    order = [sample_id for batch in spy.batches for sample_id in batch["sample_ids"]]
    assert order != sorted(order), "training data was not shuffled"
    for batch in spy.batches:
        rows = batch["kd_positions_mask"].nonzero()
        assert rows.shape[0] == batch["kd_topk_ids"].shape[0]
        for i, (b, p) in enumerate(rows.tolist()):
            assert batch["labels"][b, p + 1] == batch["kd_topk_ids"][i, 0]  # the row's own token

    assert summary["global_step"] == 3
    assert summary["artifact_manifest_sha256"] == hashlib.sha256((artifact / "manifest.json").read_bytes()).hexdigest()
    final = summary["final_train"]
    assert final["loss"] == pytest.approx(final["total"], rel=1e-5)
    assert final["total"] == pytest.approx(LOSS.kd_loss_weight * final["kd"] + LOSS.sft_loss_weight * final["sft"], rel=1e-5)
    for key in ("teacher_coverage", "student_topk_mass", "tokens_per_second", "grad_norm", "learning_rate"):
        assert key in final
    assert 0 < final["teacher_coverage"] <= 1 and 0 < final["student_topk_mass"] < 1
    assert {"eval_loss", "eval_kd", "eval_sft", "eval_teacher_coverage"} <= summary["final_eval"].keys()

    student = tmp_path / "student"
    assert {"config.json", "model.safetensors", "tokenizer.json", SUMMARY_FILE, "loss_curve.png"} <= {
        path.name for path in student.iterdir()}
    assert json.loads((student / SUMMARY_FILE).read_text())["global_step"] == 3
    reloaded = AutoModelForCausalLM.from_pretrained(student)
    assert reloaded.config.num_hidden_layers == 2
    assert len(AutoTokenizer.from_pretrained(student)) == TINY_VOCAB_SIZE
    assert not list(tmp_path.glob("student.tmp-*"))


class _EventSteps(TrainerCallback):
    """The global steps at which the run evaluated and saved a checkpoint."""

    def __init__(self):
        self.evaluated, self.saved = [], []

    def on_evaluate(self, args, state, control, **kwargs):
        self.evaluated.append(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        self.saved.append(state.global_step)


@pytest.mark.parametrize("eval_at_end, keep_checkpoints", [(True, False), (False, True)])
def test_the_last_step_is_evaluated_once_and_checkpointed_only_when_kept(teacher_dir, fixture, tmp_path,
                                                                         eval_at_end, keep_checkpoints):
    """transformers 5 evaluates and saves after the last step of every step-strategy run; the
    run keeps only what it asked for: one final evaluation (after AdamW's state is freed) when
    `eval_at_end`, none otherwise, and no final checkpoint when checkpoints are not kept."""
    corpus, targets, _ = fixture
    events = _EventSteps()
    train = quick_config(max_steps=5, eval_steps=2, save_steps=2, eval_at_end=eval_at_end,
                         keep_checkpoints=keep_checkpoints)
    summary = train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=STUDENT, loss=LOSS, train=train,
                            output_dir=tmp_path / "student", topk_dir=targets.write_artifact(tmp_path / "topk"),
                            callbacks=[events])
    assert summary["global_step"] == 5
    assert events.evaluated == ([2, 4, 5] if eval_at_end else [2, 4])
    assert events.saved == ([2, 4, 5] if keep_checkpoints else [2, 4])
    checkpoints = sorted(path.name for path in tmp_path.glob("student_checkpoints/checkpoint-*"))
    assert checkpoints == (["checkpoint-2", "checkpoint-4", "checkpoint-5"] if keep_checkpoints else [])


def test_sft_only_runs_without_an_artifact(teacher_dir, fixture, tmp_path, monkeypatch):
    corpus, _, _ = fixture
    spy = BatchSpy(monkeypatch)
    sft_only = KDLossConfig(kd_loss_weight=0.0, sft_loss_weight=1.0)
    summary = train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=STUDENT, loss=sft_only,
                            train=quick_config(max_steps=2, save_steps=2, keep_checkpoints=True),
                            output_dir=tmp_path / "student", topk_dir=None)
    assert summary["global_step"] == 2 and summary["artifact_manifest_sha256"] is None
    assert len(spy.batches) == 2 and all("kd_topk_ids" not in batch for batch in spy.batches)
    final = summary["final_train"]
    assert "kd" not in final and final["sft"] == pytest.approx(final["loss"], rel=1e-5)
    # Re-running a finished run whose checkpoints were kept trains nothing more: the last
    # checkpoint is the student.
    again = train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=STUDENT, loss=sft_only,
                          train=quick_config(max_steps=2, save_steps=2, keep_checkpoints=True),
                          output_dir=tmp_path / "student")
    assert again["global_step"] == 2 and again["resumed_from"].endswith("checkpoint-2")
    assert len(spy.batches) == 2 and again["final_train"] == final
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "student" / "model.safetensors")
    checkpoint = load_file(Path(again["resumed_from"]) / "model.safetensors")
    assert saved.keys() == checkpoint.keys() and all(torch.equal(saved[key], checkpoint[key]) for key in saved)
    with pytest.raises(ValueError, match="needs the teacher top-k artifact"):
        train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=STUDENT, loss=LOSS,
                      train=quick_config(), output_dir=tmp_path / "other")


def _folder_digest(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def test_infinite_gradient_norm_stops_at_step_1_and_keeps_the_good_student(teacher_dir, fixture, tmp_path,
                                                                           monkeypatch):
    """`logits_scale: 1.0e30`: the loss stays finite but every step's gradient norm is inf, so
    clipping zeroes the update; the run must stop at the first step, not replace the student."""
    corpus, targets, _ = fixture
    student = tmp_path / "student"
    train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=STUDENT, loss=LOSS,
                  train=quick_config(max_steps=2), output_dir=student, targets=targets)
    good = _folder_digest(student)
    spy = BatchSpy(monkeypatch)
    with pytest.raises(NonFiniteGradientError) as caught:
        train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=STUDENT,
                      loss=dataclasses.replace(LOSS, logits_scale=1.0e30), train=quick_config(max_steps=2),
                      output_dir=student, targets=targets)
    assert len(spy.batches) == 1  # one micro-batch per step here: stopped in step 1
    assert str(caught.value) == (
        "non-finite gradient norm (inf) at global step 1: the step was not applied and training stopped (no "
        "student is saved); sample ids of the step: " + ", ".join(spy.batches[0]["sample_ids"]))
    assert _folder_digest(student) == good


def test_nan_gradient_at_step_2_stops_at_step_2(teacher_dir, fixture, tmp_path, monkeypatch):
    """A NaN gradient with a finite loss (here: injected by a gradient hook in step 2) is found
    in that step, before the optimizer applies it, with the step's sample ids (both micro-batches)."""
    from transformers import TrainerCallback

    class NanGradientInStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                model.student.get_output_embeddings().weight.register_hook(lambda grad: grad * float("nan"))

    corpus, targets, _ = fixture
    spy = BatchSpy(monkeypatch)
    with pytest.raises(NonFiniteGradientError) as caught:
        train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=STUDENT, loss=LOSS,
                      train=quick_config(max_steps=4, gradient_accumulation_steps=2, per_device_train_batch_size=2,
                                         eval_steps=2),
                      output_dir=tmp_path / "student", targets=targets, callbacks=[NanGradientInStep2()])
    assert len(spy.batches) == 4
    step_ids = spy.batches[2]["sample_ids"] + spy.batches[3]["sample_ids"]
    assert str(caught.value).startswith("non-finite gradient norm (nan) at global step 2: the step was not applied")
    assert str(caught.value).endswith("sample ids of the step: " + ", ".join(step_ids))
    assert not (tmp_path / "student").exists()


@pytest.mark.slow
def test_a_second_training_into_the_same_student_folder_is_refused(teacher_dir, fixture, tmp_path, monkeypatch):
    from kd_pipeline.core.locking import FolderLockedError

    student = tmp_path / "student"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom kd_pipeline.core.locking import FolderLock\n"
         "lock = FolderLock(sys.argv[1], purpose='distill: training the student').acquire()\nprint('locked', flush=True)\n"
         "time.sleep(120)\n", str(student)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        corpus, targets, _ = fixture
        spy = BatchSpy(monkeypatch)
        with pytest.raises(FolderLockedError) as caught:
            train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=STUDENT, loss=LOSS,
                          train=quick_config(), output_dir=student, targets=targets)
        assert str(caught.value).startswith(f"{student} is locked by process {holder.pid} (distill: training the "
                                            "student, since ")
        assert not spy.batches and not student.exists() and not (tmp_path / "student_checkpoints").exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_nan_loss_stops_with_step_and_sample_ids(teacher_dir, fixture, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    class PoisonAfterStep2(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    model.student.get_output_embeddings().weight[5, 0] = float("nan")

    corpus, targets, _ = fixture
    spy = BatchSpy(monkeypatch)
    with pytest.raises(NonFiniteLossError) as caught:
        train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=STUDENT, loss=LOSS,
                      train=quick_config(max_steps=5), output_dir=tmp_path / "student", targets=targets,
                      callbacks=[PoisonAfterStep2()])
    message = str(caught.value)
    assert "at global step 3" in message
    assert message.endswith(", ".join(spy.batches[-1]["sample_ids"]))
    assert not (tmp_path / "student").exists()


def test_checkpoints_of_a_different_run_are_discarded(tmp_path):
    from kd_pipeline.core.training.checkpoints import last_complete_checkpoint, prepare_checkpoint_dir

    directory = tmp_path / "student_checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):  # checkpoint-6 was cut by a kill
        (directory / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            (directory / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(directory) == directory / "checkpoint-4"
    first = {"loss": {"kd_loss_weight": 1.0}, "train": {"learning_rate": 1e-3}}
    assert prepare_checkpoint_dir(directory, first, resume=True, is_main=True) is None  # no record: not ours
    assert not list(directory.glob("checkpoint-*"))
    (directory / "checkpoint-2").mkdir()
    (directory / "checkpoint-2" / "trainer_state.json").write_text("{}")
    assert prepare_checkpoint_dir(directory, first, resume=True, is_main=True) == directory / "checkpoint-2"
    changed = {**first, "train": {"learning_rate": 2e-3}}
    assert prepare_checkpoint_dir(directory, changed, resume=True, is_main=True) is None
    assert not (directory / "checkpoint-2").exists()


# --------------------------------------------------------------------------------------------
# Subprocess runs: resume after SIGKILL, and DDP with 2 processes

WORKER = r'''
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, {tests_dir!r})
import torch
torch.set_num_threads(1)
import test_training as t
from transformers import TrainerCallback

teacher_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
settings = json.loads(sys.argv[3])
slow = float(os.environ.get("KD_TEST_STEP_SLEEP", "0"))

class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(slow)

corpus, targets, _ = t.build_fixture(teacher_dir)
summary = t.train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=t.STUDENT, loss=t.LOSS,
                          train=t.quick_config(**settings), output_dir=out_dir / "student", targets=targets,
                          callbacks=[Slow()] if slow else [])
if int(os.environ.get("RANK", "0")) == 0:
    (out_dir / "losses.json").write_text(json.dumps({{"losses": t.step_losses(summary),
                                                      "resumed_from": summary["resumed_from"]}}))
'''


def _worker(tmp_path: Path) -> Path:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests_dir=str(Path(__file__).parent)))
    return script


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(PROJECT_ROOT / "src")}
    env.update(extra)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _losses(out_dir: Path) -> dict:
    record = json.loads((out_dir / "losses.json").read_text())
    return {int(step): loss for step, loss in record["losses"].items()}, record["resumed_from"]


@pytest.mark.slow  # multi-process (subprocesses / torchrun)
def test_resume_after_sigkill_matches_an_uninterrupted_run(teacher_dir, tmp_path):
    # Length-grouped batches (the default job's sampler) and keep_checkpoints false (the default).
    settings = {"max_steps": 8, "save_steps": 2, "per_device_train_batch_size": 3, "gradient_accumulation_steps": 2,
                "save_total_limit": 3, "length_group_batches": 2}
    corpus, targets, _ = build_fixture(teacher_dir)
    reference = step_losses(train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=STUDENT, loss=LOSS,
                                          train=quick_config(**settings), output_dir=tmp_path / "ref" / "student",
                                          targets=targets))
    worker, out_dir = _worker(tmp_path), tmp_path / "run"
    out_dir.mkdir()
    command = [sys.executable, str(worker), str(teacher_dir), str(out_dir), json.dumps(settings)]
    process = subprocess.Popen(command, env=_env(KD_TEST_STEP_SLEEP="0.5"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    checkpoint = out_dir / "student_checkpoints" / "checkpoint-4" / "trainer_state.json"
    deadline = time.monotonic() + 90
    while not checkpoint.is_file():
        assert process.poll() is None, f"worker ended early: {process.stderr.read().decode()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint-4 within 90 s"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # a hard kill: no cleanup, no final save
    process.wait()
    assert not (out_dir / "student").exists()

    # Re-run (in this process: same code path as a fresh `kedro run`, without a second start-up).
    resumed = train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=STUDENT, loss=LOSS,
                            train=quick_config(**settings), output_dir=out_dir / "student", targets=targets)
    assert resumed["resumed_from"] is not None and int(resumed["resumed_from"].rsplit("-", 1)[1]) >= 4
    losses = step_losses(resumed)
    assert sorted(losses) == list(range(1, 9))  # the history before the checkpoint is restored with it
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], rel=1e-4, abs=1e-5), (step, losses, reference)
    assert resumed["final_train"]["loss"] == pytest.approx(reference[8], rel=1e-4)
    assert not (out_dir / "student_checkpoints").exists()  # a finished run keeps none by default


@pytest.mark.slow  # multi-process (subprocesses / torchrun)
def test_two_process_ddp_matches_one_process(teacher_dir, tmp_path):
    """torchrun --nproc-per-node 2 (gloo, CPU) with 2 sequences per rank = 1 process with 4."""
    corpus, targets, _ = build_fixture(teacher_dir)
    settings = {"max_steps": 4, "per_device_train_batch_size": 4, "eval_steps": 2}
    single_summary = train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=STUDENT, loss=LOSS,
                                   train=quick_config(**settings), output_dir=tmp_path / "single" / "student",
                                   targets=targets)
    single = step_losses(single_summary)
    out_dir = tmp_path / "ddp"
    out_dir.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
               str(_worker(tmp_path)), str(teacher_dir), str(out_dir),
               json.dumps({**settings, "per_device_train_batch_size": 2})]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=150)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # torchrun and its workers
            process.wait()
    assert process.returncode == 0, stderr[-4000:]
    losses, _ = _losses(out_dir)
    assert sorted(losses) == sorted(single) == [1, 2, 3, 4]
    for step in single:
        assert losses[step] == pytest.approx(single[step], rel=1e-4), (losses, single)
    # The evaluation metrics are exact token means over both ranks' validation samples.
    ddp_summary = json.loads((out_dir / "student" / SUMMARY_FILE).read_text())
    for key in ("eval_total", "eval_kd", "eval_sft"):
        assert ddp_summary["final_eval"][key] == pytest.approx(single_summary["final_eval"][key], rel=1e-4)


def test_liger_accepts_yaml_booleans_and_rejects_unknown_modes():
    assert TrainConfig(liger=False).liger == "off"
    assert TrainConfig(liger=True).liger == "on"
    with pytest.raises(ValueError, match="liger"):
        TrainConfig(liger="sometimes")


# --------------------------------------------------------------------------------------------
# bf16 precision on CPU, length-grouped batches


def test_bf16_precision_on_cpu_autocasts_with_float32_master_weights(teacher_dir, fixture, tmp_path, monkeypatch):
    corpus, targets, _ = fixture
    monkeypatch.setenv("KD_PIPELINE_NATIVE_BF16", "1")
    assert quick_config().resolved_precision() == "bf16"  # auto follows devices.has_native_bf16
    monkeypatch.setenv("KD_PIPELINE_NATIVE_BF16", "0")
    assert quick_config().resolved_precision() == "fp32"
    reference = make_trainer(teacher_dir, corpus, targets, tmp_path / "fp32", precision="fp32")
    bf16 = make_trainer(teacher_dir, corpus, targets, tmp_path / "bf16", precision="bf16")
    assert bf16.args.bf16 and bf16.args.use_cpu and not reference.args.bf16
    batch = collate(corpus, targets, [0, 1, 2])
    _, grads32 = _step_gradients(reference, [batch])
    assert bf16.accelerator.mixed_precision == "bf16"  # accelerate's CPU autocast
    bf16.model.zero_grad()
    with bf16.accelerator.autocast():
        loss16 = bf16.compute_loss(bf16.model, batch)
    loss16.backward()
    loss32 = reference.compute_loss(reference.model, batch)
    assert loss16.dtype == torch.float32  # the loss is accumulated in float32
    # bf16 matmuls carry ~3 significant digits: the loss agrees to that level, not to float32's.
    assert float(loss16.detach()) == pytest.approx(float(loss32.detach()), rel=2e-2)
    assert float(loss16.detach()) != float(loss32.detach())
    for name, param in bf16.model.named_parameters():
        if param.grad is None:
            continue
        assert param.dtype == torch.float32 and param.grad.dtype == torch.float32, name
        cosine = torch.nn.functional.cosine_similarity(param.grad.flatten(), grads32[name].flatten(), dim=0)
        assert float(cosine) > 0.98, (name, float(cosine))


def test_length_grouped_sampler_is_a_seeded_shuffle_with_little_padding():
    from kd_pipeline.core.training.data import LengthGroupedSampler

    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 500, size=101)
    sampler = LengthGroupedSampler(lengths, batch_size=8, group_batches=4, seed=3)
    batches = sampler.batches()
    order = [int(i) for batch in batches for i in batch]
    assert sorted(order) == list(range(101)) and list(sampler) == order and len(sampler) == 101
    assert [len(b) for b in batches] == [8] * 12 + [5]  # the short batch stays last (drop_last drops it)
    assert order == list(LengthGroupedSampler(lengths, 8, 4, seed=3))  # deterministic: resume skips the same
    sampler.set_epoch(1)
    assert list(sampler) != order  # a new shuffle each epoch
    assert list(LengthGroupedSampler(lengths, 8, 4, seed=4)) != order

    def padded(batches):
        return sum(int(lengths[b].max()) * len(b) for b in batches)

    plain = [np.asarray(order_[i:i + 8]) for order_ in [rng.permutation(101)] for i in range(0, 101, 8)]
    assert padded(batches) < 0.85 * padded(plain)
    # Group members are consecutive batches of one sorted group before the batch shuffle: every
    # batch is a length-contiguous run of its group.
    first_group = set(np.random.default_rng([3, 0]).permutation(101)[:32].tolist())
    grouped = sorted((b for b in batches if set(b.tolist()) <= first_group), key=lambda b: lengths[b].min())
    assert len(grouped) == 4
    assert all(lengths[a].max() <= lengths[b].min() for a, b in zip(grouped, grouped[1:]))
    with pytest.raises(ValueError, match="group_batches must be >= 1"):
        LengthGroupedSampler(lengths, 8, 0)


def test_trainer_uses_the_length_grouped_sampler(teacher_dir, fixture, tmp_path):
    from kd_pipeline.core.training.data import LengthGroupedSampler

    corpus, targets, _ = fixture
    trainer = make_trainer(teacher_dir, corpus, targets, tmp_path, length_group_batches=2)
    trainer.length_group_batches = 2
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) and sampler.batch_size == 4
    assert sampler.lengths.tolist() == [len(ids) for ids in corpus.split("train")["input_ids"].to_pylist()]
    trainer.length_group_batches = 0
    assert not isinstance(trainer._get_train_sampler(), LengthGroupedSampler)


# --------------------------------------------------------------------------------------------
# Exact tempering: the artifact's log-normalizer column reaches the loss


class TemperedTargets(FakeTargets):
    """FakeTargets whose records also hold the exact log-normalizers `log sum_v p(v)**s` at the
    temperatures 0.5, 1, 2 (scales 2, 1, 0.5), as an extraction with the default list writes."""

    SCALES = (2.0, 1.0, 0.5)

    def __init__(self, corpus, tokenizer_hash, teacher_identity: dict, k: int = K):
        super().__init__(corpus, tokenizer_hash, teacher_identity, k)
        self.manifest = Manifest.create(
            dataclasses.replace(self.manifest.source, logz_temperatures=(0.5, 1.0, 2.0)), "raw", {},
            shard_tokens=200, samples_per_row_group=4, world_size=1)
        for row in corpus.samples.to_pylist():
            ids, positions = np.asarray(row["input_ids"]), trained_positions(row["loss_mask"])
            rng = np.random.default_rng(int(row["sample_id"][:8], 16))  # FakeTargets' logits again
            logits = torch.tensor(rng.normal(size=(len(positions), TINY_VOCAB_SIZE)) * 2.0)
            logits[torch.arange(len(positions)), torch.from_numpy(ids[positions + 1])] += 30.0
            full = torch.log_softmax(logits, dim=-1)
            self.data[row["sample_id"]]["logz"] = torch.stack(
                [(s * full).logsumexp(-1) for s in self.SCALES], -1).float().numpy()


def test_the_logz_column_of_the_loss_temperature_reaches_the_fused_loss(teacher_dir, fixture, tmp_path):
    corpus, _, tokenizer_hash = fixture
    targets = TemperedTargets(corpus, tokenizer_hash, model_identity(teacher_dir))
    loss = KDLossConfig(kd_loss_weight=1.0, topk_normalization="tail_bucket", logits_scale=0.5,
                        target_logits_scale=0.5)
    column = targets.manifest.source.logz_column(loss.target_logits_scale)
    assert column == 2  # temperature 1 / 0.5 = 2
    dataset = DistillDataset(corpus.split("train"), targets, K, logz_column=column)
    batch = DistillCollator(2)(dataset.__getitems__([0, 1, 2]))
    ids = corpus.split("train")["sample_id"].to_pylist()[:3]
    expected = np.concatenate([targets.data[sample_id]["logz"][:, 2] for sample_id in ids])
    np.testing.assert_array_equal(batch["kd_teacher_logz"].numpy(), expected)

    model, tokenizer = init_student(STUDENT, teacher_dir)
    trainer = DistillationTrainer(
        model=model, args=training_arguments(quick_config(), tmp_path / "ckpt", False, []), train_dataset=dataset,
        data_collator=DistillCollator(tokenizer.pad_token_id), processing_class=tokenizer, loss_config=loss)
    got = trainer.compute_loss(trainer.model, batch)
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["kd_positions_mask"]
    n = int(mask.sum())
    direct = fused_topk_kd_loss(hidden[mask], model.lm_head.weight, None, batch["kd_topk_ids"],
                                batch["kd_topk_logprobs"], flat_labels(batch), torch.full((n,), 1.0 / n), loss,
                                teacher_logz=batch["kd_teacher_logz"])
    torch.testing.assert_close(got, direct.loss)
    with pytest.raises(ValueError, match="needs teacher_logz"):  # without the column it would not be exact
        fused_topk_kd_loss(hidden[mask], model.lm_head.weight, None, batch["kd_topk_ids"],
                           batch["kd_topk_logprobs"], flat_labels(batch), torch.full((n,), 1.0 / n), loss)


def test_tail_bucket_at_a_temperature_the_artifact_lacks_stops_before_training(teacher_dir, fixture, tmp_path,
                                                                                monkeypatch):
    corpus, targets, _ = fixture  # an artifact with the capture temperature 1 only
    spy = BatchSpy(monkeypatch)
    loss = KDLossConfig(kd_loss_weight=1.0, topk_normalization="tail_bucket", target_logits_scale=0.5)
    with pytest.raises(ArtifactMismatchError, match=r"tempers the teacher to temperature 2 .*only at temperatures "
                                                    r"\[1.0\].*re-extract"):
        train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=STUDENT, loss=loss,
                      train=quick_config(), output_dir=tmp_path / "student", targets=targets)
    assert not spy.batches


def test_progress_bar_is_labelled_and_log_lines_replace_it_off_a_terminal(caplog, monkeypatch):
    import io
    import logging
    from types import SimpleNamespace

    from kd_pipeline.core.training.config import TrainConfig, show_progress_bar
    from kd_pipeline.core.training.trainer import DistillLogCallback, DistillProgressCallback

    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    assert not show_progress_bar(TrainConfig())
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, max_steps=20)
    log = DistillLogCallback()
    with caplog.at_level(logging.INFO, logger="kd_pipeline.core.training.trainer"):
        for step in range(1, 21):
            state.global_step = step
            log.on_log(None, state, None, logs={"loss": 2.0 + 1 / step, "kd": 0.5, "tokens_per_second": 1234.4})
        log.on_log(None, state, None, logs={"eval_loss": 2.5, "eval_sft": 3.25, "eval_runtime": 0.1})
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 11 and lines[0] == "distill: step 2/20 loss 2.5000 kd 0.5000 tok/s 1234"
    assert lines[-1] == "distill: step 20/20 held-out loss 2.5, sft 3.25"

    bar = DistillProgressCallback()
    state.global_step = 5
    bar.on_train_begin(None, state, None)
    bar.training_bar.fp = io.StringIO()
    assert bar.training_bar.desc == "distill" and bar.training_bar.unit == "step" and bar.training_bar.n == 5
    bar.on_log(None, state, None, logs={"loss": 2.0, "kd": 0.25, "tokens_per_second": 99.0})
    assert bar.training_bar.postfix == "loss=2.0000, kd=0.2500, tok/s=99"
    bar.training_bar.close()


@pytest.mark.parametrize("every_n_layers", [1, 2])
def test_activation_checkpointing_recomputes_layers_with_the_same_run(teacher_dir, fixture, tmp_path, monkeypatch,
                                                                      every_n_layers):
    """`activation_checkpointing: true` (HF calls the wrapper's activation_checkpointing_enable
    with every_n_layers / offload) checkpoints the student's layers; a 2-step run then gives the
    losses and weights of the plain run (recomputation changes no arithmetic)."""
    corpus, targets, _ = fixture
    monkeypatch.setenv("KD_PIPELINE_NATIVE_BF16", "0")
    checkpointed_calls = []
    import transformers.modeling_utils as modeling_utils

    original = modeling_utils.checkpoint  # what activation_checkpointing_enable wraps

    def counting_checkpoint(function, *args, **kwargs):
        checkpointed_calls.append(function)
        return original(function, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", counting_checkpoint)
    runs = {}
    for name, extra in (("plain", {}), ("checkpointed", {"activation_checkpointing": True,
                                                         "activation_checkpointing_kwargs": {"every_n_layers": every_n_layers}})):
        summary = train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=STUDENT, loss=LOSS,
                                train=quick_config(max_steps=2, **extra), output_dir=tmp_path / name, targets=targets)
        runs[name] = summary
    # 2 layers, checkpointed every n-th: 2 steps x (2 / n) layer calls went through checkpoint.
    assert len(checkpointed_calls) == 2 * (2 // every_n_layers)
    assert step_losses(runs["checkpointed"]) == pytest.approx(step_losses(runs["plain"]), rel=1e-6)
    from safetensors.torch import load_file

    plain = load_file(tmp_path / "plain" / "model.safetensors")
    checkpointed = load_file(tmp_path / "checkpointed" / "model.safetensors")
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-6)


def test_a_sampled_artifact_trains_with_its_estimator_weights_and_refuses_what_it_cannot(
        teacher_dir, fixture, tmp_path, monkeypatch):
    from kd_pipeline.core.topk_store import RawCodec, TopKShardWriter

    corpus, targets, _ = fixture
    rng = np.random.default_rng(0)
    source = dataclasses.replace(targets.manifest.source, capture_mode="sampled", logz_temperatures=(1.0,),
                                 capture_params={"draws": 16, "proposal_temperature": 1.0, "seed": 0})
    counts_of = {}
    with TopKShardWriter(tmp_path / "sampled", source, RawCodec(), shard_tokens=200) as writer:
        for sample_id, record in targets.data.items():
            n = len(record["positions"])
            lengths = rng.integers(1, K + 1, n)
            counts = np.zeros((n, K), np.int64)
            for row, length in enumerate(lengths):  # 16 draws over the row's `length` ids
                counts[row, :length] = 1 + rng.multinomial(16 - length, np.full(length, 1 / length))
            counts_of[sample_id] = counts
            writer.add(sample_id, record["positions"], record["topk_ids"], record["topk_logprobs"],
                       record["target_logprobs"], np.zeros((n, 1)), lengths, counts)
    spy = BatchSpy(monkeypatch)
    summary = train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=STUDENT, loss=LOSS,
                            train=quick_config(max_steps=2), output_dir=tmp_path / "student",
                            topk_dir=tmp_path / "sampled")
    assert summary["global_step"] == 2 and np.isfinite(summary["final_train"]["loss"])
    for batch in spy.batches:
        counts = np.concatenate([counts_of[sample_id] for sample_id in batch["sample_ids"]])
        width = batch["kd_topk_weights"].shape[1]
        assert width == (counts > 0).sum(1).max()  # as wide as the batch's longest row
        np.testing.assert_allclose(batch["kd_topk_weights"].numpy(), counts[:, :width] / 16, rtol=1e-6)
    run = dict(teacher_dir=teacher_dir, corpus=corpus, student_init=STUDENT, train=quick_config(),
               output_dir=tmp_path / "other", topk_dir=tmp_path / "sampled")
    with pytest.raises(ValueError, match="sampled teacher artifact .* support distill.loss.kd_loss 'fwd_kl'"):
        train_student(loss=dataclasses.replace(LOSS, kd_loss="bwd_kl"), **run)
    with pytest.raises(ArtifactMismatchError, match="distill.k = 4 on a sampled artifact"):
        train_student(loss=LOSS, k=4, **run)
    with pytest.raises(ArtifactMismatchError, match=r"temperature 0.5 .* only at temperatures \[1.0\]"):
        train_student(loss=dataclasses.replace(LOSS, target_logits_scale=2.0), **run)
