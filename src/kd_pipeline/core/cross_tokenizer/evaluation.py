"""Held-out metrics of a student with its own tokenizer, comparable with the teacher and with
same-tokenizer students (values only; the pipeline logs them).

Over the validation split re-tokenized by the student (`data.CrossTokenizerDataset`):

* `student_nll` (nats per student token), `student_bits_per_byte` (summed NLL over `ln 2` times
  the bytes its trained tokens cover), `student_bits_per_char` (over the characters whose lead
  byte they cover); `teacher_nll`, `teacher_bits_per_byte`, `teacher_bits_per_char` likewise from
  the artifact's `target_logprobs` and the teacher's byte ends. Bits per byte (or character) is
  the number to compare across tokenizers.
* On the aligned spans (`loss.py`, first-token comparison, T = 1): `aligned_kl_teacher_student`,
  KL(teacher || student) between the two next-token distributions summed per matched class and
  renormalized over the classes of the teacher's top-k (the `renormalize` view, as
  `kl_teacher_student_topk` is for same-tokenizer students), per distilled span;
  `aligned_agreement` (the most probable matched class agrees) and `matched_mass` (teacher mass
  on matched classes); `num_groups`.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from kd_pipeline.core.cross_tokenizer.alignment import trained_byte_count
from kd_pipeline.core.cross_tokenizer.data import CrossTokenizerCollator, CrossTokenizerDataset, group_batch
from kd_pipeline.core.cross_tokenizer.loss import CrossTokenizerOptions, cross_tokenizer_kd_loss
from kd_pipeline.core.evaluation.metrics import EvalConfig
from kd_pipeline.core.losses import KDLossConfig
from kd_pipeline.core.models.head import decoder_and_head, head_transform
from kd_pipeline.core.training.data import flat_labels


def trained_char_count(text: str, byte_ends: np.ndarray, loss_mask: np.ndarray) -> int:
    """Characters of `text` whose first UTF-8 byte lies in a trained token (token t covers
    `ends[t-1]:ends[t]`): the denominator of bits per character.

    A character split across tokens counts once, with the token holding its lead byte.
    """
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    ends = np.asarray(byte_ends, dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    delta = np.zeros(len(data) + 1, dtype=np.int64)
    trained = np.asarray(loss_mask).astype(bool) & (ends > starts) & (ends <= len(data))
    np.add.at(delta, starts[trained], 1)
    np.add.at(delta, ends[trained], -1)
    in_trained = np.cumsum(delta)[: len(data)] > 0
    return int((in_trained & ((data & 0xC0) != 0x80)).sum())


@torch.no_grad()
def evaluate_cross_tokenizer_student(model, tokenizer, samples, teacher, projection,
                                     config: EvalConfig = EvalConfig()) -> dict[str, float]:
    """Metrics of the module docstring for `model` (its tokenizer `tokenizer`) on `samples`.

    Args:
        model: HF causal LM with a plain lm_head.
        tokenizer: the student's tokenizer.
        samples: one split of the teacher's corpus (with `text`, `byte_ends`).
        teacher: the artifact reader.
        projection: the pair's `VocabMap.projection()`.
        config: batch sizes and `max_samples`.
    """
    model.eval()
    transform = head_transform(model, len(tokenizer))
    if not transform.is_identity:  # the cross-tokenizer loss scores the bare lm_head output
        raise ValueError(f"cross-tokenizer evaluation scores the bare lm_head: {type(model).__name__}'s head "
                         f"transform {transform.settings} (real vocabulary {transform.vocab_size}) is not supported")
    decoder, head = decoder_and_head(model)
    device = next(model.parameters()).device
    if config.max_samples is not None:
        samples = samples.sort_by("sample_id").slice(0, config.max_samples)
    dataset = CrossTokenizerDataset(samples, teacher, tokenizer, split=config.split)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    collate = CrossTokenizerCollator(pad_id)
    projection = type(projection)(**{name: value.to(device) for name, value in vars(projection).items()})
    loss_config = KDLossConfig(kd_loss="fwd_kl", topk_normalization="renormalize", kd_loss_weight=1.0,
                               sft_loss_weight=1.0, chunk_size=config.token_chunk_size)
    options = CrossTokenizerOptions(uld_loss_weight=0.0, span_merge="first_token")
    teacher_masks = [np.asarray(mask, dtype=np.int8) for mask in samples["loss_mask"].to_pylist()]
    teacher_ends = samples["byte_ends"].to_pylist()
    totals = dict(student_nll=0.0, teacher_nll=0.0, kl=0.0, agree=0.0, mass=0.0, groups=0.0, student_tokens=0,
                  teacher_tokens=0, student_bytes=0, teacher_bytes=0, student_chars=0, teacher_chars=0)
    for start in range(0, len(dataset), config.batch_size):
        indices = list(range(start, min(start + config.batch_size, len(dataset))))
        items = dataset.__getitems__(indices)
        batch = collate(items)
        mask = batch["kd_positions_mask"]
        hidden = decoder(input_ids=batch["input_ids"].to(device),
                         attention_mask=batch["attention_mask"].to(device)).last_hidden_state[mask.to(device)]
        n = hidden.shape[0]
        ones = torch.ones(n, dtype=torch.float32, device=device)
        inputs = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
        out = cross_tokenizer_kd_loss(hidden.float(), head.weight.float(), None if head.bias is None else head.bias.float(),
                                      flat_labels(inputs), ones, group_batch(inputs, ones), projection,
                                      loss_config, options)
        totals["student_nll"] += float(out.sft)
        totals["kl"] += float(out.kd)
        totals["agree"] += float(out.agreement * out.group_weight_sum)
        totals["mass"] += float(out.matched_mass * out.group_weight_sum)
        totals["groups"] += float(out.group_weight_sum)
        totals["student_tokens"] += n
        for index, item in zip(indices, items):
            totals["teacher_nll"] += item["teacher_nll_sum"]
            totals["teacher_tokens"] += int(teacher_masks[index].sum())
            totals["teacher_bytes"] += trained_byte_count(np.asarray(teacher_ends[index]), teacher_masks[index])
            student = item["ct"].student
            totals["student_bytes"] += trained_byte_count(student.byte_ends, student.loss_mask)
            text = dataset.texts[index]
            totals["teacher_chars"] += trained_char_count(text, teacher_ends[index], teacher_masks[index])
            totals["student_chars"] += trained_char_count(text, student.byte_ends, student.loss_mask)
    if totals["student_tokens"] == 0:
        raise ValueError(f"no trained student tokens in the {config.split!r} samples")
    ln2 = math.log(2)
    groups = max(totals["groups"], 1.0)
    return {
        "num_samples": float(len(dataset)),
        "num_tokens": float(totals["student_tokens"]),
        "num_bytes": float(totals["student_bytes"]),
        "num_chars": float(totals["student_chars"]),
        "student_nll": totals["student_nll"] / totals["student_tokens"],
        "student_bits_per_byte": totals["student_nll"] / (ln2 * max(totals["student_bytes"], 1)),
        "student_bits_per_char": totals["student_nll"] / (ln2 * max(totals["student_chars"], 1)),
        "teacher_nll": totals["teacher_nll"] / max(totals["teacher_tokens"], 1),
        "teacher_bits_per_byte": totals["teacher_nll"] / (ln2 * max(totals["teacher_bytes"], 1)),
        "teacher_bits_per_char": totals["teacher_nll"] / (ln2 * max(totals["teacher_chars"], 1)),
        "aligned_kl_teacher_student": totals["kl"] / groups,
        "aligned_agreement": totals["agree"] / groups,
        "matched_mass": totals["mass"] / groups,
        "num_groups": totals["groups"],
    }


def evaluate_cross_tokenizer_on_artifact(student_dir: str | os.PathLike, teacher_dir: str | os.PathLike, corpus,
                                         topk_dir: str | os.PathLike, vocab_map_path: str | os.PathLike,
                                         config: EvalConfig = EvalConfig()) -> dict[str, float]:
    """`evaluate_cross_tokenizer_student` of a student folder, after checking that the artifact
    is the teacher's for this corpus and the map is the (teacher, student) pair's.

    Raises:
        ArtifactMismatchError: artifact or map made for something else.
    """
    from transformers import AutoConfig

    from kd_pipeline.core.cross_tokenizer.token_bytes import token_bytes
    from kd_pipeline.core.cross_tokenizer.vocab_map import VocabMap, fingerprint
    from kd_pipeline.core.devices import resolve_device
    from kd_pipeline.core.models.identity import model_identity, tokenizer_hash
    from kd_pipeline.core.models.loading import load_causal_lm, load_tokenizer
    from kd_pipeline.core.topk_store import ArtifactMismatchError, TopKReader, check_artifact_compatibility

    reader = TopKReader(topk_dir, verify=config.topk_verify)
    teacher_identity = model_identity(teacher_dir)
    model = load_causal_lm(student_dir, device=resolve_device(config.device))
    tokenizer, teacher_tokenizer = load_tokenizer(student_dir), load_tokenizer(teacher_dir)
    check_artifact_compatibility(reader.manifest, corpus_fingerprint=corpus.fingerprint,
                                 tokenizer_hash=tokenizer_hash(teacher_tokenizer),
                                 vocab_size=int(AutoConfig.from_pretrained(teacher_dir).vocab_size),
                                 teacher_identity=teacher_identity, teacher_dir=teacher_dir)
    vocab_map = VocabMap.load(vocab_map_path)
    for side, tok in (("teacher", teacher_tokenizer), ("student", tokenizer)):
        if vocab_map.metadata.get(f"{side}_fingerprint") != fingerprint(token_bytes(tok)):
            raise ArtifactMismatchError(f"vocabulary map {vocab_map_path} was built for another {side} tokenizer")
    return evaluate_cross_tokenizer_student(model, tokenizer, corpus.split(config.split), reader,
                                            vocab_map.projection(), config)
