"""Top-k artifact store: codecs, manifest, shard writer (atomicity, resume, ranks), reader."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from kd_pipeline.core.atomic import sha256_file
from kd_pipeline.core.locking import FolderLockedError
from kd_pipeline.core.topk_store import (
    ArtifactSource,
    LogQuantZstdCodec,
    Manifest,
    ManifestMismatchError,
    MissingSampleError,
    RawCodec,
    ShardCorruptError,
    TopKArrays,
    TopKReader,
    TopKShardWriter,
    TopKStoreError,
    get_codec,
    merge_manifests,
)

VOCAB = 8192
K = 32


def llm_like_logits(rng: np.random.Generator, num_rows: int, vocab: int) -> np.ndarray:
    """(num_rows, vocab) float64 logits shaped like a causal LM's next-token distributions.

    Zipf-like prior (frequent tokens have low ids), context noise that persists between
    neighbouring rows (so they share part of their top-k), and a peak on one "intended" token of
    random height (top-1 probability from ~0.05 to ~0.99).
    """
    prior = -0.6 * np.log(np.arange(vocab) + 20.0) + 0.7 * rng.standard_normal(vocab)
    noise = rng.standard_normal((num_rows, vocab))
    for row in range(1, num_rows):
        noise[row] = 0.55 * noise[row - 1] + np.sqrt(1 - 0.55**2) * noise[row]
    logits = prior + 1.6 * noise
    logits[np.arange(num_rows), rng.integers(0, vocab, num_rows)] += rng.uniform(0, 6, num_rows)
    return logits / 0.45


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def make_sample(rng: np.random.Generator, num_rows: int, vocab: int = VOCAB, k: int = K,
                scales: tuple[float, ...] = ()) -> TopKArrays:
    logprobs = log_softmax64(llm_like_logits(rng, num_rows, vocab))
    ids = np.argsort(-logprobs, axis=1, kind="stable")[:, :k]
    targets = rng.integers(0, vocab, num_rows)
    positions = np.sort(rng.choice(4 * num_rows + 8, size=num_rows, replace=False))
    # log Z_s = log sum_v p(v)**s over the full vocabulary, per row and scale.
    logz = np.stack([np.logaddexp.reduce(s * logprobs, axis=1) for s in scales], 1) if scales else None
    return TopKArrays.from_any(positions, ids, np.take_along_axis(logprobs, ids, 1),
                               logprobs[np.arange(num_rows), targets], logz, scales)


@functools.lru_cache(maxsize=None)  # tests only read the arrays
def make_samples(count: int, seed: int = 0, min_rows: int = 1, max_rows: int = 40) -> list[tuple[str, TopKArrays]]:
    rng = np.random.default_rng(seed)
    return [(f"{index:032x}", make_sample(rng, int(rng.integers(min_rows, max_rows + 1)))) for index in range(count)]


def source(**changes) -> ArtifactSource:
    fields = dict(teacher_path="/models/teacher", teacher_config_sha256="c" * 64, teacher_weights_sha256="w" * 64,
                  tokenizer_sha256="t" * 64, vocab_size=VOCAB, k=K, capture_dtype="float32",
                  capture_temperature=1.0, corpus_fingerprint="f" * 32)
    fields.update(changes)
    return ArtifactSource(**fields)


def write(directory: Path, samples, codec=None, **options) -> Manifest | None:
    options.setdefault("shard_tokens", 100)
    options.setdefault("samples_per_row_group", 3)
    with TopKShardWriter(directory, source(), codec or RawCodec(), **options) as writer:
        for sample_id, sample in samples:
            if sample_id not in writer.completed_sample_ids:
                writer.add(sample_id, sample.positions, sample.topk_ids, sample.topk_logprobs, sample.target_logprobs)
    return writer.manifest


def shard_digests(directory: Path) -> dict[str, str]:
    return {path.name: sha256_file(path) for path in sorted(directory.glob("shard-*.parquet"))}


def assert_same_content(reader_a: TopKReader, reader_b: TopKReader) -> None:
    assert sorted(reader_a.sample_ids()) == sorted(reader_b.sample_ids())
    for sample_id in reader_a.sample_ids():
        a, b = reader_a.get(sample_id), reader_b.get(sample_id)
        for name in ("positions", "topk_ids", "topk_logprobs", "target_logprobs"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (sample_id, name)


# -- codecs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_rows", [0, 1, 37])
def test_raw_codec_round_trip_is_bit_exact_with_canonical_dtypes(num_rows):
    sample = make_sample(np.random.default_rng(num_rows), num_rows)
    codec = RawCodec()
    decoded = codec.decode(codec.encode(sample), num_rows, K)
    expected_dtypes = {"positions": np.int32, "topk_ids": np.int64, "topk_logprobs": np.float32,
                       "target_logprobs": np.float32}
    for name, dtype in expected_dtypes.items():
        got, want = getattr(decoded, name), getattr(sample, name)
        assert got.dtype == dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes(), name  # bit-exact, NaN/-0.0 included


def test_raw_codec_keeps_special_floats():
    sample = make_sample(np.random.default_rng(1), 4)
    logprobs = sample.topk_logprobs.copy()
    logprobs[0, -1], logprobs[1, -1] = -np.inf, -0.0
    sample = TopKArrays(sample.positions, sample.topk_ids, logprobs, sample.target_logprobs)
    decoded = RawCodec().decode(RawCodec().encode(sample), 4, K)
    assert decoded.topk_logprobs.tobytes() == logprobs.tobytes()


def quantization_bound(codec: LogQuantZstdCodec, distance: np.ndarray) -> np.ndarray:
    """Largest error of rounding `log1p(d / knee) / step` to an integer, as a distance in nats."""
    return codec.knee * np.expm1(codec.step / 2) * (1 + distance / codec.knee)


def test_logquant_codec_ids_exact_values_within_bound_rows_descending():
    codec = LogQuantZstdCodec()
    rng = np.random.default_rng(2)
    top_errors = []
    for num_rows in (0, 1, 2, 150):
        sample = make_sample(rng, num_rows)
        decoded = codec.decode(codec.encode(sample), num_rows, K)
        assert decoded.positions.dtype == np.int32 and np.array_equal(decoded.positions, sample.positions)
        assert decoded.topk_ids.dtype == np.int64 and decoded.topk_logprobs.dtype == np.float32
        # The id set of each row is exact; values are matched by id.
        assert np.array_equal(np.sort(decoded.topk_ids, 1), np.sort(sample.topk_ids, 1))
        assert np.all(np.diff(decoded.topk_logprobs, axis=1) <= 0)
        raw_by_id = np.take_along_axis(sample.topk_logprobs, np.argsort(sample.topk_ids, 1), 1).astype(np.float64)
        got_by_id = np.take_along_axis(decoded.topk_logprobs, np.argsort(decoded.topk_ids, 1), 1).astype(np.float64)
        distance = sample.topk_logprobs[:, :1].astype(np.float64) - raw_by_id
        # Each entry is off by its rounding error plus one shift per row: renormalizing to the
        # exact top-k mass moves every entry by the p-weighted mean rounding error, bounded here
        # by log(sum_i p_i exp(bound_i) / sum_i p_i); 2e-3 covers the float16 row offset.
        bound = quantization_bound(codec, distance)
        shift_bound = (np.logaddexp.reduce(raw_by_id + bound, axis=1)
                       - np.logaddexp.reduce(raw_by_id, axis=1))[:, None] if num_rows else 0.0
        assert np.all(np.abs(got_by_id - raw_by_id) <= bound + shift_bound + 2e-3)
        top_errors.append(np.abs(got_by_id - raw_by_id)[distance <= 1.0])
        # Float16 target log-probs; the top-k mass is kept (for a K+1 "rest" bucket).
        np.testing.assert_allclose(decoded.target_logprobs, sample.target_logprobs, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(np.exp(decoded.topk_logprobs.astype(np.float64)).sum(1),
                                   np.exp(sample.topk_logprobs.astype(np.float64)).sum(1), rtol=2e-3)
    # Where the probability is (entries within 1 nat of the top): at most about
    # bound(1 nat) = 0.08 plus the row shift.
    assert np.concatenate(top_errors).max() <= 0.1


def forward_kl_topk(teacher_logprobs: np.ndarray, student_logprobs: np.ndarray) -> float:
    """Mean forward KL over the top-k, both sides renormalized on it (float64, from the definition)."""
    p = np.exp(log_softmax64(teacher_logprobs))
    return float((p * (log_softmax64(teacher_logprobs) - log_softmax64(student_logprobs))).sum(1).mean())


def forward_kl_with_rest(teacher_logprobs: np.ndarray, student_logprobs: np.ndarray) -> float:
    """Mean forward KL over K + 1 categories: the top-k and the rest of the vocabulary."""
    def with_rest(logprobs):
        rest = np.log(np.clip(-np.expm1(np.logaddexp.reduce(logprobs, axis=1, keepdims=True)), 1e-300, None))
        return np.concatenate([logprobs, rest], axis=1)
    p, q = with_rest(teacher_logprobs), with_rest(student_logprobs)
    return float((np.exp(p) * (p - q)).sum(1).mean())


def test_logquant_codec_kd_loss_within_one_percent_of_raw():
    """A realistic student: about 0.3 nats/token (forward KL) from the teacher."""
    rng = np.random.default_rng(3)
    codec = LogQuantZstdCodec()
    raw_losses, decoded_losses = np.zeros(2), np.zeros(2)
    for _ in range(6):
        num_rows = 120
        teacher_logits = llm_like_logits(rng, num_rows, VOCAB)
        student_logits = teacher_logits + 1.0 * rng.standard_normal(teacher_logits.shape)
        teacher, student = log_softmax64(teacher_logits), log_softmax64(student_logits)
        ids = np.argsort(-teacher, axis=1)[:, :K]
        teacher_topk, student_topk = np.take_along_axis(teacher, ids, 1), np.take_along_axis(student, ids, 1)
        sample = TopKArrays.from_any(np.arange(num_rows), ids, teacher_topk, teacher_topk[:, 0])
        decoded = codec.decode(codec.encode(sample), num_rows, K)
        decoded_topk = np.take_along_axis(decoded.topk_logprobs.astype(np.float64),
                                          np.argsort(decoded.topk_ids, 1), 1)
        order = np.argsort(ids, 1)  # compare both in ascending-id order
        raw_topk_by_id = np.take_along_axis(sample.topk_logprobs.astype(np.float64), order, 1)
        student_by_id = np.take_along_axis(student_topk, order, 1)
        for index, loss in enumerate((forward_kl_topk, forward_kl_with_rest)):
            raw_losses[index] += loss(raw_topk_by_id, student_by_id)
            decoded_losses[index] += loss(decoded_topk, student_by_id)
    assert np.all(raw_losses / 6 > 0.25), raw_losses / 6  # the student is realistic, not a copy
    relative_error = np.abs(decoded_losses - raw_losses) / raw_losses
    assert np.all(relative_error < 0.01), relative_error
    # The absolute error does not depend on the student: ~0.002 nats/token at the default step.
    assert np.all(np.abs(decoded_losses - raw_losses) / 6 < 0.003)


def test_logquant_codec_is_deterministic_and_compact():
    sample = make_sample(np.random.default_rng(4), 200)
    codec = LogQuantZstdCodec()
    payload = codec.encode(sample)["payload"]
    assert payload == codec.encode(sample)["payload"]
    raw_bytes = len(b"".join(RawCodec().encode(sample).values()))
    assert len(payload) < raw_bytes / 4


@pytest.mark.parametrize("break_it, message", [
    (lambda ids, lp: (np.concatenate([ids[:, :1], ids[:, :-1]], 1), lp), "same token id twice"),
    (lambda ids, lp: (ids, lp[:, ::-1].copy()), "sorted descending"),
    (lambda ids, lp: (ids, np.where(np.arange(K) == 3, np.nan, lp)), "NaN"),
])
def test_logquant_codec_rejects_malformed_rows(break_it, message):
    sample = make_sample(np.random.default_rng(5), 6)
    ids, logprobs = break_it(sample.topk_ids, sample.topk_logprobs)
    broken = TopKArrays(sample.positions, ids, logprobs.astype(np.float32), sample.target_logprobs)
    with pytest.raises(ValueError, match=message):
        LogQuantZstdCodec().encode(broken)


def test_codec_registry_rebuilds_codecs_and_names_unknown_ones():
    codec = get_codec("logquant_zstd", {"step": 0.05, "knee": 2.0})
    assert codec.settings() == {"knee": 2.0, "step": 0.05}
    assert get_codec(codec.name, codec.settings()).settings() == codec.settings()
    with pytest.raises(ValueError, match=r"unknown top-k codec 'bf16'.*'logquant_zstd', 'raw'"):
        get_codec("bf16")
    with pytest.raises(ValueError, match="bad settings for top-k codec 'raw'"):
        get_codec("raw", {"step": 0.1})


def test_sample_arrays_accept_torch_tensors_including_bfloat16():
    logprobs = torch.tensor([[-0.5, -1.25, -3.0]], dtype=torch.bfloat16)
    arrays = TopKArrays.from_any(torch.tensor([4]), torch.tensor([[7, 1, 3]]), logprobs, logprobs[:, 0])
    assert arrays.positions.dtype == np.int32 and arrays.topk_ids.dtype == np.int64
    assert arrays.topk_logprobs.dtype == np.float32 and np.array_equal(arrays.topk_logprobs, [[-0.5, -1.25, -3.0]])


def test_sample_arrays_are_validated():
    with pytest.raises(ValueError, match="strictly increasing"):
        TopKArrays.from_any([3, 2], np.zeros((2, 1)), np.zeros((2, 1)), np.zeros(2))
    with pytest.raises(ValueError, match="topk_logprobs shape"):
        TopKArrays.from_any([0], np.zeros((1, 2)), np.zeros((1, 3)), np.zeros(1))


# -- writer, manifest, reader ------------------------------------------------------------------


def test_write_read_round_trip_raw_is_bit_exact(tmp_path):
    samples = make_samples(20, min_rows=0)
    write(tmp_path, samples)
    reader = TopKReader(tmp_path)
    assert len(reader) == 20 and reader.sample_ids() == [sample_id for sample_id, _ in samples]
    assert samples[3][0] in reader and "nope" not in reader
    asked = [samples[7][0], samples[2][0], samples[7][0]]
    batch = reader.get_many(asked)
    assert batch.sample_ids == tuple(asked) and len(batch) == 3
    assert batch.topk_ids.dtype == torch.int64 and batch.topk_logprobs.dtype == torch.float32
    assert batch.positions.dtype == torch.int64 and batch.target_logprobs.dtype == torch.float32
    for got, sample_id in zip(batch, asked):
        want = dict(samples)[sample_id]
        assert got.sample_id == sample_id and got.num_positions == reader.num_positions(sample_id)
        assert np.array_equal(got.positions.numpy(), want.positions)
        assert np.array_equal(got.topk_ids.numpy(), want.topk_ids)
        assert got.topk_logprobs.numpy().tobytes() == want.topk_logprobs.tobytes()
        assert got.target_logprobs.numpy().tobytes() == want.target_logprobs.tobytes()
    assert torch.equal(batch.offsets[1:] - batch.offsets[:-1], batch.num_positions)


def test_reader_names_missing_samples_with_a_key_error(tmp_path):
    write(tmp_path, make_samples(3))
    with pytest.raises(KeyError, match="sample absent is not in the top-k artifact") as caught:
        TopKReader(tmp_path).get_many(["absent"])
    assert isinstance(caught.value, MissingSampleError)


def test_manifest_is_exactly_what_was_written(tmp_path):
    samples = make_samples(5, min_rows=10, max_rows=30)
    codec = LogQuantZstdCodec()
    write(tmp_path, samples, codec, shard_tokens=40, samples_per_row_group=2)
    data = json.loads((tmp_path / "manifest.json").read_text())

    coverage = [np.exp(sample.topk_logprobs.astype(np.float64)).sum(1) for _, sample in samples]
    shards, cut, start = [], [], 0
    tokens = 0
    for index, (_, sample) in enumerate(samples):  # the writer's cut rule, stated independently
        tokens += sample.num_positions
        if tokens >= 40 or index == len(samples) - 1:
            cut.append((start, index + 1))
            start, tokens = index + 1, 0
    for shard_index, (first, stop) in enumerate(cut):
        name = f"shard-r00-{shard_index:05d}.parquet"
        values = np.concatenate(coverage[first:stop])
        shards.append({
            "file": name, "rank": 0, "index": shard_index, "rows": stop - first,
            "trained_tokens": sum(sample.num_positions for _, sample in samples[first:stop]),
            "bytes": (tmp_path / name).stat().st_size, "sha256": sha256_file(tmp_path / name),
            "coverage_histogram": np.bincount(np.minimum((values * 20).astype(int), 19), minlength=20).tolist(),
            "coverage_sum": pytest.approx(values.sum(), rel=1e-12),
            "entries": sum(sample.topk_ids.size for _, sample in samples[first:stop]),
        })
    all_coverage = np.concatenate(coverage)
    histogram = np.bincount(np.minimum((all_coverage * 20).astype(int), 19), minlength=20)
    quantiles = np.quantile(all_coverage, [0.05, 0.25, 0.5, 0.75, 0.95])
    assert data.pop("topk_coverage") == {  # quantiles interpolate within 0.05-wide bins
        "bins": 20, "histogram": histogram.tolist(), "mean": pytest.approx(all_coverage.mean(), rel=1e-12),
        "quantiles": {name: pytest.approx(value, abs=0.05)
                      for name, value in zip(("p05", "p25", "p50", "p75", "p95"), quantiles)},
    }
    assert data == {
        "schema_version": 3, "logz_temperatures": [1.0], "capture_mode": "topk", "capture_params": {},
        "teacher_path": "/models/teacher", "teacher_config_sha256": "c" * 64, "teacher_weights_sha256": "w" * 64,
        "tokenizer_sha256": "t" * 64, "vocab_size": VOCAB, "k": K,
        "capture_dtype": "float32", "capture_temperature": 1.0, "corpus_fingerprint": "f" * 32,
        "codec_name": "logquant_zstd", "codec_settings": {"knee": 1.0, "step": 0.08},
        "shard_tokens": 40, "samples_per_row_group": 2, "world_size": 1,
        "num_samples": 5, "num_trained_tokens": sum(s.num_positions for _, s in samples),
        "num_bytes": sum(shard["bytes"] for shard in shards),
        "shards": shards,
    }
    assert list((tmp_path / "manifest.json").read_text().splitlines()[1:3]) == [
        '  "capture_dtype": "float32",', '  "capture_mode": "topk",']  # sorted keys
    assert Manifest.read(tmp_path / "manifest.json").to_dict()["shards"][0]["sha256"] == shards[0]["sha256"]


def test_shards_cut_at_the_token_threshold_with_fixed_row_groups(tmp_path):
    rows = [6, 5, 9, 1, 1, 1, 1, 12, 3]
    samples = [(f"s{index}", make_sample(np.random.default_rng(index), n)) for index, n in enumerate(rows)]
    manifest = write(tmp_path, samples, shard_tokens=10, samples_per_row_group=2)
    # 6+5 >= 10 | 9+1 >= 10 | 1+1+1+12 >= 10 | 3 (the rest, at close)
    assert [(shard.rows, shard.trained_tokens) for shard in manifest.shards] == [(2, 11), (2, 10), (4, 15), (1, 3)]
    group_rows = [[pq.ParquetFile(tmp_path / shard.file).metadata.row_group(g).num_rows
                   for g in range(pq.ParquetFile(tmp_path / shard.file).metadata.num_row_groups)]
                  for shard in manifest.shards]
    assert group_rows == [[2], [2], [2, 2], [1]]


def test_same_input_gives_the_same_shard_bytes(tmp_path):
    samples = make_samples(12)
    write(tmp_path / "a", samples, LogQuantZstdCodec())
    write(tmp_path / "b", samples, LogQuantZstdCodec())
    assert shard_digests(tmp_path / "a") == shard_digests(tmp_path / "b")
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


def test_exception_inside_the_writer_leaves_no_manifest(tmp_path):
    samples = make_samples(10)
    with pytest.raises(RuntimeError, match="teacher crashed"):
        with TopKShardWriter(tmp_path, source(), RawCodec(), shard_tokens=50) as writer:
            for sample_id, sample in samples[:8]:
                writer.add(sample_id, sample.positions, sample.topk_ids, sample.topk_logprobs, sample.target_logprobs)
            raise RuntimeError("teacher crashed")
    assert not (tmp_path / "manifest.json").exists()
    assert not list(tmp_path.glob("*.tmp-*"))
    with pytest.raises(TopKStoreError, match="manifest.json does not exist"):
        TopKReader(tmp_path)


def test_writer_rejects_bad_samples_naming_them(tmp_path):
    with TopKShardWriter(tmp_path, source(), RawCodec()) as writer:
        sample = make_sample(np.random.default_rng(0), 3)
        with pytest.raises(ValueError, match=f"sample bad: topk_ids holds id {VOCAB} >= vocab_size {VOCAB}"):
            writer.add("bad", sample.positions, np.full_like(sample.topk_ids, VOCAB), sample.topk_logprobs,
                       sample.target_logprobs)
        with pytest.raises(ValueError, match="sample narrow: topk_ids has k=2, the artifact has k=32"):
            writer.add("narrow", sample.positions, sample.topk_ids[:, :2], sample.topk_logprobs[:, :2],
                       sample.target_logprobs)
        writer.add("ok", sample.positions, sample.topk_ids, sample.topk_logprobs, sample.target_logprobs)
        with pytest.raises(ValueError, match="sample ok was already written"):
            writer.add("ok", sample.positions, sample.topk_ids, sample.topk_logprobs, sample.target_logprobs)


def test_resume_after_an_abandoned_writer_gives_identical_shards(tmp_path):
    samples = make_samples(30)
    write(tmp_path / "full", samples, LogQuantZstdCodec())
    expected = shard_digests(tmp_path / "full")

    part = tmp_path / "part"
    abandoned = TopKShardWriter(part, source(), LogQuantZstdCodec(), shard_tokens=100, samples_per_row_group=3)
    for sample_id, sample in samples[:17]:  # a few shards plus one in progress
        abandoned.add(sample_id, sample.positions, sample.topk_ids, sample.topk_logprobs, sample.target_logprobs)
    finished = set(path.name for path in part.glob("shard-*.parquet"))
    assert finished and list(part.glob("shard-*.tmp-*"))  # the shard in progress
    del abandoned  # "killed": no close, no abort
    (part / "shard-r00-00099.parquet.tmp-424242").write_bytes(b"PAR1 torn")
    (part / "manifest-r00.partial.json.tmp-424242").write_text("{")

    resumed = TopKShardWriter(part, source(), LogQuantZstdCodec(), shard_tokens=100, samples_per_row_group=3)
    assert not list(part.glob("*.tmp-*"))
    done = resumed.completed_sample_ids
    assert done == {sample_id for sample_id, _ in samples[:len(done)]} and 0 < len(done) < 17
    with resumed:
        for sample_id, sample in samples:
            if sample_id not in done:
                resumed.add(sample_id, sample.positions, sample.topk_ids, sample.topk_logprobs, sample.target_logprobs)
    assert shard_digests(part) == expected
    assert_same_content(TopKReader(part), TopKReader(tmp_path / "full"))


KILLED_WRITER = textwrap.dedent("""
    import pathlib, sys, time
    import numpy as np
    from kd_pipeline.core.topk_store import ArtifactSource, LogQuantZstdCodec, TopKShardWriter
    directory, data = pathlib.Path(sys.argv[1]), np.load(sys.argv[2])
    source = ArtifactSource(**{{name: data["source_" + name].tolist() for name in {source_fields!r}}})
    writer = TopKShardWriter(directory, source, LogQuantZstdCodec(), shard_tokens=100, samples_per_row_group=3)
    for index in range(int(data["count"])):
        fields = ("positions", "ids", "logprobs", "target")
        writer.add(f"{{index:032x}}", *(data[f"{{name}}{{index}}"] for name in fields))
        if len(list(directory.glob("shard-*.parquet"))) >= 2 and list(directory.glob("shard-*.tmp-*")):
            print("shard in progress", flush=True)
            time.sleep(60)  # killed here
    writer.close()
