"""Teacher top-k extraction: the j -> j+1 alignment against a naive forward, trained positions
only, resume after SIGKILL (byte-identical shards), corruption detection and repair, 2-process
(torchrun, gloo) equality with one process, and refusal of a mismatched teacher."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_pipeline.core.atomic import sha256_file
from kd_pipeline.core.corpus import CorpusConfig, TokenizedCorpus, build_corpus
from kd_pipeline.core.corpus_sources import source_rows
from kd_pipeline.core.extraction.compat import TeacherCorpusMismatchError
from kd_pipeline.core.extraction.config import ExtractionConfig
from kd_pipeline.core.extraction.head import TopKHead, check_head_path, teacher_rows
from kd_pipeline.core.extraction.plan import make_batch, plan_batches, rank_share
from kd_pipeline.core.extraction.report import last_runs
from kd_pipeline.core.extraction.run import extract_teacher_topk
from kd_pipeline.core.models.identity import tokenizer_hash
from kd_pipeline.core.models.loading import load_causal_lm, load_tokenizer
from kd_pipeline.core.models.teacher import TeacherSource, prepare_teacher
from kd_pipeline.core.tiny import TINY_HEAD_FAMILIES, tiny_family_lm
from kd_pipeline.core.topk_store import MANIFEST_NAME, Manifest, ShardCorruptError, TopKReader

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TINY_TOKENIZER_DIR = PROJECT_ROOT / "tests" / "fixtures" / "tiny_tokenizer"
K = 8
# Small shards so that a run writes many of them (resume and repair have something to do).
PARAMS = {"k": K, "codec": "raw", "shard_trained_tokens": 300, "batch_tokens": 768, "max_batch_size": 8,
          "device": "cpu", "progress": False}


def _env() -> dict:
    env = dict(os.environ)
    # One thread everywhere: the in-process reference, the killed/resumed CLI runs and each
    # torchrun rank then run the same kernels, so equal inputs give bit-equal outputs.
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT / "src"), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _cli(teacher: Path, corpus: Path, out: Path, params: dict = PARAMS) -> list[str]:
    return ["-m", "kd_pipeline.core.extraction", "--teacher", str(teacher), "--corpus", str(corpus),
            "--out", str(out), "--params", json.dumps(params)]


def _recorded_shards(directory: Path) -> list:
    try:
        return json.loads((directory / "manifest-r00.partial.json").read_text())["shards"]
    except (OSError, ValueError, KeyError):
        return []


def _shard_hashes(directory: Path) -> dict[str, str]:
    return {path.name: sha256_file(path) for path in sorted(directory.glob("shard-*.parquet"))}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    prepare_teacher(TeacherSource(kind="random_init", tokenizer_path=str(TINY_TOKENIZER_DIR), seed=0), out)
    return out


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, teacher_dir) -> Path:
    tokenizer = load_tokenizer(teacher_dir)
    rows = source_rows({"kind": "kjv_chat", "num_passages": 40, "verses_per_passage": 3, "prompt_verses": 1, "seed": 0})
    corpus = build_corpus(rows, tokenizer, tokenizer_hash(tokenizer),
                          CorpusConfig(max_length=160, validation_fraction=0.25))
    out = tmp_path_factory.mktemp("corpus") / "corpus"
    corpus.save(out)
    return out


def _extract_single_thread(teacher_dir: Path, corpus_dir: Path, out: Path) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return extract_teacher_topk(teacher_dir, corpus_dir, out, ExtractionConfig.from_params(PARAMS))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_dir, corpus_dir) -> Path:
    """An uninterrupted single-process extraction (raw codec, one thread)."""
    out = tmp_path_factory.mktemp("reference") / "topk"
    _extract_single_thread(teacher_dir, corpus_dir, out)
    return out


def _all_samples(reader: TopKReader) -> dict[str, dict]:
    batch = reader.get_many(reader.sample_ids())
    return {sample.sample_id: {name: getattr(sample, name).numpy().copy()
                               for name in ("positions", "topk_ids", "topk_logprobs", "target_logprobs", "logz")}
            for sample in batch}


# ---------------------------------------------------------------------------------------------


def test_rows_describe_the_next_token_like_a_naive_full_forward(teacher_dir, corpus_dir, reference):
    """Row i of a sample = teacher distribution at position p_i for token input_ids[p_i + 1],
    compared with log_softmax of a float64 full forward of the same model."""
    corpus = TokenizedCorpus.load(corpus_dir)
    model = load_causal_lm(teacher_dir).double()
    stored = _all_samples(TopKReader(reference))
    checked = 0
    for record in corpus.samples.to_pylist()[:12]:
        ids = torch.tensor(record["input_ids"])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids[None]).logits[0], dim=-1)  # [T, V] float64
        rows = stored[record["sample_id"]]
        positions = rows["positions"].astype(np.int64)
        reference_rows = logprobs[positions]
        # Values at the stored ids, the top-k set (up to float ties) and the target log-prob.
        at_ids = reference_rows.gather(1, torch.from_numpy(rows["topk_ids"]).long())
        np.testing.assert_allclose(rows["topk_logprobs"], at_ids.numpy(), atol=2e-5, rtol=0)
        top = reference_rows.topk(K + 1, dim=-1)
        np.testing.assert_allclose(rows["topk_logprobs"], top.values[:, :K].numpy(), atol=2e-5, rtol=0)
        clear = (top.values[:, K - 1] - top.values[:, K]) > 1e-4  # no near-tie at the k-th place
        assert np.array_equal(np.sort(rows["topk_ids"][clear.numpy()], axis=1),
                              np.sort(top.indices[clear, :K].numpy(), axis=1))
        targets = reference_rows.gather(1, ids[positions + 1][:, None]).squeeze(1)
        np.testing.assert_allclose(rows["target_logprobs"], targets.numpy(), atol=2e-5, rtol=0)
        # Log-normalizers at the default temperatures 0.5, 1, 2: log sum_v p(v)**s, s = 1/t.
        expected_logz = torch.stack([(s * reference_rows).logsumexp(-1) for s in (2.0, 1.0, 0.5)], -1)
        np.testing.assert_allclose(rows["logz"], expected_logz.numpy(), atol=2e-5, rtol=0)
        assert np.abs(rows["logz"][:, 0]).max() > 0.1  # tempering by 2 moves real mass
        # The same comparison one position off must fail: the test would catch a j -> j shift.
        shifted = logprobs[positions + 1].gather(1, ids[positions + 1][:, None]).squeeze(1) if positions[-1] + 1 < len(ids) else None
        if shifted is not None:
            assert not np.allclose(rows["target_logprobs"], shifted.numpy(), atol=1e-3)
        checked += len(positions)
    assert checked > 100


def test_only_trained_positions_of_every_sample_are_stored(corpus_dir, reference):
    corpus = TokenizedCorpus.load(corpus_dir)
    reader = TopKReader(reference)
    assert sorted(reader.sample_ids()) == sorted(corpus.samples["sample_id"].to_pylist())
    assert set(corpus.samples["split"].to_pylist()) == {"train", "validation"}
    for record in corpus.samples.to_pylist():
        expected = np.flatnonzero(np.asarray(record["loss_mask"])) - 1
        assert np.array_equal(reader.get(record["sample_id"]).positions.numpy(), expected)
        prompt_positions = set(range(record["length"])) - set(expected.tolist())
        assert prompt_positions  # chat samples have a prompt that must not be stored
    manifest = reader.manifest
    assert manifest.num_trained_tokens == sum(corpus.samples["num_trained"].to_pylist())
    source = manifest.source
    assert (source.k, source.capture_dtype, source.capture_temperature, source.vocab_size) == (K, "float32", 1.0, 512)
    assert source.corpus_fingerprint == corpus.fingerprint
    assert source.tokenizer_sha256 == corpus.meta["tokenizer_hash"]
    coverage = manifest.topk_coverage()
    assert sum(coverage["histogram"]) == manifest.num_trained_tokens and 0 < coverage["mean"] <= 1
    latest, measured = last_runs(reference)
    assert latest == measured and latest["trained_tokens"] == manifest.num_trained_tokens
    assert latest["tokens_per_second"] > 0


def test_batch_plan_is_length_sorted_and_rank_shares_partition_it():
    lengths = [5, 3, 9, 3, 7, 12, 1]
    ids = [f"s{i}" for i in range(len(lengths))]
    plan = plan_batches(lengths, ids, batch_tokens=16, max_batch_size=3)
    order = [row for batch in plan for row in batch.rows]
    assert [(lengths[r], ids[r]) for r in order] == sorted(zip(lengths, ids))
    assert all(len(b.rows) * b.padded_length <= 16 or len(b.rows) == 1 for b in plan)
    shares = [rank_share(plan, rank, 3) for rank in range(3)]
    assert sorted(b.index for share in shares for b in share) == list(range(len(plan)))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="teacher_logits.k"):
        ExtractionConfig(k=0)
    with pytest.raises(ValueError, match="teacher_logits.dtype"):
        ExtractionConfig(dtype="float8")
    with pytest.raises(ValueError, match="temperature"):
        ExtractionConfig(temperature=0)
    with pytest.raises(ValueError, match="codec"):
        ExtractionConfig(codec="nope")
    with pytest.raises(ValueError, match=r"teacher_logits: unknown key\(s\)"):
        ExtractionConfig.from_params({"topk": 3})
    assert ExtractionConfig(codec="compact").codec == "logquant_zstd"


@pytest.mark.slow  # multi-process (subprocesses / torchrun)
def test_resume_after_sigkill_gives_byte_identical_shards(tmp_path, teacher_dir, corpus_dir, reference):
    out = tmp_path / "topk"
    process = subprocess.Popen([sys.executable, *_cli(teacher_dir, corpus_dir, out)], env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        # Kill once the first shard is finished and recorded in the rank's progress file.
        while not _recorded_shards(out) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.002)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    killed_with = _shard_hashes(out)
    assert killed_with, "no shard was written before the kill"
    assert not (out / MANIFEST_NAME).exists(), "the run finished before it could be killed"
    expected = _shard_hashes(reference)
    assert len(killed_with) < len(expected)

    # Re-run (in this process, one thread like the killed one).
    run = _extract_single_thread(teacher_dir, corpus_dir, out)["run"]
    assert run["samples_skipped_done"] > 0 and not run["restarted"]  # it resumed rather than starting over
    assert _shard_hashes(out) == expected
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert Manifest.read(out / MANIFEST_NAME).shards == Manifest.read(reference / MANIFEST_NAME).shards


def test_corrupt_shards_are_detected_by_name_and_a_rerun_repairs_them(tmp_path, teacher_dir, corpus_dir, reference):
    import shutil

    out = tmp_path / "topk"
    shutil.copytree(reference, out)
    expected = _shard_hashes(reference)
    names = sorted(expected)
    truncated, altered = out / names[1], out / names[-1]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(altered.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    altered.write_bytes(bytes(data))

    with pytest.raises(ShardCorruptError, match=names[1]):
        TopKReader(out)  # wrong size: refused at open, naming the shard
    truncated.write_bytes((reference / names[1]).read_bytes())
    with pytest.raises(ShardCorruptError, match=names[-1]):
        TopKReader(out)  # same size, other bytes: refused at open too (small artifact: verify=full)
    reader = TopKReader(out, verify="lazy")
    assert reader.verify() == [names[-1]]
    in_altered = _ids_of(reference / names[-1])
    with pytest.raises(ShardCorruptError, match=names[-1]):
        reader.get(in_altered[0])
    truncated.write_bytes(truncated.read_bytes()[:-100])  # both bad again, then repair

    result = _extract_single_thread(teacher_dir, corpus_dir, out)
    assert sorted(result["run"]["repaired_shards"]) == sorted([names[1], names[-1]])
    assert _shard_hashes(out) == expected
    assert TopKReader(out).verify() == []
    # Only the repaired shards' samples were recomputed.
    assert result["samples"] == sum(len(_ids_of(reference / name)) for name in (names[1], names[-1]))


def _ids_of(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["sample_id"])["sample_id"].to_pylist()


@pytest.mark.slow  # multi-process (subprocesses / torchrun)
def test_two_processes_under_torchrun_equal_one_process(tmp_path, teacher_dir, corpus_dir, reference):
    out = tmp_path / "topk"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               *_cli(teacher_dir, corpus_dir, out)]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = Manifest.read(out / MANIFEST_NAME)
    assert manifest.world_size == 2 and {shard.rank for shard in manifest.shards} == {0, 1}
    single, double = _all_samples(TopKReader(reference)), _all_samples(TopKReader(out))
    assert sorted(single) == sorted(double)
    for sample_id, arrays in single.items():
        for name, value in arrays.items():
            assert np.array_equal(value, double[sample_id][name]), (sample_id, name)
    assert manifest.num_trained_tokens == Manifest.read(reference / MANIFEST_NAME).num_trained_tokens


def test_refuses_a_teacher_that_does_not_match_the_corpus(tmp_path, teacher_dir, corpus_dir):
    corpus = TokenizedCorpus.load(corpus_dir)
    wrong_vocab = dataclasses.replace(corpus, meta={**corpus.meta, "vocab_size": 600})
    with pytest.raises(TeacherCorpusMismatchError, match="'vocab_size'") as error:
        extract_teacher_topk(teacher_dir, wrong_vocab, tmp_path / "a", ExtractionConfig.from_params(PARAMS))
    assert error.value.field_name == "vocab_size" and "600" in str(error.value)
    wrong_tokenizer = dataclasses.replace(corpus, meta={**corpus.meta, "tokenizer_hash": "0" * 64})
    with pytest.raises(TeacherCorpusMismatchError, match="'tokenizer_hash'"):
        extract_teacher_topk(teacher_dir, wrong_tokenizer, tmp_path / "b", ExtractionConfig.from_params(PARAMS))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_a_second_extraction_into_a_locked_artifact_folder_is_refused_untouched(tmp_path, teacher_dir, corpus_dir,
                                                                                reference):
    import shutil

    from kd_pipeline.core.locking import FolderLockedError

    out = tmp_path / "topk"
    shutil.copytree(reference, out)
    (out / "shard-r00-00000.parquet.tmp-99999").write_bytes(b"the other run's shard in progress")
    before = {path.name: sha256_file(path) for path in out.iterdir()}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom kd_pipeline.core.locking import FolderLock\n"
         "lock = FolderLock(sys.argv[1], purpose='teacher_logits extraction, 1 rank(s)').acquire()\n"
         "print('locked', flush=True)\ntime.sleep(120)\n", str(out)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLockedError) as caught:
            _extract_single_thread(teacher_dir, corpus_dir, out)
        assert str(caught.value).startswith(f"{out} is locked by process {holder.pid} (teacher_logits extraction, "
                                            "1 rank(s), since ")
        assert {path.name: sha256_file(path) for path in out.iterdir()} == before  # nothing deleted or rewritten
    finally:
        holder.kill()
        holder.wait(timeout=30)


# ---------------------------------------------------------------------------------------------
# A teacher split across devices (accelerate big-model inference): cpu + disk offload on CPU


@pytest.mark.parametrize("split", [
    # An explicit map: layers 1-2 and the final norm offloaded to disk (read from the safetensors
    # file as they run), the rest, tied embeddings and head included, on the CPU.
    {"device_map": {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                    "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "disk",
                    "model.rotary_emb": "cpu", "lm_head": "cpu"}},
    # `auto` with a CPU budget of a few layers' bytes: accelerate puts the rest, head included, on disk.
    {"device_map": "auto", "max_memory": {"cpu": "60KB"}},
], ids=["explicit", "auto_max_memory"])
def test_teacher_split_across_cpu_and_disk_stores_byte_identical_rows(tmp_path, teacher_dir, corpus_dir,
                                                                      reference, split):
    from kd_pipeline.core.extraction.run import load_teacher_for_extraction

    config = ExtractionConfig.from_params({**PARAMS, **split, "offload_folder": str(tmp_path / "offload")})
    model, _, _, _ = load_teacher_for_extraction(teacher_dir, config)
    placed = set(model.hf_device_map.values())
    assert "disk" in placed, model.hf_device_map  # really split, not loaded whole
    del model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract_teacher_topk(teacher_dir, corpus_dir, tmp_path / "topk", config)
    finally:
        torch.set_num_threads(threads)
    expected, got = _all_samples(TopKReader(reference)), _all_samples(TopKReader(tmp_path / "topk"))
    assert got.keys() == expected.keys()
    for sample_id, arrays in expected.items():
        for name, value in arrays.items():
            assert got[sample_id][name].tobytes() == value.tobytes(), (sample_id, name)


def test_device_map_settings_are_checked_by_name():
    with pytest.raises(ValueError, match=r"teacher_logits.device_map must be one of"):
        ExtractionConfig.from_params({**PARAMS, "device_map": "everywhere"})
    with pytest.raises(ValueError, match=r"teacher_logits.device_map\['lm_head'\] must be a GPU index"):
        ExtractionConfig.from_params({**PARAMS, "device_map": {"lm_head": "tpu"}})
    with pytest.raises(ValueError, match="teacher_logits.max_memory needs device_map"):
        ExtractionConfig.from_params({**PARAMS, "max_memory": {"cpu": "1GiB"}})
    with pytest.raises(ValueError, match="teacher_logits.max_memory key 'disk'"):
        ExtractionConfig.from_params({**PARAMS, "device_map": "auto", "max_memory": {"disk": "1GiB"}})


def test_each_rank_of_a_node_gets_its_group_of_gpus():
    from kd_pipeline.core.models.device_map import rank_max_memory, split_loading_kwargs

    eighty = 80 * 2**30
    # 2 ranks per node, 8 GPUs: rank 1 loads its copy on GPUs 4-7 only.
    assert rank_max_memory(1, 2, [eighty] * 8) == {0: 0, 1: 0, 2: 0, 3: 0, 4: eighty, 5: eighty, 6: eighty, 7: eighty}
    assert rank_max_memory(0, 1, [eighty] * 8) is None  # one rank per node: all of them
    with pytest.raises(ValueError, match="8 GPUs cannot be split evenly over 3 ranks"):
        rank_max_memory(0, 3, [eighty] * 8)
    # YAML spellings become accelerate's: GPU indices as ints, cpu / disk as they are.
    assert split_loading_kwargs({"model.layers.0": "cuda:1", "lm_head": "0", "model.norm": "disk"},
                                {"0": "70GiB", "cpu": "200GiB"}) == {
        "device_map": {"model.layers.0": 1, "lm_head": 0, "model.norm": "disk"},
        "max_memory": {0: "70GiB", "cpu": "200GiB"}}


def test_bf16_teacher_head_runs_in_float32(teacher_dir):
    """A bf16 teacher's decoder runs in bf16, its LM head on a float32 copy: the rows equal a
    float64 log-softmax of the same hidden rows and (bf16) weights, to float32 precision; logits
    rounded to bf16 would be off by up to ~0.06 at the logit sizes used here."""
    from kd_pipeline.core.extraction.head import TopKHead

    model = load_causal_lm(teacher_dir, dtype=torch.bfloat16)
    head = TopKHead(model, K)
    assert head._head_parameters()[0].dtype == torch.float32 and model.lm_head.weight.dtype == torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    hidden = (torch.randn(40, head.weight.shape[1], generator=generator) * 30).bfloat16()  # logits of ~10-30
    labels = torch.randint(0, head.vocab_size, (40,), generator=generator)
    rows = head(hidden, labels)
    reference = torch.log_softmax(hidden.double() @ model.lm_head.weight.double().t(), dim=-1)
    assert float(reference.max(dim=-1).values.sub(reference.min(dim=-1).values).min()) > 5
    torch.testing.assert_close(rows.topk_logprobs.double(), reference.gather(1, rows.topk_ids.long()), rtol=0, atol=1e-4)
    torch.testing.assert_close(rows.topk_logprobs[:, 0].double(), reference.max(dim=-1).values, rtol=0, atol=1e-4)
    torch.testing.assert_close(rows.target_logprobs.double(), reference.gather(1, labels[:, None]).squeeze(1),
                               rtol=0, atol=1e-4)
    # The once-per-run check compares with the model's own (bf16) logits at the bf16 tolerance.
    from kd_pipeline.core.extraction.head import check_head_path

    assert check_head_path(model, head, np.arange(3, 27), torch.device("cpu")) <= 0.25
    rounded = TopKHead(model, K, fp32_logits=False)(hidden, labels)
    assert float((rounded.topk_logprobs.double() - reference.gather(1, rounded.topk_ids.long())).abs().max()) > 1e-3


# ---------------------------------------------------------------------------------------------
# Model families whose head is not a plain linear layer


@pytest.mark.parametrize("family", sorted(TINY_HEAD_FAMILIES))
def test_head_rows_equal_the_models_own_logits_for_each_family(family):
    """Gemma 2 soft-cap, Cohere logit_scale, Granite logits_scaling, a Qwen2 head padded past the
    tokenizer: the trained-row head equals `log_softmax(model(...).logits)` in float64 (padded
    rows excluded: they never get mass), log-normalizers included."""
    model, num_tokens = tiny_family_lm(family)
    ids = np.random.default_rng(1).integers(3, num_tokens, size=20)
    mask = np.ones(20, dtype=np.int8)
    mask[:4] = 0
    batch = make_batch([ids], [mask])
    head = TopKHead(model, 8, logz_scales=(2.0, 1.0, 0.5), chunk_rows=5, num_tokens=num_tokens)
    rows = teacher_rows(model, head, batch, torch.device("cpu"))
    check_head_path(model, head, ids, torch.device("cpu"))  # the run's own check agrees

    with torch.no_grad():
        logits = copy.deepcopy(model).double()(input_ids=torch.from_numpy(ids)[None]).logits[0]
    positions = torch.from_numpy(batch.positions[0].astype(np.int64))
    reference = torch.log_softmax(logits[positions, :num_tokens], dim=-1)
    assert int(rows.topk_ids.max()) < num_tokens
    top = reference.topk(8, dim=-1)
    torch.testing.assert_close(rows.topk_logprobs.double(), top.values, rtol=0, atol=1e-4)
    torch.testing.assert_close(rows.target_logprobs.double(),
                               reference.gather(1, batch.labels[:, None]).squeeze(1), rtol=0, atol=1e-4)
    expected_logz = torch.stack([(s * reference).logsumexp(-1) for s in (2.0, 1.0, 0.5)], -1)
    torch.testing.assert_close(rows.logz.double(), expected_logz, rtol=0, atol=1e-4)
    # The transform matters here: the bare head's log-softmax is far from the model's.
    bare = torch.log_softmax(logits.new_tensor(0) + (model.get_output_embeddings().weight.double()
                             @ model.model(input_ids=torch.from_numpy(ids)[None]).last_hidden_state[0, positions]
                             .double().t()).t(), dim=-1)
    assert (bare.max(-1).values - reference.max(-1).values).abs().max() > 0.05


# --- capture modes: top_p and sampled ---------------------------------------------------------

# A capture temperature of 0.05 makes the random tiny teacher peaked enough for rows of every length.
CAPTURE_PARAMS = {**PARAMS, "temperature": 0.05, "logz_temperatures": [0.05, 0.1], "k": 16}


def _extract(teacher_dir: Path, corpus_dir: Path, out: Path, capture: dict) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return extract_teacher_topk(teacher_dir, corpus_dir, out,
                                    ExtractionConfig.from_params({**CAPTURE_PARAMS, "capture": capture}))
    finally:
        torch.set_num_threads(threads)


def _reference_rows(model, record, positions, temperature):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(record["input_ids"])[None]).logits[0]
    return torch.log_softmax(logits / temperature, dim=-1)[torch.from_numpy(positions)]  # [n, V] float64


def test_top_p_rows_are_the_smallest_top_set_reaching_p(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "top_p"
    _extract(teacher_dir, corpus_dir, out, {"mode": "top_p", "p": 0.95})
    reader = TopKReader(out)
    assert (reader.mode, reader.manifest.source.capture_params, reader.k) == ("top_p", {"p": 0.95, "k_max": 16}, 16)
    model = load_causal_lm(teacher_dir).double()
    corpus = TokenizedCorpus.load(corpus_dir)
    lengths_seen, checked = set(), 0
    for record in corpus.samples.to_pylist()[:10]:
        got = reader.get(record["sample_id"])
        reference = _reference_rows(model, record, got.positions.numpy(), 0.05)
        values, ids = reference.sort(dim=-1, descending=True)
        cumulative = values.exp().cumsum(-1)
        expected = ((cumulative < 0.95).sum(-1) + 1).clamp_max(16)  # float64, naive
        clear = ((cumulative - 0.95).abs() > 1e-4).all(-1)  # no row with a prefix mass at p up to rounding
        np.testing.assert_array_equal(got.row_lengths[clear].numpy(), expected[clear].numpy())
        for row, length in enumerate(got.row_lengths.tolist()):
            stored = got.topk_logprobs[row, :length].double()
            np.testing.assert_allclose(stored.numpy(), values[row, :length].numpy(), atol=2e-5)
            assert np.isneginf(got.topk_logprobs[row, length:].numpy()).all()
        lengths_seen |= set(got.row_lengths.tolist())
        checked += int(clear.sum())
    assert checked > 100 and min(lengths_seen) == 1 and max(lengths_seen) == 16


def test_sampled_rows_are_seeded_draws_and_resume_to_identical_shards(tmp_path, teacher_dir, corpus_dir):
    capture = {"mode": "sampled", "draws": 24, "seed": 3, "proposal_temperature": 0.1}
    out = tmp_path / "sampled"
    _extract(teacher_dir, corpus_dir, out, capture)
    expected = _shard_hashes(out)
    assert len(expected) > 2
    manifest = Manifest.read(out / MANIFEST_NAME)
    assert (manifest.source.capture_mode, manifest.source.capture_params, manifest.source.k) == (
        "sampled", {"draws": 24, "proposal_temperature": 0.1, "seed": 3}, 24)
    assert manifest.source.logz_temperatures == (0.05, 0.1)
    # Resume: the last shards and the manifest gone (a killed run), the re-run rebuilds them identically.
    for name in sorted(expected)[-2:]:
        (out / name).unlink()
    partial = out / "manifest-r00.partial.json"
    data = json.loads(partial.read_text())
    data["shards"] = data["shards"][:-2]
    data["progress"]["complete"] = False
    for derived in ("num_samples", "num_trained_tokens", "num_bytes", "topk_coverage"):
        del data[derived]
    partial.write_text(json.dumps(data))
    (out / MANIFEST_NAME).unlink()
    run = _extract(teacher_dir, corpus_dir, out, capture)["run"]
    assert run["samples_skipped_done"] > 0 and _shard_hashes(out) == expected
    # Another seed draws other ids.
    _extract(teacher_dir, corpus_dir, tmp_path / "seed4", {**capture, "seed": 4})
    assert _shard_hashes(tmp_path / "seed4") != expected

    reader = TopKReader(out)
    model = load_causal_lm(teacher_dir).double()
    record = TokenizedCorpus.load(corpus_dir).samples.to_pylist()[0]
    got = reader.get(record["sample_id"])
    reference = _reference_rows(model, record, got.positions.numpy(), 0.05)
    assert (got.counts.sum(-1) == 24).all()
    for row, length in enumerate(got.row_lengths.tolist()):
        ids = got.topk_ids[row, :length]
        assert len(set(ids.tolist())) == length and (got.counts[row, :length] >= 1).all()
        np.testing.assert_allclose(got.topk_logprobs[row, :length].double().numpy(),
                                   reference[row, ids].numpy(), atol=2e-5)


def test_sampled_draws_follow_the_proposal():
    """The sampler alone: 4000 rows of one distribution with distinct keys; each id's frequency
    is its proposal probability `p**s / Z` within 5 standard errors."""
    from kd_pipeline.core.extraction.capture import row_keys, row_uniforms, sample_rows

    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(0)) * 2
    exp_shifted = (logits - logits.max()).exp().repeat(4000, 1)
    log_sum = exp_shifted.sum(-1, keepdim=True).log()
    keys = row_keys(["a", "b"], [np.arange(2000), np.arange(2000)], seed=0)
    assert len(set(keys.tolist())) == 4000
    for scale in (1.0, 0.5):
        uniforms = torch.from_numpy(row_uniforms(keys, 5))
        ids, logprobs, counts, lengths = sample_rows(exp_shifted, log_sum, uniforms, scale)
        frequency = torch.zeros(30, dtype=torch.float64).scatter_add_(0, ids.reshape(-1), counts.reshape(-1).double())
        frequency /= 4000 * 5
        proposal = (scale * logits[0].double()).softmax(-1)
        se = (proposal * (1 - proposal) / (4000 * 5)).sqrt()
        assert ((frequency - proposal).abs() <= 5 * se + 1e-9).all()
        assert (counts.sum(-1) == 5).all() and (lengths == (counts > 0).sum(-1)).all()
        stored = torch.arange(5)[None, :] < lengths[:, None]
        torch.testing.assert_close(logprobs[stored], logits[0].log_softmax(-1).expand(4000, -1).gather(1, ids)[stored])


def test_sampled_rows_need_the_batch_sample_ids():
    """The draws are seeded per sample id: a batch without them is refused by field (no silent
    shared key, under which two samples would draw identically); the head check names its row."""
    from kd_pipeline.core.extraction.capture import CaptureConfig

    model, _ = tiny_family_lm("granite", head_gain=1.0)  # flat rows: many distinct draws
    head = TopKHead(model, 8, capture=CaptureConfig(mode="sampled", draws=8))
    ids = [np.arange(3, 12), np.arange(3, 12)]
    masks = [np.r_[0, np.ones(8, np.int8)]] * 2
    with pytest.raises(ValueError, match="field 'sample_ids' is None for 2 samples: pass them to make_batch"):
        teacher_rows(model, head, make_batch(ids, masks), torch.device("cpu"))
    rows = teacher_rows(model, head, make_batch(ids, masks, sample_ids=["a", "b"]), torch.device("cpu"))
    first, second = rows.topk_ids[:8], rows.topk_ids[8:]
    assert not torch.equal(first, second)  # same tokens, other sample: other draws
    assert check_head_path(model, head, np.arange(3, 27), torch.device("cpu")) <= 1e-3
