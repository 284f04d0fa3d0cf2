"""train_student with a student that has its own tokenizer: corpus text and teacher byte ends from
corpus prep, a stored artifact, the stored vocabulary map, KD + ULD + SFT through the Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_pipeline.core.batching import trained_positions
from kd_pipeline.core.corpus import CorpusConfig, build_corpus
from kd_pipeline.core.corpus_sources import SourceRow
from kd_pipeline.core.cross_tokenizer.config import CrossTokenizerConfig
from kd_pipeline.core.cross_tokenizer.vocab_map import build_vocab_map
from kd_pipeline.core.losses import KDLossConfig
from kd_pipeline.core.models.identity import model_identity, tokenizer_hash
from kd_pipeline.core.models.loading import load_tokenizer
from kd_pipeline.core.models.student import StudentInit
from kd_pipeline.core.models.teacher import TeacherSource, prepare_teacher
from kd_pipeline.core.tiny import kjv_training_text, tiny_llama_config
from kd_pipeline.core.topk_store import ArtifactMismatchError, ArtifactSource, Manifest
from kd_pipeline.core.training.config import TrainConfig
from kd_pipeline.core.training.run import SUMMARY_FILE, train_student

TINY_TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "tiny_tokenizer"
K = 8


class Targets:
    """In-memory artifact: random teacher rows over the teacher vocabulary (realized token boosted)."""

    def __init__(self, corpus, tok_hash: str, vocab: int, teacher_identity: dict):
        source = ArtifactSource(
            teacher_path="synthetic", teacher_config_sha256=teacher_identity["config_sha256"],
            teacher_weights_sha256=teacher_identity["weights_sha256"],
            tokenizer_sha256=tok_hash, vocab_size=vocab, k=K, capture_dtype="float32",
            capture_temperature=1.0, corpus_fingerprint=corpus.fingerprint)
        self.manifest = Manifest.create(source, "raw", {}, shard_tokens=200, samples_per_row_group=4, world_size=1)
        self.data = {}
        for row in corpus.samples.to_pylist():
            ids, positions = np.asarray(row["input_ids"]), trained_positions(row["loss_mask"])
            rng = np.random.default_rng(int(row["sample_id"][:8], 16))
            logits = torch.tensor(rng.normal(size=(len(positions), vocab)) * 2.0)
            logits[torch.arange(len(positions)), torch.from_numpy(ids[positions + 1])] += 6.0
            logprobs = torch.log_softmax(logits, dim=-1)
            values, indices = logprobs.topk(K, dim=-1)
            target = logprobs.gather(1, torch.from_numpy(ids[positions + 1])[:, None]).squeeze(1)
            self.data[row["sample_id"]] = {"positions": positions, "topk_ids": indices.numpy(),
                                           "topk_logprobs": values.float().numpy(),
                                           "target_logprobs": target.float().numpy()}

    def get_many(self, sample_ids):
        return [self.data[sample_id] for sample_id in sample_ids]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, unigram):
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("cross")
    teacher_dir = root / "teacher"
    prepare_teacher(TeacherSource(kind="random_init", tokenizer_path=str(TINY_TOKENIZER_DIR), seed=0), teacher_dir)
    teacher_tokenizer = load_tokenizer(teacher_dir)
    student_dir = root / "student_tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=unigram, eos_token="<|endoftext|>", unk_token="<unk>",
                            pad_token="<|endoftext|>").save_pretrained(student_dir)
    verses = kjv_training_text(40) + ["In the beginning God created 2024 東京 😀 café\nnew line."]
    rows = [SourceRow("mem.jsonl", i + 1, data={"text": text}) for i, text in enumerate(verses)]
    corpus = build_corpus(rows, teacher_tokenizer, tokenizer_hash(teacher_tokenizer),
                          CorpusConfig(validation_fraction=0.2))
    targets = Targets(corpus, tokenizer_hash(teacher_tokenizer), len(teacher_tokenizer), model_identity(teacher_dir))
    vocab_map = build_vocab_map(teacher_tokenizer, load_tokenizer(student_dir))
    map_path = root / "vocab_map.safetensors"
    vocab_map.save(map_path)
    return teacher_dir, student_dir, corpus, targets, map_path, vocab_map


def run(setup, tmp_path, loss, **overrides):
    teacher_dir, student_dir, corpus, targets, map_path, _ = setup
    config = {k: v for k, v in tiny_llama_config().items() if k not in ("vocab_size", "bos_token_id", "eos_token_id",
                                                                       "pad_token_id")}
    train = TrainConfig.from_dict(dict(
        max_steps=3, per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=3e-3, warmup_steps=0,
        save_steps=0, eval_steps=3, eval_at_end=False, logging_steps=1, disable_tqdm=True, lr_scheduler_type="linear",
        seed=0))
    kwargs = dict(teacher_dir=teacher_dir, corpus=corpus, loss=loss, train=train, output_dir=tmp_path / "student",
                  student_init=StudentInit(method="from_config", config=config, seed=0), targets=targets,
                  cross_tokenizer=CrossTokenizerConfig(student_tokenizer=str(student_dir)), vocab_map_path=map_path)
    kwargs.update(overrides)
    return train_student(**kwargs)


def test_cross_tokenizer_student_trains_with_kd_uld_and_sft(setup, tmp_path):
    _, student_dir, _, _, _, vocab_map = setup
    summary = run(setup, tmp_path, KDLossConfig(kd_loss_weight=1.0, sft_loss_weight=1.0, topk_normalization="tail_bucket"))
    steps = [row for row in summary["log_history"] if "loss" in row]
    assert len(steps) == 3
    for row in steps:
        assert np.isfinite(row["loss"]) and row["kd"] > 0 and row["uld"] > 0 and row["sft"] > 0
        assert 0 < row["matched_mass"] <= 1 and 0 <= row["aligned_agreement"] <= 1
        # total = kd + uld + sft with unit weights
        assert row["total"] == pytest.approx(row["kd"] + row["uld"] + row["sft"], rel=1e-5)
    assert "eval_kd" in summary["final_eval"] and "eval_uld" in summary["final_eval"]
    assert summary["cross_tokenizer"]["vocab_map"] == vocab_map.content_hash
    saved = json.loads((tmp_path / "student" / SUMMARY_FILE).read_text())
    assert saved["cross_tokenizer"]["student_tokenizer"] == str(student_dir)
    # The saved student has the student's tokenizer and vocabulary.
    student_tokenizer = load_tokenizer(tmp_path / "student")
    assert len(student_tokenizer) == len(load_tokenizer(student_dir))


def test_sft_only_baseline_with_the_student_tokenizer_needs_no_artifact(setup, tmp_path):
    summary = run(setup, tmp_path, KDLossConfig(kd_loss_weight=0.0, sft_loss_weight=1.0), targets=None)
    steps = [row for row in summary["log_history"] if "loss" in row]
    assert len(steps) == 3 and all("kd" not in row and "uld" not in row for row in steps)


def test_a_map_of_another_pair_is_refused(setup, tmp_path, byte_bpe):
    teacher_dir, _, _, _, _, _ = setup
    other = build_vocab_map(load_tokenizer(teacher_dir), load_tokenizer(teacher_dir))  # identity: wrong student
    path = tmp_path / "other.safetensors"
    other.save(path)
    with pytest.raises(ArtifactMismatchError, match="was built for another student tokenizer"):
        run(setup, tmp_path, KDLossConfig(kd_loss_weight=1.0, sft_loss_weight=1.0), vocab_map_path=path)


class SampledTargets:
    """`targets` as a `sampled` artifact: the same rows, its manifest saying `capture_mode sampled`."""

    def __init__(self, targets):
        import dataclasses

        source = dataclasses.replace(targets.manifest.source, capture_mode="sampled", logz_temperatures=(1.0,),
                                     capture_params={"draws": K, "proposal_temperature": 1.0, "seed": 0})
        self.manifest = Manifest.create(source, "raw", {}, shard_tokens=200, samples_per_row_group=4, world_size=1)
        self.get_many = targets.get_many


def test_a_sampled_artifact_is_refused_before_training(setup, tmp_path):
    targets = SampledTargets(setup[3])
    with pytest.raises(ArtifactMismatchError, match=r"distill.cross_tokenizer on a 'sampled' teacher artifact "
                                                    r"\(capture_mode 'sampled', capture_params \{'draws': 8.*supports "
                                                    r"capture modes 'topk' and 'top_p' only"):
        run(setup, tmp_path, KDLossConfig(kd_loss_weight=1.0, sft_loss_weight=1.0), targets=targets)
    assert not (tmp_path / "student").exists() and not (tmp_path / "student_checkpoints").exists()


def test_the_cross_tokenizer_module_refuses_sampled_weights(setup):
    from kd_pipeline.core.cross_tokenizer.loss import CrossTokenizerOptions
    from kd_pipeline.core.models.loading import random_causal_lm
    from kd_pipeline.core.training.loss_module import CrossTokenizerStudentWithLoss

    vocab_map = setup[5]
    student = random_causal_lm(tiny_llama_config(vocab_size=len(vocab_map.student_class)), seed=0)
    module = CrossTokenizerStudentWithLoss(student, KDLossConfig(kd_loss_weight=1.0), vocab_map.projection(),
                                           CrossTokenizerOptions())
    ids = torch.ones(1, 4, dtype=torch.long)
    mask = torch.tensor([[False, True, True, False]])
    with pytest.raises(ValueError, match="got kd_topk_weights .* supports topk and top_p teacher rows only"):
        module(ids, torch.ones_like(ids), mask, torch.full((2,), 0.5), kd_topk_weights=torch.ones(2, 3))


def test_cross_tokenizer_evaluation_in_bits_per_byte(setup, tmp_path, chars_in_trained_tokens):
    import math

    from kd_pipeline.core.cross_tokenizer.alignment import trained_byte_count
    from kd_pipeline.core.cross_tokenizer.data import student_sample
    from kd_pipeline.core.cross_tokenizer.evaluation import evaluate_cross_tokenizer_student
    from kd_pipeline.core.evaluation.metrics import EvalConfig
    from kd_pipeline.core.models.loading import load_causal_lm

    teacher_dir, student_dir, corpus, targets, _, vocab_map = setup
    run(setup, tmp_path, KDLossConfig(kd_loss_weight=1.0, sft_loss_weight=1.0))
    model, tokenizer = load_causal_lm(tmp_path / "student"), load_tokenizer(tmp_path / "student")
    samples = corpus.split("validation")
    metrics = evaluate_cross_tokenizer_student(model, tokenizer, samples, targets, vocab_map.projection(),
                                               EvalConfig(batch_size=3, token_chunk_size=7))
    # Independent: full logits of each sample, NLL of its trained student tokens, their bytes.
    nll = num_bytes = tokens = teacher_nll = teacher_bytes = num_chars = teacher_chars = 0.0
    for row in samples.to_pylist():
        student = student_sample(tokenizer, row["text"], np.asarray(row["byte_ends"]), np.asarray(row["loss_mask"]),
                                 tokenizer.eos_token_id)
        ids = torch.as_tensor(student.input_ids)[None]
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits[0].double().log_softmax(-1)
        trained = np.flatnonzero(student.loss_mask)
        nll -= sum(float(logprobs[t - 1, student.input_ids[t]]) for t in trained)
        tokens += len(trained)
        num_bytes += trained_byte_count(student.byte_ends, student.loss_mask)
        teacher_nll -= float(targets.data[row["sample_id"]]["target_logprobs"].astype(np.float64).sum())
        teacher_bytes += trained_byte_count(np.asarray(row["byte_ends"]), np.asarray(row["loss_mask"]))
        num_chars += chars_in_trained_tokens(row["text"], student.byte_ends, student.loss_mask)
        teacher_chars += chars_in_trained_tokens(row["text"], row["byte_ends"], row["loss_mask"])
    assert metrics["num_tokens"] == tokens and metrics["num_bytes"] == num_bytes
    assert metrics["student_nll"] == pytest.approx(nll / tokens, rel=1e-5)
    assert metrics["student_bits_per_byte"] == pytest.approx(nll / (math.log(2) * num_bytes), rel=1e-5)
    assert metrics["teacher_bits_per_byte"] == pytest.approx(teacher_nll / (math.log(2) * teacher_bytes), rel=1e-6)
    assert metrics["num_chars"] == num_chars
    assert metrics["student_bits_per_char"] == pytest.approx(nll / (math.log(2) * num_chars), rel=1e-5)
    assert metrics["teacher_bits_per_char"] == pytest.approx(teacher_nll / (math.log(2) * teacher_chars), rel=1e-6)
    assert metrics["aligned_kl_teacher_student"] > 0 and 0 <= metrics["aligned_agreement"] <= 1
    assert metrics["num_groups"] > 0