""")


def start_writer_process(tmp_path: Path, directory: Path, samples) -> subprocess.Popen:
    """A process writing `samples` to `directory` that stops (sleeping) with a shard in progress
    once two shards are finished, after printing "shard in progress"."""
    arrays = {"count": len(samples)}
    fields = [name for name in vars(source()) if name != "capture_params"]  # a dict: the default {}
    arrays.update({f"source_{name}": getattr(source(), name) for name in fields})
    for index, (sample_id, sample) in enumerate(samples):
        assert sample_id == f"{index:032x}"
        arrays.update({f"positions{index}": sample.positions, f"ids{index}": sample.topk_ids,
                       f"logprobs{index}": sample.topk_logprobs, f"target{index}": sample.target_logprobs})
    np.savez(tmp_path / "samples.npz", **arrays)
    script = KILLED_WRITER.format(source_fields=fields)
    return subprocess.Popen([sys.executable, "-c", script, str(directory), str(tmp_path / "samples.npz")],
                            stdout=subprocess.PIPE, text=True)


def test_resume_after_sigkill_of_a_writer_process(tmp_path):
    samples = make_samples(30)
    directory = tmp_path / "killed"
    process = start_writer_process(tmp_path, directory, samples)
    try:
        assert process.stdout.readline().strip() == "shard in progress"
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert list(directory.glob("shard-*.tmp-*")) and not (directory / "manifest.json").exists()
    write(directory, samples, LogQuantZstdCodec())
    write(tmp_path / "full", samples, LogQuantZstdCodec())
    assert shard_digests(directory) == shard_digests(tmp_path / "full")


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_runs_and_leaves_its_files(tmp_path):
    samples = make_samples(30)
    directory = tmp_path / "shared"
    process = start_writer_process(tmp_path, directory, samples)
    try:
        assert process.stdout.readline().strip() == "shard in progress"
        before = sorted(path.name for path in directory.iterdir())
        with pytest.raises(FolderLockedError, match=re.escape(
                f"{directory} is locked by process {process.pid} (teacher top-k writer, rank 0 of 1, since ")):
            TopKShardWriter(directory, source(), LogQuantZstdCodec(), shard_tokens=100, samples_per_row_group=3)
        assert sorted(path.name for path in directory.iterdir()) == before  # the live temp shard survives
        assert any(".tmp-" in name for name in before)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    write(directory, samples, LogQuantZstdCodec())  # the dead writer's lock is taken over
    write(tmp_path / "full", samples, LogQuantZstdCodec())
    assert shard_digests(directory) == shard_digests(tmp_path / "full")


def test_writer_locks_its_folder_or_its_rank_share_until_closed(tmp_path):
    directory = tmp_path / "artifact"
    writer = TopKShardWriter(directory, source(), RawCodec(), rank=1, world_size=2)
    assert json.loads((tmp_path / "artifact.r01.lock").read_text())["purpose"] == "teacher top-k writer, rank 1 of 2"
    writer.close()
    assert (tmp_path / "artifact.r01.lock").read_text() == ""
    with TopKShardWriter(directory, source(), RawCodec(), rank=0, world_size=2):
        assert json.loads((tmp_path / "artifact.lock").read_text())["pid"] == os.getpid()
    assert (tmp_path / "artifact.lock").read_text() == ""
    assert not list(directory.glob("*.lock"))


def test_resume_with_other_settings_is_refused_naming_the_field(tmp_path):
    samples = make_samples(8)
    abandoned = TopKShardWriter(tmp_path, source(), RawCodec(), shard_tokens=30)
    for sample_id, sample in samples:
        abandoned.add(sample_id, sample.positions, sample.topk_ids, sample.topk_logprobs, sample.target_logprobs)
    del abandoned
    with pytest.raises(ManifestMismatchError, match="field 'codec_name' is 'raw' but this writer has 'logquant_zstd'"):
        TopKShardWriter(tmp_path, source(), LogQuantZstdCodec(), shard_tokens=30)
    with pytest.raises(ManifestMismatchError, match="field 'tokenizer_sha256'"):
        TopKShardWriter(tmp_path, source(tokenizer_sha256="other"), RawCodec(), shard_tokens=30)
    fresh = TopKShardWriter(tmp_path, source(), LogQuantZstdCodec(), shard_tokens=30, resume=False)
    assert not fresh.completed_sample_ids and not list(tmp_path.glob("shard-*"))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_shard_is_named_and_repaired_by_rewriting_it(tmp_path, damage):
    samples = make_samples(20)
    write(tmp_path, samples, LogQuantZstdCodec())
    good = shard_digests(tmp_path)
    victim = tmp_path / "shard-r00-00002.parquet"
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(bytes(data[: len(data) // 2]))
        with pytest.raises(ShardCorruptError, match=r"shard-r00-00002\.parquet.*kedro run --pipelines teacher_logits"):
            TopKReader(tmp_path)
    else:
        victim_ids = pq.read_table(victim, columns=["sample_id"])["sample_id"].to_pylist()
        payload = LogQuantZstdCodec().encode(dict(samples)[victim_ids[0]])["payload"]
        data[data.find(payload[-40:]) + 20] ^= 0x40  # inside a payload: the index still reads
        victim.write_bytes(bytes(data))
        with pytest.raises(ShardCorruptError, match=r"1 of \d+ shards are corrupt .*: shard-r00-00002\.parquet;"):
            TopKReader(tmp_path)  # default (small artifact): every sha256 checked at open
        reader = TopKReader(tmp_path, verify="lazy")  # sizes match: detected at first read
        reader.get(reader.sample_ids()[0])  # other shards still read
        with pytest.raises(ShardCorruptError,
                           match=r"shard-r00-00002\.parquet.*sha256.*kedro run --pipelines teacher_logits"):
            reader.get(victim_ids[0])
        assert reader.verify() == ["shard-r00-00002.parquet"]
    # Repair: the extraction re-run resumes; only the bad shard's samples are fed again.
    write(tmp_path, samples, LogQuantZstdCodec())
    assert shard_digests(tmp_path) == good
    assert TopKReader(tmp_path).verify() == []


def test_full_verification_finds_a_late_corrupt_shard_at_open_and_says_so(tmp_path, caplog):
    samples = make_samples(40)
    write(tmp_path, samples, LogQuantZstdCodec())
    shards = sorted(tmp_path.glob("shard-*.parquet"))
    assert len(shards) >= 4
    last = shards[-1]  # the shard training would reach last
    data = bytearray(last.read_bytes())
    data[len(data) // 3] ^= 0x01  # same size: only the sha256 tells
    last.write_bytes(bytes(data))
    for options in ({}, {"verify": "full"}):
        with pytest.raises(ShardCorruptError) as caught:
            TopKReader(tmp_path, **options)
        assert str(caught.value) == (
            f"top-k artifact {tmp_path}: 1 of {len(shards)} shards are corrupt (size or sha256 differs from the "
            f"manifest): {last.name}; re-run `kedro run --pipelines teacher_logits` to regenerate it")
    with caplog.at_level(logging.INFO, logger="kd_pipeline.core.topk_store.reader"):
        lazy = TopKReader(tmp_path, full_verify_max_bytes=1024)  # "huge" artifact: lazy check kept
        assert lazy.verify_mode == "lazy"
        assert re.search(r"verify=lazy \(auto: artifact 0\.\d\d GiB > full_verify_max_bytes 0\.00 GiB\): each of the "
                         rf"{len(shards)} shards' sha256 is checked when it is first read", caplog.text)
        lazy.get(lazy.sample_ids()[0])
        caplog.clear()
        data[len(data) // 3] ^= 0x01  # repaired
        last.write_bytes(bytes(data))
        full = TopKReader(tmp_path)
        assert full.verify_mode == "full"
        assert re.search(rf"verify=full \(auto: artifact 0\.\d\d GiB <= full_verify_max_bytes 16\.00 GiB\): sha256 of all "
                         rf"{len(shards)} shards \(0\.\d\d GiB\) checked at open", caplog.text)
    assert full._verified == set(range(len(shards)))  # nothing is hashed again on read
    with pytest.raises(ValueError, match=r"verify mode must be one of \['auto', 'full', 'lazy'\], got 'yes'"):
        TopKReader(tmp_path, verify="yes")


def test_unknown_schema_version_or_codec_is_rejected(tmp_path):
    write(tmp_path, make_samples(4))
    path = tmp_path / "manifest.json"
    original = json.loads(path.read_text())
    path.write_text(json.dumps(original | {"schema_version": 4}))
    with pytest.raises(TopKStoreError, match=r"unsupported schema_version 4 .*reads versions \[2, 3\]"):
        TopKReader(tmp_path)
    path.write_text(json.dumps(original | {"codec_name": "fp8"}))
    with pytest.raises(TopKStoreError, match=r"manifest.json: unknown top-k codec 'fp8'; known codecs"):
        TopKReader(tmp_path)
    path.write_text(json.dumps(original | {"num_samples": 5}))
    with pytest.raises(TopKStoreError, match="'num_samples' is 5 but the shards add up to 4"):
        TopKReader(tmp_path)


def test_check_compatible_names_the_mismatching_field(tmp_path):
    write(tmp_path, make_samples(3))
    manifest = TopKReader(tmp_path).manifest
    manifest.check_compatible({"vocab_size": VOCAB, "tokenizer_sha256": "t" * 64, "capture_temperature": 1})
    with pytest.raises(ManifestMismatchError,
                       match=f"manifest field 'vocab_size' is {VOCAB} but the student tokenizer has 32000"):
        manifest.check_compatible({"vocab_size": 32000, "tokenizer_sha256": "t" * 64}, "the student tokenizer")
    with pytest.raises(ManifestMismatchError, match="manifest field 'corpus_fingerprint' is 'fff"):
        manifest.check_compatible({"corpus_fingerprint": "other"}, "the corpus")
    with pytest.raises(ValueError, match="unknown manifest field 'vocab'"):
        manifest.check_compatible({"vocab": 1})


def test_two_ranks_merge_to_the_single_process_content(tmp_path):
    samples = make_samples(25)
    write(tmp_path / "single", samples, LogQuantZstdCodec())
    multi = tmp_path / "multi"
    for rank in range(2):  # each rank gets every second sample, in the common order
        with TopKShardWriter(multi, source(), LogQuantZstdCodec(), rank=rank, world_size=2,
                             shard_tokens=100, samples_per_row_group=3) as writer:
            for sample_id, sample in samples[rank::2]:
                writer.add(sample_id, sample.positions, sample.topk_ids, sample.topk_logprobs, sample.target_logprobs)
        assert not (multi / "manifest.json").exists()  # only the merge writes it
    manifest = merge_manifests(multi, world_size=2)
    assert {shard.rank for shard in manifest.shards} == {0, 1}
    assert manifest.num_samples == 25 and manifest.world_size == 2
    single, merged = TopKReader(tmp_path / "single"), TopKReader(multi)
    assert merged.manifest.num_trained_tokens == single.manifest.num_trained_tokens
    assert_same_content(single, merged)


def test_merge_refuses_unfinished_ranks_and_overlapping_samples(tmp_path):
    samples = make_samples(6)
    with TopKShardWriter(tmp_path, source(), RawCodec(), rank=0, world_size=2) as writer:
        for sample_id, sample in samples:
            writer.add(sample_id, sample.positions, sample.topk_ids, sample.topk_logprobs, sample.target_logprobs)
    with pytest.raises(TopKStoreError, match="rank 1 of 2 has not written any progress"):
        merge_manifests(tmp_path, 2)
    with TopKShardWriter(tmp_path, source(), RawCodec(), rank=1, world_size=2) as writer:
        sample_id, sample = samples[0]
        writer.add(sample_id, sample.positions, sample.topk_ids, sample.topk_logprobs, sample.target_logprobs)
    with pytest.raises(TopKStoreError, match=f"sample {samples[0][0]} is in both shard-r00-00000.parquet and "
                                             "shard-r01-00000.parquet"):
        merge_manifests(tmp_path, 2)


def test_reader_survives_pickling_for_dataloader_workers(tmp_path):
    import pickle

    samples = make_samples(5)
    write(tmp_path, samples, LogQuantZstdCodec())
    reader = TopKReader(tmp_path)
    reader.get(samples[0][0])
    clone = pickle.loads(pickle.dumps(reader))
    assert torch.equal(clone.get(samples[1][0]).topk_ids, reader.get(samples[1][0]).topk_ids)



# -- per-row log-normalizers (exact tempering) ---------------------------------------------------

TEMPERATURES = (0.5, 1.0, 2.0)
SCALES = (2.0, 1.0, 0.5)  # capture temperature 1 / each temperature, in column order


def tempered_tail(logprobs: np.ndarray, logz: np.ndarray, scales) -> np.ndarray:
    """(n, T) 1 - sum_k p_s(k): the teacher mass outside the top-k at each scale (float64)."""
    logprobs, logz = logprobs.astype(np.float64), logz.astype(np.float64)
    return np.stack([1 - np.exp(s * logprobs - logz[:, [j]]).sum(1) for j, s in enumerate(scales)], 1)


def test_codecs_keep_the_log_normalizers_and_the_exact_tempered_tail():
    rng = np.random.default_rng(21)
    sample = make_sample(rng, 150, scales=SCALES)
    raw = RawCodec().decode(RawCodec().encode(sample), 150, K, SCALES)
    assert raw.logz.dtype == np.float32 and raw.logz.tobytes() == sample.logz.tobytes()
    np.testing.assert_allclose(sample.logz[:, 1], 0.0, atol=1e-5)  # log Z_1 = log sum p = 0
    exact = tempered_tail(sample.topk_logprobs, sample.logz, SCALES)
    assert exact[:, 0].mean() < 0.1 < exact[:, 2].mean()  # tempering moves real mass in and out
    codec = LogQuantZstdCodec()
    decoded = codec.decode(codec.encode(sample), 150, K, SCALES)
    got = tempered_tail(decoded.topk_logprobs, decoded.logz, SCALES)
    # float16 of the tempered top-k log-mass: relative precision on the tail too.
    np.testing.assert_allclose(got, exact, rtol=3e-3, atol=1e-7)
    with pytest.raises(ValueError, match="frames left over"):
        codec.decode(codec.encode(sample), 150, K, SCALES[:2])
    with pytest.raises(ValueError, match=r"logz must be \(n=3, one column per temperature = 2\)"):
        TopKArrays.from_any(np.arange(3), sample.topk_ids[:3], sample.topk_logprobs[:3],
                            sample.target_logprobs[:3], np.zeros((3, 3)), (2.0, 0.5))


@pytest.mark.parametrize("codec", [RawCodec(), LogQuantZstdCodec()], ids=lambda c: c.name)
def test_artifact_stores_log_normalizers_at_the_manifest_temperatures(tmp_path, codec):
    rng = np.random.default_rng(22)
    samples = [(f"s{index}", make_sample(rng, 10 + index, scales=SCALES)) for index in range(5)]
    with TopKShardWriter(tmp_path, source(logz_temperatures=[2.0, 0.5]), codec, shard_tokens=30) as writer:
        for sample_id, sample in samples:
            writer.add(sample_id, sample.positions, sample.topk_ids, sample.topk_logprobs, sample.target_logprobs,
                       sample.logz)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["logz_temperatures"] == [0.5, 1.0, 2.0]  # sorted, the capture temperature added
    reader = TopKReader(tmp_path)
    assert reader.manifest.source.logz_scales == SCALES
    batch = reader.get_many(["s3", "s1"])
    expected = np.concatenate([samples[3][1].logz, samples[1][1].logz])
    assert batch.logz.shape == (expected.shape[0], 3) and batch[1].logz.shape == (11, 3)
    atol = 0 if codec.name == "raw" else 0.05  # logquant: log Z follows its decoded entries
    np.testing.assert_allclose(batch.logz.numpy(), expected, rtol=0, atol=atol)
    got = tempered_tail(batch.topk_logprobs.numpy(), batch.logz.numpy(), SCALES)
    want = np.concatenate([tempered_tail(s.topk_logprobs, s.logz, SCALES) for s in (samples[3][1], samples[1][1])])
    np.testing.assert_allclose(got, want, rtol=3e-3, atol=1e-7)


def test_writer_needs_the_log_normalizers_it_was_configured_for(tmp_path):
    sample = make_sample(np.random.default_rng(23), 4, scales=SCALES)
    with TopKShardWriter(tmp_path, source(logz_temperatures=TEMPERATURES), RawCodec()) as writer:
        with pytest.raises(ValueError, match=r"sample a: logz is missing: the artifact stores log-normalizers at "
                                             r"temperatures \[0.5, 1.0, 2.0\]"):
            writer.add("a", sample.positions, sample.topk_ids, sample.topk_logprobs, sample.target_logprobs)
        with pytest.raises(ValueError, match="sample b: logz must be"):
            writer.add("b", sample.positions, sample.topk_ids, sample.topk_logprobs, sample.target_logprobs,
                       sample.logz[:, :2])


def test_logz_column_for_a_training_temperature_or_a_message_naming_the_held_ones():
    held = source(logz_temperatures=TEMPERATURES, capture_temperature=1.0)
    assert [held.logz_column(scale) for scale in (2.0, 1.0, 0.5)] == [0, 1, 2]
    with pytest.raises(ManifestMismatchError, match=r"tempers the teacher to temperature 1.42857 .*"
                                                    r"only at temperatures \[0.5, 1.0, 2.0\].*re-extract"):
        held.logz_column(0.7)
    warm = source(capture_temperature=2.0)  # no list: only the capture temperature
    assert warm.logz_temperatures == (2.0,) and warm.logz_column(1.0) == 0


def test_schema_version_1_artifact_is_refused_with_a_re_extract_message(tmp_path):
    write(tmp_path, make_samples(3))
    path = tmp_path / "manifest.json"
    old = json.loads(path.read_text())
    old.pop("logz_temperatures")
    path.write_text(json.dumps(old | {"schema_version": 1}))
    with pytest.raises(ManifestMismatchError, match=r"unsupported schema_version 1 .*no per-row teacher "
                                                    r"log-normalizers.*re-extract: `kedro run --pipelines teacher_logits`"):
        TopKReader(tmp_path)


# --- variable rows: top_p and sampled ---------------------------------------------------------

def variable_samples(mode: str, count: int = 6, seed: int = 4) -> list[tuple[str, TopKArrays]]:
    """Top-K rows cut to random lengths (`top_p`), with random draw counts too (`sampled`)."""
    rng = np.random.default_rng(seed)
    out = []
    for sample_id, sample in make_samples(count, seed=seed):
        n = sample.num_positions
        lengths = rng.integers(1, K + 1, n)
        counts = rng.integers(1, 9, (n, K)) if mode == "sampled" else None
        out.append((sample_id, TopKArrays.from_any(sample.positions, sample.topk_ids, sample.topk_logprobs,
                                                   sample.target_logprobs, None, (), lengths, counts)))
    return out


@pytest.mark.parametrize("codec", [RawCodec(), LogQuantZstdCodec()], ids=["raw", "logquant"])
@pytest.mark.parametrize("mode", ["top_p", "sampled"])
def test_variable_rows_round_trip_through_the_codec_and_the_store(tmp_path, mode, codec):
    samples = variable_samples(mode)
    params = {"p": 0.9} if mode == "top_p" else {"draws": 8, "proposal_temperature": 1.0, "seed": 0}
    with TopKShardWriter(tmp_path, source(capture_mode=mode, capture_params=params), codec,
                         shard_tokens=60, samples_per_row_group=2) as writer:
        for sample_id, sample in samples:
            writer.add(sample_id, sample.positions, sample.topk_ids, sample.topk_logprobs, sample.target_logprobs,
                       None, sample.row_lengths, sample.counts)
    reader = TopKReader(tmp_path)
    manifest = reader.manifest
    assert (reader.mode, manifest.source.capture_params) == (mode, params)
    assert sum(shard.entries for shard in manifest.shards) == sum(int(s.row_lengths.sum()) for _, s in samples)
    batch = reader.get_many([sample_id for sample_id, _ in samples])
    for (_, expected), got in zip(samples, batch):
        lengths = got.row_lengths.numpy()
        np.testing.assert_array_equal(lengths, expected.row_lengths)
        assert (got.counts is None) == (mode == "top_p")
        for row, length in enumerate(lengths):
            ids, logprobs = got.topk_ids[row].numpy(), got.topk_logprobs[row].numpy()
            want = dict(zip(expected.topk_ids[row, :length], expected.topk_logprobs[row, :length]))
            assert set(ids[:length]) == set(want)  # the stored entries, exactly as a set
            assert (ids[length:] == ids[0]).all() and np.isneginf(logprobs[length:]).all()  # the padding
            error = np.abs(logprobs[:length] - np.array([want[i] for i in ids[:length]]))
            assert error.max() <= (0 if codec.name == "raw" else 0.6), error.max()
            if mode == "sampled":
                want_counts = dict(zip(expected.topk_ids[row, :length], expected.counts[row, :length]))
                counts = got.counts[row].numpy()
                assert [want_counts[i] for i in ids[:length]] == counts[:length].tolist()
                assert (counts[length:] == 0).all()
    # No padding on disk: raw stores 4 + 4 (+ 4) bytes per entry, logquant less than the full rows.
    for (_, sample), (_, full) in zip(samples, make_samples(6, seed=4)):
        payload = codec.encode(sample)
        if codec.name == "raw":
            entries = int(sample.row_lengths.sum())
            assert (len(payload["topk_ids"]), len(payload["topk_logprobs"])) == (4 * entries, 4 * entries)
            assert len(payload["row_lengths"]) == 2 * sample.num_positions
            assert len(payload.get("counts", b"")) == (4 * entries if mode == "sampled" else 0)
        elif sample.row_lengths.sum() < 0.7 * full.topk_ids.size:
            assert len(payload["payload"]) < len(codec.encode(full)["payload"])


def test_entries_per_trained_token_of_each_mode(tmp_path):
    from kd_pipeline.core.extraction.report import artifact_report, entries_per_token

    samples = variable_samples("top_p")
    with TopKShardWriter(tmp_path / "top_p", source(capture_mode="top_p", capture_params={"p": 0.9}), RawCodec(),
                         shard_tokens=60) as writer:
        for sample_id, sample in samples:
            writer.add(sample_id, sample.positions, sample.topk_ids, sample.topk_logprobs, sample.target_logprobs,
                       None, sample.row_lengths)
    lengths = np.concatenate([sample.row_lengths for _, sample in samples])
    expected = round(float(lengths.mean()), 3)
    assert artifact_report(tmp_path / "top_p")["entries_per_trained_token"] == expected < K
    write(tmp_path / "topk", make_samples(3))
    manifest = Manifest.read(tmp_path / "topk" / "manifest.json")
    assert entries_per_token(manifest) == float(K)
    # Schema 2 shards do not count their entries: a topk artifact still holds k per row.
    old = dataclasses.replace(manifest, shards=tuple(dataclasses.replace(s, entries=None) for s in manifest.shards))
    assert entries_per_token(old) == float(K)
    assert entries_per_token(manifest.with_shards(())) is None


def test_rows_of_another_mode_are_refused_by_name(tmp_path):
    sample = variable_samples("top_p", count=1)[0][1]
    with TopKShardWriter(tmp_path, source(), RawCodec()) as writer:
        with pytest.raises(ValueError, match="rows laid out for capture mode 'top_p'.*the artifact's is 'topk'"):
            writer.add("a" * 32, sample.positions, sample.topk_ids, sample.topk_logprobs, sample.target_logprobs,
                       None, sample.row_lengths)
    with pytest.raises(ValueError, match="capture_mode must be one of"):
        source(capture_mode="top_k")


def test_variable_rows_beyond_what_the_raw_columns_hold_are_refused_by_row():
    k = 1 << 16  # the raw codec's row_lengths column is uint16
    ids, logprobs = np.arange(k)[None], -np.linspace(0.1, 30, k, dtype=np.float32)[None]
    wide = TopKArrays.from_any(np.array([3]), ids, logprobs, np.array([-0.1], np.float32), None, (), np.array([k]))
    with pytest.raises(ValueError, match="raw codec: row 0 has 65536 entries, but row_lengths are stored as uint16"):
        RawCodec().encode(wide)
    narrow = TopKArrays.from_any(np.array([3]), ids[:, :k - 1], logprobs[:, :k - 1], np.array([-0.1], np.float32),
                                 None, (), np.array([k - 1]))
    assert RawCodec().decode(RawCodec().encode(narrow), 1, k - 1, mode="top_p").row_lengths.tolist() == [k - 1]
    args = (np.array([3, 5]), ids[:, :4].repeat(2, 0), logprobs[:, :4].repeat(2, 0), np.zeros(2, np.float32), None,
            (), np.array([4, 2]))
    counts = np.ones((2, 4), np.int64)
    counts[1, 3] = 0  # padding: any count
    TopKArrays.from_any(*args, counts)
    counts[0, 2] = 2**31
    with pytest.raises(ValueError, match="counts must be below 2\\*\\*31: row 0 slot 2 holds 2147483648"):
        TopKArrays.from_any(*args, counts)
    counts[0, 2], counts[1, 1] = 1, 0
    with pytest.raises(ValueError, match="counts must be >= 1 on every stored entry: row 1 slot 1 holds 0"):
        TopKArrays.from_any(*args, counts)


def test_padding_slots_are_what_pad_rows_writes():
    from kd_pipeline.core.topk_store.codec import pad_rows, padding_slots

    rng = np.random.default_rng(3)
    ids = np.stack([rng.permutation(50)[:6] for _ in range(5)]).astype(np.int64)
    logprobs = -rng.random((5, 6)).cumsum(1).astype(np.float32)
    lengths = np.array([1, 6, 3, 2, 5])
    pad_rows(ids, logprobs, lengths)
    expected = np.arange(6)[None, :] >= lengths[:, None]
    got = padding_slots(torch.from_numpy(ids), torch.from_numpy(logprobs))
    np.testing.assert_array_equal(got.numpy(), expected)
    # A repeat with a finite log-prob is no padding; nor is the first of equal ids, even at -inf.
    ids = torch.tensor([[7, 3, 7, 7], [4, 4, 9, 4]])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -math.inf], [-math.inf, -math.inf, -1.0, -2.0]])
    assert padding_slots(ids, logprobs).tolist() == [[False, False, False, True], [False, True, False, False]]


def test_capture_params_a_mode_needs_are_checked_naming_the_key_and_the_manifest(tmp_path):
    with pytest.raises(ValueError, match=r"capture_params of a 'sampled' artifact has no 'proposal_temperature' "
                                         r"\(it holds \['draws'\]"):
        source(capture_mode="sampled", capture_params={"draws": 8})
    with pytest.raises(ValueError, match=r"capture_params\['p'\] of a 'top_p' artifact must be a number > 0, "
                                         "got None"):
        source(capture_mode="top_p", capture_params={"p": None})
    params = {"draws": 8, "proposal_temperature": 1.0, "seed": 0}
    manifest = Manifest.create(source(capture_mode="sampled", capture_params=params), "raw", {}, shard_tokens=10,
                               samples_per_row_group=1, world_size=1)
    data = manifest.to_dict()
    del data["capture_params"]["draws"]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TopKStoreError, match=f"{re.escape(str(path))}: .*capture_params of a 'sampled' artifact "
                                             "has no 'draws'"):
        Manifest.read(path)


def test_schema_version_2_artifact_is_read_as_topk(tmp_path):
    write(tmp_path, make_samples(4))
    path = tmp_path / "manifest.json"
    old = json.loads(path.read_text())
    for name in ("capture_mode", "capture_params"):
        del old[name]
    for shard in old["shards"]:
        del shard["entries"]
    path.write_text(json.dumps(old | {"schema_version": 2}))
    reader = TopKReader(tmp_path)
    assert (reader.mode, reader.manifest.schema_version, reader.manifest.shards[0].entries) == ("topk", 3, None)
    first_id, first = make_samples(4)[0]
    np.testing.assert_array_equal(reader.get(first_id).topk_ids.numpy(), first.topk_ids)
