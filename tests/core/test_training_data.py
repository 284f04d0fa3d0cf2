"""DistillDataset + DistillCollator: every top-k row lands at the position it describes."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest
import torch

from kd_pipeline.core.batching import IGNORE_INDEX, MissingTargetsError, PositionMismatchError, trained_positions
from kd_pipeline.core.corpus import SAMPLES_SCHEMA
from kd_pipeline.core.training.data import DistillCollator, DistillDataset, flat_labels

VOCAB = 50
PAD = 0


def make_samples(n: int = 13, seed: int = 0) -> pa.Table:
    """Random samples with a prompt (mask 0) then a response (mask 1), and a gap in some masks."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(4, 17))
        ids = rng.integers(1, VOCAB, size=length).tolist()
        prompt = int(rng.integers(1, length - 1))
        mask = [0] * prompt + [1] * (length - prompt)
        if i % 3 == 0 and length - prompt > 2:
            mask[prompt + 1] = 0  # a masked token inside the response (e.g. a user turn)
        rows.append({
            "sample_id": hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()[:32],
            "input_ids": ids, "loss_mask": mask, "length": length, "num_trained": sum(mask),
            "split": "train", "source": f"row {i}",
        })
    return pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)


class TokenTargets:
    """A dict-backed targets provider whose row i names its own token: topk_ids[i, 0] is
    `input_ids[positions[i] + 1]` (and column 1 its position, so misplaced rows are caught)."""

    def __init__(self, samples: pa.Table, k: int = 4):
        self.data = {}
        for row in samples.to_pylist():
            ids, positions = np.asarray(row["input_ids"]), trained_positions(row["loss_mask"])
            topk_ids = np.zeros((len(positions), k), dtype=np.int64)
            topk_ids[:, 0] = ids[positions + 1]
            topk_ids[:, 1] = positions
            logprobs = np.sort(np.log(np.full((len(positions), k), 0.5 / k)), axis=1)[:, ::-1].copy()
            self.data[row["sample_id"]] = {"positions": positions, "topk_ids": topk_ids,
                                           "topk_logprobs": logprobs.astype(np.float32)}
        self.calls = 0

    def get_many(self, sample_ids):
        self.calls += 1
        return [self.data[sample_id] for sample_id in sample_ids]


def check_invariant(batch: dict) -> int:
    """Every flattened row i at (b, p) describes labels[b, p + 1]; returns the row count."""
    rows = batch["kd_positions_mask"].nonzero()  # (N, 2), row-major
    assert rows.shape[0] == batch["kd_topk_ids"].shape[0]
    for i, (b, p) in enumerate(rows.tolist()):
        assert batch["labels"][b, p + 1] == batch["kd_topk_ids"][i, 0], (i, b, p)
        assert batch["kd_topk_ids"][i, 1] == p
    assert torch.equal(flat_labels(batch), batch["kd_topk_ids"][:, 0])
    return rows.shape[0]


def test_collator_pads_right_and_builds_labels_and_masks():
    samples = make_samples(3)
    dataset = DistillDataset(samples, TokenTargets(samples))
    batch = DistillCollator(PAD)(dataset.__getitems__([0, 1, 2]))
    rows = samples.to_pylist()
    T = max(row["length"] for row in rows)
    assert batch["input_ids"].shape == (3, T) and batch["labels"].shape == (3, T)
    for b, row in enumerate(rows):
        length, mask = row["length"], np.asarray(row["loss_mask"])
        assert batch["input_ids"][b, :length].tolist() == row["input_ids"]
        assert (batch["input_ids"][b, length:] == PAD).all()
        assert batch["attention_mask"][b].tolist() == [1] * length + [0] * (T - length)
        expected_labels = [t if m else IGNORE_INDEX for t, m in zip(row["input_ids"], mask)] + [IGNORE_INDEX] * (T - length)
        assert batch["labels"][b].tolist() == expected_labels
        assert batch["kd_positions_mask"][b].nonzero().flatten().tolist() == trained_positions(mask).tolist()
    assert batch["sample_ids"] == [row["sample_id"] for row in rows]
    assert batch["sample_index"].tolist() == [0, 1, 2]
    assert batch["kd_topk_ids"].dtype == torch.long and batch["kd_topk_logprobs"].dtype == torch.float32
    check_invariant(batch)


def test_pad_to_multiple_of():
    samples = make_samples(3)
    batch = DistillCollator(PAD, pad_to_multiple_of=8)(DistillDataset(samples, TokenTargets(samples)).__getitems__([0, 1]))
    assert batch["input_ids"].shape[1] % 8 == 0
    check_invariant(batch)


@pytest.mark.parametrize("batch_size,accumulation", [(1, 1), (3, 2), (5, 3)])
def test_invariant_under_shuffling_and_accumulation(batch_size, accumulation):
    """Shuffled DataLoader batches, grouped into accumulation steps: every row at its place,
    every sample's rows exactly once per epoch."""
    samples = make_samples(17, seed=1)
    targets = TokenTargets(samples)
    dataset = DistillDataset(samples, targets)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         collate_fn=DistillCollator(PAD), generator=torch.Generator().manual_seed(3))
    seen, rows, step = [], 0, []
    for batch in loader:
        step.append(batch)
        if len(step) == accumulation:
            rows += sum(check_invariant(micro) for micro in step)
            seen += [sample_id for micro in step for sample_id in micro["sample_ids"]]
            step = []
    rows += sum(check_invariant(micro) for micro in step)
    seen += [sample_id for micro in step for sample_id in micro["sample_ids"]]
    assert sorted(seen) == sorted(samples["sample_id"].to_pylist())
    assert rows == sum(samples["num_trained"].to_pylist())
    assert seen != samples["sample_id"].to_pylist()  # really shuffled
    assert targets.calls == len(loader)  # one artifact read per batch (__getitems__)


