"""The extraction: run the teacher over every sample of the corpus and write the top-k artifact.

Three overlapping stages keep it close to the cost of a bare forward: the GPU computes batch i
while batch i-1 is copied to the host and submitted for encoding, and batch i-2's samples go to
the shard writer. A batch with any sample left runs whole, so a resumed, multi-process or
single-process run computes every sample identically and the writer gets the same sample order
(which makes resumed shards byte-identical).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kd_pipeline.core.atomic import sha256_file
from kd_pipeline.core.devices import dtype_name
from kd_pipeline.core.distributed import barrier, gather
from kd_pipeline.core.extraction.compat import TeacherCorpusMismatchError, check_teacher_for_corpus
from kd_pipeline.core.extraction.config import ExtractionConfig
from kd_pipeline.core.extraction.encode import PrecomputedCodec
from kd_pipeline.core.extraction.head import TopKHead, check_head_path, teacher_rows
from kd_pipeline.core.extraction.plan import BatchInputs, CorpusArrays, PlannedBatch, rank_share
from kd_pipeline.core.extraction.report import new_stats, record_run, summarize_runs
from kd_pipeline.core.locking import FolderLock
from kd_pipeline.core.models.device_map import execution_device
from kd_pipeline.core.models.identity import model_identity
from kd_pipeline.core.models.loading import load_causal_lm

logger = logging.getLogger(__name__)


def run_batches(model, head: TopKHead, corpus: CorpusArrays, batches: Sequence[PlannedBatch], writer,
                device: torch.device, *, done: frozenset | set = frozenset(), encoder: PrecomputedCodec | None = None,
                progress=None, stats: dict | None = None) -> dict:
    """The extraction loop: teacher rows of every batch, each not-done sample handed to `writer.add`
    in plan order. Three overlapping stages: the GPU computes batch i while batch i-1 is copied
    to the host and submitted for encoding, and batch i-2's samples go to the writer.

    Returns:
        `stats` (updated in place): batches, samples, tokens (real), padded_tokens,
        trained_tokens, target_in_topk, target_nll_sum, seconds.
    """
    from kd_pipeline.core.topk_store import TopKArrays

    stats = stats if stats is not None else new_stats()
    sample_ids = corpus.sample_ids
    cuda = device.type == "cuda"

    def emit(batch: PlannedBatch, inputs: BatchInputs, host) -> list:
        ids, logprobs, targets, logz, lengths, counts = (None if t is None else t.numpy() for t in host)
        labels = inputs.labels.numpy()
        out, start = [], 0
        for row, positions in zip(batch.rows, inputs.positions):
            stop = start + len(positions)
            if sample_ids[row] not in done:
                arrays = TopKArrays.from_any(positions, ids[start:stop], logprobs[start:stop], targets[start:stop],
                                             logz[start:stop], head.logz_scales,
                                             None if lengths is None else lengths[start:stop],
                                             None if counts is None else counts[start:stop])
                if encoder is not None:
                    encoder.submit(arrays)
                out.append((sample_ids[row], arrays))
                stats["samples"] += 1
                stats["trained_tokens"] += len(positions)
                stats["target_in_topk"] += int((ids[start:stop] == labels[start:stop, None]).any(axis=1).sum())
                stats["target_nll_sum"] += float(-targets[start:stop].astype(np.float64).sum())
            start = stop
        stats["batches"] += 1
        stats["tokens"] += inputs.tokens
        stats["padded_tokens"] += inputs.input_ids.numel()
        if progress is not None:
            progress.update(inputs.tokens)
        return out

    def write(samples: list) -> None:
        for sample_id, arrays in samples:
            writer.add(sample_id, arrays.positions, arrays.topk_ids, arrays.topk_logprobs, arrays.target_logprobs,
                       arrays.logz, arrays.row_lengths, arrays.counts)

    started = time.perf_counter()
    in_flight: list = []  # computed (maybe still running on the GPU), not yet on the host
    to_write: list = []  # on the host and submitted for encoding, not yet given to the writer
    with torch.inference_mode():
        for batch in batches:
            inputs = corpus.batch(batch)
            rows = teacher_rows(model, head, inputs, device)
            host = tuple(None if t is None else t.to("cpu", non_blocking=cuda) for t in rows.host_tensors())
            event = None
            if cuda:
                event = torch.cuda.Event()
                event.record()
            in_flight.append((batch, inputs, host, event))
            if len(in_flight) > 1:
                batch_, inputs_, host_, event_ = in_flight.pop(0)
                if event_ is not None:
                    event_.synchronize()
                to_write.append(emit(batch_, inputs_, host_))
            if len(to_write) > 1:
                write(to_write.pop(0))
        for batch_, inputs_, host_, event_ in in_flight:
            if event_ is not None:
                event_.synchronize()
            to_write.append(emit(batch_, inputs_, host_))
        for samples in to_write:
            write(samples)
    stats["seconds"] += time.perf_counter() - started
    return stats


def load_teacher_for_extraction(teacher_dir: str | os.PathLike, config: ExtractionConfig,
                                num_tokens: int | None = None):
    """(model, head, device, dtype) for a teacher folder with the config's device/dtype; with
    `device_map`, split across devices, `device` being where its inputs go (the embeddings');
    `num_tokens`: `len(tokenizer)` (a head padded beyond it gives its padded rows no mass)."""
    device = config.resolved_device()
    dtype = config.resolved_dtype(device)
    model = load_causal_lm(teacher_dir, dtype=dtype, device=device, device_map=config.device_map,
                           max_memory=config.max_memory, offload_folder=config.offload_folder)
    if config.device_map is not None:
        device = execution_device(model.get_input_embeddings())
    head = TopKHead(model, config.k, config.temperature, config.resolved_head_chunk_rows(device),
                    logz_scales=config.logz_scales, num_tokens=num_tokens, capture=config.capture)
    return model, head, device, dtype


def extract_teacher_topk(teacher_dir: str | os.PathLike, corpus, out_dir: str | os.PathLike,
                         config: ExtractionConfig | None = None, rank: int = 0, world_size: int = 1) -> dict:
    """Run the teacher over every sample of `corpus` and write the top-k artifact to `out_dir`.

    Args:
        teacher_dir: Local HF folder of the teacher (model + tokenizer).
        corpus: A `TokenizedCorpus` or its directory.
        out_dir: The artifact directory (shards + `manifest.json`, see `core.topk_store`).
        config: Extraction settings (defaults: `ExtractionConfig()`).
        rank, world_size: This process's share; with world_size > 1 a torch.distributed
            process group must be initialized (see `core.distributed.distributed_from_env`).
            Rank 0 merges the manifest after all ranks finished.

    Returns:
        This process's statistics (samples/tokens computed, seconds, tokens/s, samples skipped
        as already done, repaired shards, ...), plus `run` (totals over all ranks, also written
        to `extraction_run.json` in `out_dir`) and `manifest` (the merged manifest as a dict).

    Raises:
        TeacherCorpusMismatchError: the teacher's vocabulary or tokenizer is not the corpus's.
        FolderLockedError: another process is writing `out_dir` (rank 0 holds its lock for the
            whole run, from before the shard check to the merged manifest; each rank's writer
            locks its own share too).
    """
    config = config or ExtractionConfig()
    out_dir = Path(out_dir)
    with contextlib.ExitStack() as lock:
        if rank == 0:
            lock.enter_context(FolderLock(out_dir, purpose=f"teacher_logits extraction, {world_size} rank(s)"))
        return _extract(Path(teacher_dir), corpus, out_dir, config, rank, world_size)


def _extract(teacher_dir: Path, corpus, out_dir: Path, config: ExtractionConfig, rank: int, world_size: int) -> dict:
    from kd_pipeline.core.corpus import TokenizedCorpus

    started = time.perf_counter()
    corpus_where = "the corpus"
    if not isinstance(corpus, TokenizedCorpus):
        corpus_where = f"the corpus at {corpus}"
        corpus = TokenizedCorpus.load(corpus)
    # Refuse a mismatched teacher before spending time on its weights.
    teacher_vocab, teacher_tokenizer_hash = check_teacher_for_corpus(teacher_dir, corpus.meta, corpus_where)
    identity = model_identity(teacher_dir)
    # The corpus's vocab_size is len(tokenizer) (checked above): head rows past it are padding.
    model, head, device, dtype = load_teacher_for_extraction(teacher_dir, config, int(corpus.meta["vocab_size"]))
    if head.vocab_size != teacher_vocab:
        raise TeacherCorpusMismatchError("vocab_size", f"the teacher's LM head has {head.vocab_size} rows, its "
                                                       f"config.json says vocab_size {teacher_vocab}")
    source = _artifact_source(teacher_dir, identity, teacher_tokenizer_hash, head, config, dtype, corpus)

    arrays = CorpusArrays.from_table(corpus.samples)
    plan = arrays.plan(config)
    if config.check_head and plan:
        check_head_path(model, head, arrays.input_ids(plan[0].rows[0]), device)
    repaired = _drop_bad_shards(out_dir) if rank == 0 else []
    barrier(world_size)  # every rank opens its writer after the check (opening drops manifest.json)

    stats = _extract_share(model, head, arrays, rank_share(plan, rank, world_size), out_dir, source, config,
                           device, rank, world_size)
    seconds = stats["seconds"]
    stats.update(rank=rank, world_size=world_size, device=str(device), capture_dtype=dtype_name(dtype),
                 repaired_shards=repaired, seconds=round(seconds, 3),
                 tokens_per_second=round(stats["tokens"] / seconds, 1) if seconds else None,
                 trained_tokens_per_second=round(stats["trained_tokens"] / seconds, 1) if seconds else None,
                 total_seconds=round(time.perf_counter() - started, 3))
    logger.info("teacher_logits rank %d/%d: %d samples, %d tokens (%d trained) in %.1f s = %.0f tok/s on %s %s; "
                "%d samples already done", rank, world_size, stats["samples"], stats["tokens"], stats["trained_tokens"],
                seconds, stats["tokens"] / max(seconds, 1e-9), device, dtype_name(dtype), stats["samples_skipped_done"])
    return _merge_ranks(out_dir, stats, rank, world_size)


def _artifact_source(teacher_dir: Path, identity: dict, tokenizer_hash: str, head: TopKHead,
                     config: ExtractionConfig, dtype: torch.dtype, corpus):
    """What the artifact is made from (its manifest's `source`)."""
    from kd_pipeline.core.topk_store import ArtifactSource

    return ArtifactSource(
        teacher_path=str(teacher_dir),
        teacher_config_sha256=identity["config_sha256"],
        teacher_weights_sha256=identity["weights_sha256"],
        tokenizer_sha256=tokenizer_hash,
        vocab_size=head.vocab_size,
        k=config.row_width,
        capture_dtype=dtype_name(dtype),
        capture_temperature=config.temperature,
        corpus_fingerprint=corpus.fingerprint,
        logz_temperatures=config.logz_temperatures,
        capture_mode=config.capture.mode,
        capture_params=config.capture.manifest_params(config.k, config.temperature),
    )


def _extract_share(model, head: TopKHead, arrays: CorpusArrays, mine: Sequence[PlannedBatch], out_dir: Path,
                   source, config: ExtractionConfig, device: torch.device, rank: int, world_size: int) -> dict:
    """Open this rank's writer (resuming when allowed), run its not-done batches, close it."""
    from tqdm.auto import tqdm

    codec = config.codec_object()
    workers = config.resolved_encode_workers(device)
    encoder = PrecomputedCodec(codec, workers) if workers else None
    writer, restarted = _open_writer(out_dir, source, encoder or codec, config, rank, world_size)
    done = writer.completed_sample_ids
    ids = arrays.sample_ids
    # A batch with any sample left runs whole (same batch, same numbers); done samples are skipped.
    todo = [batch for batch in mine if any(ids[row] not in done for row in batch.rows)]
    skipped = sum(1 for batch in mine for row in batch.rows if ids[row] in done)
    progress = tqdm(total=sum(int(arrays.lengths[row]) for batch in todo for row in batch.rows), unit="tok",
                    unit_scale=True, dynamic_ncols=True, mininterval=1.0, desc=f"teacher top-k ({device.type})",
                    disable=True if not config.progress or rank != 0 else None)  # None: off unless a terminal
    stats = new_stats()
    try:
        run_batches(model, head, arrays, todo, writer, device, done=done, encoder=encoder, progress=progress,
                    stats=stats)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.close()
        if encoder is not None:
            encoder.shutdown()
    stats.update(samples_skipped_done=skipped, restarted=restarted)
    return stats


def _merge_ranks(out_dir: Path, stats: dict, rank: int, world_size: int) -> dict:
    """Gather every rank's statistics, merge the manifest on rank 0, record the run."""
    from kd_pipeline.core.topk_store import MANIFEST_NAME, Manifest, merge_manifests

    all_stats = gather(stats, world_size)
    barrier(world_size)
    if world_size > 1 and rank == 0:
        merge_manifests(out_dir, world_size)
    barrier(world_size)
    manifest = Manifest.read(out_dir / MANIFEST_NAME)
    run = summarize_runs(all_stats)
    if rank == 0:
        record_run(out_dir, run)
    return {**stats, "run": run, "manifest": manifest.to_dict()}


def _drop_bad_shards(out_dir: Path) -> list[str]:
    """Shards of a finished artifact that fail their size/sha256 check are deleted (the writer
    then rebuilds them under the same names). Returns their names."""
    from kd_pipeline.core.topk_store import MANIFEST_NAME, Manifest, TopKReader, TopKStoreError

    manifest_path = out_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        return []
    try:
        bad = TopKReader(out_dir, verify="lazy").verify()
    except TopKStoreError as error:  # missing or wrong-size shard: found at open; check each
        logger.warning("teacher_logits: %s", error)
        try:
            manifest = Manifest.read(manifest_path)
        except (TopKStoreError, ValueError):
            return []
        bad = []
        for shard in manifest.shards:
            path = out_dir / shard.file
            if not path.is_file() or path.stat().st_size != shard.bytes or sha256_file(path) != shard.sha256:
                bad.append(shard.file)
    for name in bad:
        logger.warning("teacher_logits: shard %s fails its checksum: deleting it, it is regenerated now", name)
        (out_dir / name).unlink(missing_ok=True)
    return bad


def _open_writer(out_dir: Path, source, codec, config: ExtractionConfig, rank: int, world_size: int):
    from kd_pipeline.core.topk_store import ManifestMismatchError, TopKShardWriter

    def open_(resume: bool):
        return TopKShardWriter(out_dir, source, codec, rank=rank, world_size=world_size,
                               shard_tokens=config.shard_trained_tokens, resume=resume)

    if not config.resume:
        return open_(False), False
    try:
        return open_(True), False
    except ManifestMismatchError as error:
        # Shards of other settings (teacher, corpus, k, codec, ...) cannot be continued.
        logger.warning("teacher_logits: starting over in %s (rank %d): %s", out_dir, rank, error)
        return open_(False), True