def test_first_k_columns():
    samples = make_samples(4)
    batch = DistillCollator(PAD)(DistillDataset(samples, TokenTargets(samples, k=4), k=2).__getitems__([0, 1]))
    assert batch["kd_topk_ids"].shape[1] == 2 and batch["kd_topk_logprobs"].shape[1] == 2
    check_invariant(batch)


def test_without_targets_is_the_sft_batch():
    samples = make_samples(4)
    batch = DistillCollator(PAD)(DistillDataset(samples, None).__getitems__([0, 1, 2]))
    assert "kd_topk_ids" not in batch and "kd_topk_logprobs" not in batch
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == int(batch["kd_positions_mask"].sum())


def test_missing_sample_is_named():
    samples = make_samples(4)
    targets = TokenTargets(samples)
    missing = samples["sample_id"][2].as_py()
    del targets.data[missing]
    dataset = DistillDataset(samples, targets)
    with pytest.raises(MissingTargetsError, match=missing):
        dataset.__getitems__([1, 2, 3])


def test_missing_sample_is_named_for_dict_providers():
    samples = make_samples(4)
    targets = TokenTargets(samples)
    missing = samples["sample_id"][0].as_py()

    class DictProvider:
        def get_many(self, sample_ids):
            return {sample_id: targets.data[sample_id] for sample_id in sample_ids if sample_id != missing}

    with pytest.raises(MissingTargetsError, match=missing):
        DistillDataset(samples, DictProvider())[0]


def test_position_mismatch_is_named():
    samples = make_samples(6)
    targets = TokenTargets(samples)
    victim = samples["sample_id"][4].as_py()
    record = targets.data[victim]
    record["positions"] = record["positions"] + 1  # an artifact made from a shifted mask
    with pytest.raises(PositionMismatchError, match=f"sample {victim}"):
        DistillDataset(samples, targets)[4]
    record["positions"] = record["positions"][:-1]  # one row short
    with pytest.raises(PositionMismatchError, match=f"sample {victim}"):
        DistillDataset(samples, targets)[4]


def test_empty_split_is_refused():
    with pytest.raises(ValueError, match="no 'validation' samples"):
        DistillDataset(make_samples(2).slice(0, 0), None, split="validation")


def test_sliced_tables_keep_their_rows():
    """A filtered/sliced Arrow table (as TokenizedCorpus.split gives) must map rows correctly."""
    samples = make_samples(9)
    sliced = samples.slice(3, 4)
    dataset = DistillDataset(sliced, TokenTargets(samples))
    for index, row in enumerate(sliced.to_pylist()):
        item = dataset[index]
        assert item["sample_id"] == row["sample_id"]
        assert item["input_ids"].tolist() == row["input_ids"]
        assert item["loss_mask"].tolist() == row["loss_mask"]


def test_variable_rows_are_trimmed_to_the_batch_and_carry_the_estimator_weights():
    """Sampled rows (lengths 1..4 of K = 4, counts): the batch is as wide as its longest row,
    rows keep their ids / padding, and `kd_topk_weights` = c / n * p_s / r from the record."""
    from kd_pipeline.core.losses import SampledWeights

    samples = make_samples()
    targets = TokenTargets(samples)
    rng = np.random.default_rng(1)
    for record in targets.data.values():
        n = len(record["positions"])
        record["row_lengths"] = rng.integers(1, 3, n)  # at most 2 entries: the batch is 2 wide
        record["counts"] = np.where(np.arange(4)[None, :] < record["row_lengths"][:, None], 3, 0)
        record["topk_logprobs"][np.arange(4)[None, :] >= record["row_lengths"][:, None]] = -np.inf
        record["logz"] = rng.normal(size=(n, 2)).astype(np.float32)
    weights = SampledWeights(draws=6, target_scale=2.0, proposal_scale=1.0, target_column=1, proposal_column=0)
    dataset = DistillDataset(samples, targets, sampled=weights)
    items = dataset.__getitems__(list(range(len(samples))))
    batch = DistillCollator(PAD)(items)
    check_invariant(batch)
    assert batch["kd_topk_ids"].shape[1] == 2 == batch["kd_topk_weights"].shape[1]
    records = [targets.data[item["sample_id"]] for item in items]
    lp = np.concatenate([r["topk_logprobs"][:, :2] for r in records]).astype(np.float64)
    logz = np.concatenate([r["logz"] for r in records]).astype(np.float64)
    counts = np.concatenate([r["counts"][:, :2] for r in records])
    with np.errstate(invalid="ignore"):
        expected = np.where(counts > 0, counts / 6 * np.exp((2.0 - 1.0) * lp - logz[:, 1:] + logz[:, :1]), 0.0)
    np.testing.assert_allclose(batch["kd_topk_weights"].numpy(), expected, rtol=1e-6)
    assert (batch["kd_topk_weights"].numpy()[counts == 0] == 0).all()
    same_scale = SampledWeights(draws=6, target_scale=1.0, proposal_scale=1.0, target_column=0, proposal_column=0)
    np.testing.assert_array_equal(same_scale(counts, lp, logz), (counts / 6).astype(np.float32))
