"""Teacher top-k extraction: run the teacher once over the corpus, keep what trains.

For every trained position `p` of a sample (`loss_mask[p + 1] == 1`, see
docs/architecture.md) the artifact gets the teacher's top-k next-token ids, their log-probs
normalized over the full vocabulary (`logit - logsumexp(logits)`) and the teacher log-prob of
the actual next token `input_ids[p + 1]`.

How it stays close to the cost of a bare forward:

- samples run in length-sorted batches (little padding), right-padded, with a plain causal
  forward of the decoder (right padding never changes a real position's output under a causal
  mask, so no attention mask is needed);
- the LM head is applied only to the hidden rows of trained positions (prompt and padding
  positions never get logits), in row chunks written into one reused buffer;
- top-k comes first, its first value is the row max, and logsumexp is then computed in place
  on the chunk (`sub_`, `exp_`, `sum`): no extra full-vocabulary copy and no separate max pass.

Determinism: the batch plan depends only on the corpus and the config (sort by
`(length, sample_id)`, greedy packing under a padded-token budget), each rank takes every
`world_size`-th batch of it, and a sample is always computed inside the very same batch. So a
resumed run, a multi-process run and a single-process run compute every sample identically,
and the shard writer gets the same sample order (which makes resumed shards byte-identical).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from kd_pipeline.core.params import dataclass_from_params

logger = logging.getLogger(__name__)

#: The default teacher's architecture (SmolLM2-135M-Instruct), for benchmarks that run it with
#: random weights when the converted teacher folder is not at hand.
SMOLLM2_135M_CONFIG: dict = {
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "hidden_act": "silu", "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
    "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}


def random_causal_lm(config: Mapping[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu"):
    """A seeded random causal LM from a config dict with `model_type` (benchmarks, GPU checks)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(config)
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return model.to(device).eval()

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtractionConfig:
    """How the teacher pass runs (parameters `teacher_logits`).

    Attributes:
        k: Top-k entries stored per trained token.
        codec: Artifact codec: `logquant_zstd` (the compact default; `compact` is an alias)
            or `raw` (exact reference), see `core.topk_store`.
        codec_settings: Codec options (e.g. `{step: 0.08}`), passed to the codec as given.
        batch_tokens: Budget of padded tokens per batch (batch size x longest sample).
        max_batch_size: Upper bound on samples per batch.
        shard_trained_tokens: Target trained tokens per shard file.
        dtype: `auto` (bfloat16 on CUDA, float32 on CPU), `float32`, `bfloat16` or `float16`.
        temperature: Capture temperature: logits are divided by it before normalization.
        device: `auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`.
        head_chunk_rows: Trained rows per LM-head chunk; 0 = auto (CPU 1024, CUDA 8192).
        check_head: Check once, on a short slice, that the head path equals the model's own
            logits (guards against architectures with extra logit post-processing).
        encode_workers: Threads encoding samples while the teacher runs; -1 = auto (none on
            CPU, where the forward already uses every core; up to 8 on CUDA).
        resume: Keep verified shards of an earlier run with the same settings and skip their
            samples (False: start over).
        progress: Show a tqdm progress bar (rank 0 only).
    """

    k: int = 64
    codec: str = "logquant_zstd"
    codec_settings: Mapping[str, Any] = field(default_factory=dict)
    batch_tokens: int = 8192
    max_batch_size: int = 64
    shard_trained_tokens: int = 1 << 18
    dtype: str = "auto"
    temperature: float = 1.0
    device: str = "auto"
    head_chunk_rows: int = 0
    check_head: bool = True
    encode_workers: int = -1
    resume: bool = True
    progress: bool = True

    def __post_init__(self):
        def bad(name: str, reason: str):
            return ValueError(f"teacher_logits.{name}: {reason}, got {getattr(self, name)!r}")

        for name in ("k", "batch_tokens", "max_batch_size", "shard_trained_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, "must be a positive integer")
        if isinstance(self.head_chunk_rows, bool) or not isinstance(self.head_chunk_rows, int) or self.head_chunk_rows < 0:
            raise bad("head_chunk_rows", "must be an integer >= 0 (0 = auto)")
        if not isinstance(self.codec, str) or not self.codec:
            raise bad("codec", "must be a codec name")
        if not isinstance(self.codec_settings, Mapping):
            raise bad("codec_settings", "must be a mapping")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise bad("dtype", f"must be 'auto' or one of {sorted(_DTYPES)}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise bad("temperature", "must be a finite number > 0")
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            raise bad("device", "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if isinstance(self.encode_workers, bool) or not isinstance(self.encode_workers, int) or self.encode_workers < -1:
            raise bad("encode_workers", "must be an integer >= -1 (-1 = auto, 0 = encode inline)")
        for name in ("check_head", "resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        # Frozen dataclass: normalize once (alias, plain dict, float).
        from kd_pipeline.core.topk_store import DEFAULT_CODEC, get_codec

        object.__setattr__(self, "codec", DEFAULT_CODEC if self.codec == "compact" else self.codec)
        object.__setattr__(self, "codec_settings", dict(self.codec_settings))
        object.__setattr__(self, "temperature", float(self.temperature))
        try:
            get_codec(self.codec, self.codec_settings)
        except ValueError as error:
            raise ValueError(f"teacher_logits.codec / codec_settings: {error}") from None

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> "ExtractionConfig":
        return dataclass_from_params(cls, params, "teacher_logits")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def resolved_device(self, rank: int = 0, local_rank: int | None = None) -> torch.device:
        """The device this process uses; under torchrun each CUDA rank takes its LOCAL_RANK GPU."""
        if self.device == "auto":
            if not torch.cuda.is_available():
                return torch.device("cpu")
            index = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", index)
        if self.device == "cuda":
            index = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", index)
        return torch.device(self.device)

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return _DTYPES[self.dtype]

    def resolved_head_chunk_rows(self, device: torch.device) -> int:
        if self.head_chunk_rows:
            return self.head_chunk_rows
        return 8192 if device.type == "cuda" else 1024

    def resolved_encode_workers(self, device: torch.device) -> int:
        if self.encode_workers >= 0:
            return self.encode_workers
        return 0 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 2))

    def codec_object(self):
        from kd_pipeline.core.topk_store import get_codec

        return get_codec(self.codec, self.codec_settings)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# Batch plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedBatch:
    """One teacher batch: corpus row indices (in order) and the padded length."""

    index: int
    rows: tuple[int, ...]
    padded_length: int


def plan_batches(lengths: Sequence[int], sample_ids: Sequence[str], batch_tokens: int,
                 max_batch_size: int) -> list[PlannedBatch]:
    """Sort samples by `(length, sample_id)` and pack them greedily into batches whose padded
    size (`len(batch) * longest`) stays within `batch_tokens` (a longer sample runs alone)."""
    order = sorted(range(len(lengths)), key=lambda row: (int(lengths[row]), sample_ids[row]))
    batches: list[PlannedBatch] = []
    current: list[int] = []
    for row in order:
        longest = int(lengths[row])  # ascending order: the new sample is the longest
        if current and ((len(current) + 1) * longest > batch_tokens or len(current) >= max_batch_size):
            batches.append(PlannedBatch(len(batches), tuple(current), int(lengths[current[-1]])))
            current = []
        current.append(row)
    if current:
        batches.append(PlannedBatch(len(batches), tuple(current), int(lengths[current[-1]])))
    return batches


def rank_share(batches: Sequence[PlannedBatch], rank: int, world_size: int) -> list[PlannedBatch]:
    """The batches rank `rank` runs: every `world_size`-th batch of the plan, starting at `rank`
    (length-sorted order makes this round robin roughly token-balanced)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return list(batches[rank::world_size])


# ---------------------------------------------------------------------------------------------
# The teacher head on trained rows only
# ---------------------------------------------------------------------------------------------


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The causal LM's base decoder (hidden states) and its LM head."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    head = model.get_output_embeddings()
    if decoder is None or head is None:
        raise ValueError(f"{type(model).__name__}: cannot find the base decoder and the LM head")
    return decoder, head


class _LogitPostprocess:
    """The few logit transforms HF causal LMs apply after the head (scaling, soft-capping)."""

    def __init__(self, config):
        self.scaling = getattr(config, "logits_scaling", None)  # Granite divides by it
        self.softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scaling not in (None, 1, 1.0):
            logits.div_(self.scaling)
        if self.softcap:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits


@dataclass
class HeadRows:
    """Per trained row: top-k ids / log-probs (descending) and the target log-prob."""

    topk_ids: torch.Tensor  # [N, k] int32
    topk_logprobs: torch.Tensor  # [N, k] float32
    target_logprobs: torch.Tensor  # [N] float32


class TopKHead:
    """Applies the LM head to selected hidden rows and reduces each row to top-k log-probs.

    Works chunk by chunk: logits of `chunk_rows` rows go into one reused buffer; top-k (whose
    first value is the row max) and the target logit are read first, then the buffer is
    turned in place into `exp(logit - max)` and summed. Nothing else of size [rows, V] exists.
    """

    def __init__(self, model, k: int, temperature: float = 1.0, chunk_rows: int = 1024):
        _, self.head = decoder_and_head(model)
        self.weight = self.head.weight
        self.bias = getattr(self.head, "bias", None)
        self.vocab_size = int(self.weight.shape[0])
        if k > self.vocab_size:
            raise ValueError(f"teacher_logits.k = {k} exceeds the teacher vocabulary size {self.vocab_size}")
        self.k = k
        self.temperature = float(temperature)
        self.chunk_rows = chunk_rows
        self.postprocess = _LogitPostprocess(model.config)
        self._buffer: torch.Tensor | None = None

    def _logits_into_buffer(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.shape[0]
        if self.weight.dtype == torch.float32 and hidden.device.type == "cpu":
            # CPU fp32: matmul straight into a reused buffer (no fresh [rows, V] allocation,
            # whose page faults cost as much as the exp pass).
            if self._buffer is None or self._buffer.shape[0] < rows:
                self._buffer = torch.empty(max(rows, self.chunk_rows), self.vocab_size, dtype=torch.float32)
            logits = self._buffer[:rows]
            torch.matmul(hidden, self.weight.t(), out=logits)
            if self.bias is not None:
                logits.add_(self.bias)
        else:
            # bf16/fp16 (or CUDA): the model's own head output, then one fp32 copy per chunk.
            logits = torch.nn.functional.linear(hidden, self.weight, self.bias).float()
        return logits

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor) -> HeadRows:
        """`hidden [N, H]` rows at trained positions, `labels [N]` the actual next tokens."""
        n = hidden.shape[0]
        device = hidden.device
        out_ids = torch.empty(n, self.k, dtype=torch.int32, device=device)
        out_lp = torch.empty(n, self.k, dtype=torch.float32, device=device)
        out_tgt = torch.empty(n, dtype=torch.float32, device=device)
        for start in range(0, n, self.chunk_rows):
            stop = min(start + self.chunk_rows, n)
            logits = self._logits_into_buffer(hidden[start:stop])
            self.postprocess(logits)
            if self.temperature != 1.0:
                logits.div_(self.temperature)
            values, ids = torch.topk(logits, self.k, dim=-1, largest=True, sorted=True)
            target = logits.gather(1, labels[start:stop, None].long())
            row_max = values[:, :1]
            # In place: logits <- exp(logits - max); lse = max + log(sum).
            lse = logits.sub_(row_max).exp_().sum(dim=-1, keepdim=True).log_().add_(row_max)
            out_ids[start:stop] = ids
            out_lp[start:stop] = values - lse
            out_tgt[start:stop] = (target - lse).squeeze(1)
        return HeadRows(out_ids, out_lp, out_tgt)


# ---------------------------------------------------------------------------------------------
# Batches -> tensors -> rows
# ---------------------------------------------------------------------------------------------


@dataclass
class BatchInputs:
    """A padded batch and where its trained positions are."""

    input_ids: torch.Tensor  # [B, L] long, right-padded
    flat_positions: torch.Tensor  # [N] long: b * L + p for each trained position, sample-major
    labels: torch.Tensor  # [N] long: input_ids[b, p + 1]
    positions: list[np.ndarray]  # per sample: trained positions p (int32), ascending
    tokens: int  # real (unpadded) tokens in the batch


def make_batch(input_ids: Sequence[np.ndarray], loss_masks: Sequence[np.ndarray], pad_id: int = 0) -> BatchInputs:
    """Right-pad samples and locate their trained positions (`loss_mask[p + 1] == 1`)."""
    length = max(len(ids) for ids in input_ids)
    batch = np.full((len(input_ids), length), pad_id, dtype=np.int64)
    flat, positions = [], []
    for b, (ids, mask) in enumerate(zip(input_ids, loss_masks)):
        batch[b, : len(ids)] = ids
        trained = (np.flatnonzero(np.asarray(mask)) - 1).astype(np.int32)
        if trained.size and trained[0] < 0:
            raise ValueError("loss_mask[0] must be 0: token 0 has no position that predicts it")
        positions.append(trained)
        flat.append(b * length + trained.astype(np.int64))
    flat_positions = torch.from_numpy(np.concatenate(flat)) if flat else torch.empty(0, dtype=torch.long)
    ids_t = torch.from_numpy(batch)
    labels = ids_t.view(-1)[flat_positions + 1]
    return BatchInputs(ids_t, flat_positions, labels, positions, int(sum(len(ids) for ids in input_ids)))


@torch.no_grad()
def teacher_rows(model, head: TopKHead, batch: BatchInputs, device: torch.device) -> HeadRows:
    """Decoder forward, gather the trained rows' hidden states, head on those rows only."""
    decoder, _ = decoder_and_head(model)
    input_ids = batch.input_ids.to(device, non_blocking=True)
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.flat_positions.to(device))
    return head(rows, batch.labels.to(device))


@torch.no_grad()
def bare_forward(model, batch: BatchInputs, device: torch.device) -> torch.Tensor:
    """The baseline: the causal LM's own forward (logits at every position) on the same batch."""
    return model(input_ids=batch.input_ids.to(device), use_cache=False).logits


def check_head_path(model, head: TopKHead, input_ids: np.ndarray, device: torch.device,
                    atol: float | None = None) -> float:
    """Compare the decoder + trained-row head path with `log_softmax(model(...).logits)` on one
    short sequence; raise if they disagree (an architecture whose logits need more than the
    head, scaling and soft-capping). Returns the max abs error of the top-k log-probs."""
    ids = np.asarray(input_ids[: min(len(input_ids), 24)], dtype=np.int64)
    if len(ids) < 2:
        return 0.0
    mask = np.ones(len(ids), dtype=np.int8)
    mask[0] = 0
    batch = make_batch([ids], [mask])
    got = teacher_rows(model, head, batch, device)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids.to(device), use_cache=False).logits[0, :-1].float()
    logits = logits / head.temperature
    reference = torch.log_softmax(logits, dim=-1)
    ref_lp = reference.gather(1, got.topk_ids.long())
    ref_tgt = reference.gather(1, batch.labels.to(device)[:, None]).squeeze(1)
    error = max(float((ref_lp - got.topk_logprobs).abs().max()), float((ref_tgt - got.target_logprobs).abs().max()))
    ref_top = reference.max(dim=-1).values
    error = max(error, float((ref_top - got.topk_logprobs[:, 0]).abs().max()))
    if atol is None:
        atol = 1e-3 if head.weight.dtype == torch.float32 else 0.25
    if not error <= atol:
        raise ValueError(
            f"{type(model).__name__}: the trained-row head path differs from the model's own logits "
            f"by {error:.3g} (> {atol}); this architecture post-processes logits in a way the "
            "extraction does not reproduce"
        )
    return error


# ---------------------------------------------------------------------------------------------
# Teacher / corpus compatibility
# ---------------------------------------------------------------------------------------------


class TeacherCorpusMismatchError(ValueError):
    """The teacher (model or tokenizer) does not belong to the corpus; names the field."""

    def __init__(self, field_name: str, message: str):
        self.field_name = field_name
        super().__init__(f"teacher/corpus mismatch in field {field_name!r}: {message}")


def check_teacher_matches_corpus(teacher_dir: Path, teacher_vocab_size: int, tokenizer_vocab_size: int,
                                 teacher_tokenizer_hash: str, corpus_meta: Mapping[str, Any],
                                 corpus_where: str = "the corpus") -> None:
    """Refuse a teacher whose vocabulary or tokenizer differs from the corpus's.

    The corpus records `vocab_size` (`len(tokenizer)`) and `tokenizer_hash` of the tokenizer
    that produced its ids. The teacher's tokenizer must have the same size and hash, and its
    LM head at least that many rows (a head padded beyond the tokenizer is fine).
    """
    corpus_vocab = corpus_meta.get("vocab_size")
    if corpus_vocab != tokenizer_vocab_size or teacher_vocab_size < int(corpus_vocab or 0):
        raise TeacherCorpusMismatchError(
            "vocab_size",
            f"{corpus_where} was tokenized with vocab_size {corpus_vocab}, but the teacher at {teacher_dir} has "
            f"a tokenizer of {tokenizer_vocab_size} tokens and an LM head of {teacher_vocab_size} rows",
        )
    corpus_hash = corpus_meta.get("tokenizer_hash")
    if corpus_hash != teacher_tokenizer_hash:
        raise TeacherCorpusMismatchError(
            "tokenizer_hash",
            f"{corpus_where} has tokenizer_hash {str(corpus_hash)[:16]}..., the teacher's tokenizer at {teacher_dir} "
            f"has {teacher_tokenizer_hash[:16]}...: re-run corpus_prep with this teacher",
        )


# ---------------------------------------------------------------------------------------------
# Encoding off the main thread
# ---------------------------------------------------------------------------------------------


class _PrecomputedCodec:
    """Wraps a codec so that `TopKShardWriter.add` picks up payloads encoded ahead of time in a
    thread pool (same codec, same arrays: the same bytes), in submission order."""

    def __init__(self, codec, workers: int):
        from concurrent.futures import ThreadPoolExecutor
        from collections import deque

        self.inner = codec
        self.name = codec.name
        self.columns = codec.columns
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="topk-encode")
        self._queue = deque()

    def settings(self) -> dict:
        return self.inner.settings()

    def submit(self, arrays) -> None:
        self._queue.append((arrays.num_positions, self._pool.submit(self.inner.encode, arrays)))

    def encode(self, sample):
        num_positions, future = self._queue.popleft()
        if num_positions != sample.num_positions:  # a programming error, never data-dependent
            raise RuntimeError("encode queue out of order")
        return future.result()

    def decode(self, payload, num_positions: int, k: int):
        return self.inner.decode(payload, num_positions, k)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------


def distributed_from_env(device_type: str = "cpu") -> tuple[int, int]:
    """(rank, world_size) of this process; under torchrun (WORLD_SIZE > 1) the default process
    group is initialized here if needed (gloo on CPU, nccl on CUDA)."""
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1
    if not dist.is_initialized():
        from datetime import timedelta

        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # Ranks finish their shares at different times; the barrier must outwait the slowest.
        dist.init_process_group(backend=backend, timeout=timedelta(hours=24))
    return dist.get_rank(), dist.get_world_size()


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("world_size > 1 needs an initialized torch.distributed process group "
                               "(run under torchrun; see distributed_from_env)")
        dist.barrier()


def _gather(obj: Any, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

RUN_STATS_FILE = "extraction_run.json"


def _list_column(table, name: str, dtype) -> tuple[np.ndarray, np.ndarray]:
    column = table[name].combine_chunks()
    return np.asarray(column.offsets, dtype=np.int64), np.asarray(column.values, dtype=dtype)


def _drop_bad_shards(out_dir: Path) -> list[str]:
    """Shards of a finished artifact that fail their size/sha256 check are deleted (the writer
    then rebuilds them under the same names). Returns their names."""
    from kd_pipeline.core.topk_store import MANIFEST_NAME, Manifest, TopKReader, TopKStoreError

    manifest_path = out_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        return []
    try:
        bad = TopKReader(out_dir).verify()
    except TopKStoreError as error:  # missing or wrong-size shard: found at open; check each
        logger.warning("teacher_logits: %s", error)
        try:
            manifest = Manifest.read(manifest_path)
        except (TopKStoreError, ValueError):
            return []
        from kd_pipeline.core.atomic import sha256_file

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


@dataclass
class CorpusArrays:
    """Samples as flat arrays (Arrow list offsets + values): cheap per-sample numpy views."""

    sample_ids: list[str]
    lengths: np.ndarray
    id_offsets: np.ndarray
    id_values: np.ndarray
    mask_offsets: np.ndarray
    mask_values: np.ndarray

    @classmethod
    def from_table(cls, table) -> "CorpusArrays":
        id_offsets, id_values = _list_column(table, "input_ids", np.int32)
        mask_offsets, mask_values = _list_column(table, "loss_mask", np.int8)
        return cls(table["sample_id"].to_pylist(), table["length"].to_numpy(), id_offsets, id_values,
                   mask_offsets, mask_values)

    @classmethod
    def from_lists(cls, sample_ids: Sequence[str], input_ids: Sequence[Sequence[int]],
                   loss_masks: Sequence[Sequence[int]]) -> "CorpusArrays":
        import pyarrow as pa

        table = pa.table({"sample_id": list(sample_ids),
                          "input_ids": pa.array([list(map(int, x)) for x in input_ids], pa.list_(pa.int32())),
                          "loss_mask": pa.array([list(map(int, x)) for x in loss_masks], pa.list_(pa.int8())),
                          "length": pa.array([len(x) for x in input_ids], pa.int32())})
        return cls.from_table(table)

    def input_ids(self, row: int) -> np.ndarray:
        return self.id_values[self.id_offsets[row]:self.id_offsets[row + 1]]

    def loss_mask(self, row: int) -> np.ndarray:
        return self.mask_values[self.mask_offsets[row]:self.mask_offsets[row + 1]]

    def plan(self, config: "ExtractionConfig") -> list[PlannedBatch]:
        return plan_batches(self.lengths, self.sample_ids, config.batch_tokens, config.max_batch_size)

    def batch(self, planned: PlannedBatch) -> BatchInputs:
        return make_batch([self.input_ids(row) for row in planned.rows], [self.loss_mask(row) for row in planned.rows])


def new_stats() -> dict:
    return {"batches": 0, "samples": 0, "tokens": 0, "padded_tokens": 0, "trained_tokens": 0,
            "target_in_topk": 0, "target_nll_sum": 0.0, "seconds": 0.0}


def run_batches(model, head: TopKHead, corpus: CorpusArrays, batches: Sequence[PlannedBatch], writer,
                device: torch.device, *, done: frozenset | set = frozenset(), encoder: "_PrecomputedCodec | None" = None,
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
        ids, logprobs, targets = (t.numpy() for t in host)
        labels = inputs.labels.numpy()
        out, start = [], 0
        for row, positions in zip(batch.rows, inputs.positions):
            stop = start + len(positions)
            if sample_ids[row] not in done:
                arrays = TopKArrays.from_any(positions, ids[start:stop], logprobs[start:stop], targets[start:stop])
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
            writer.add(sample_id, arrays.positions, arrays.topk_ids, arrays.topk_logprobs, arrays.target_logprobs)

    started = time.perf_counter()
    in_flight: list = []  # computed (maybe still running on the GPU), not yet on the host
    to_write: list = []  # on the host and submitted for encoding, not yet given to the writer
    with torch.inference_mode():
        for batch in batches:
            inputs = corpus.batch(batch)
            rows = teacher_rows(model, head, inputs, device)
            host = tuple(t.to("cpu", non_blocking=cuda) for t in (rows.topk_ids, rows.topk_logprobs, rows.target_logprobs))
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


def load_teacher_for_extraction(teacher_dir: str | os.PathLike, config: ExtractionConfig):
    """(model, head, device, dtype) for a teacher folder with the config's device/dtype."""
    from kd_pipeline.core import modeling

    device = config.resolved_device()
    dtype = config.resolved_dtype(device)
    model = modeling.load_causal_lm(teacher_dir, dtype=dtype, device=device)
    head = TopKHead(model, config.k, config.temperature, config.resolved_head_chunk_rows(device))
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
            process group must be initialized (see `distributed_from_env`). Rank 0 merges the
            manifest after all ranks finished.

    Returns:
        This process's statistics (samples/tokens computed, seconds, tokens/s, samples skipped
        as already done, repaired shards, ...), plus `run` (totals over all ranks, also written
        to `extraction_run.json` in `out_dir`) and `manifest` (the merged manifest as a dict).

    Raises:
        TeacherCorpusMismatchError: the teacher's vocabulary or tokenizer is not the corpus's.
    """
    from kd_pipeline.core import modeling
    from kd_pipeline.core.corpus import TokenizedCorpus
    from kd_pipeline.core.topk_store import MANIFEST_NAME, ArtifactSource, Manifest, merge_manifests

    started = time.perf_counter()
    config = config or ExtractionConfig()
    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    corpus_where = "the corpus"
    if not isinstance(corpus, TokenizedCorpus):
        corpus_where = f"the corpus at {corpus}"
        corpus = TokenizedCorpus.load(corpus)

    # Refuse a mismatched teacher before spending time on its weights.
    teacher_config = json.loads((teacher_dir / "config.json").read_text(encoding="utf-8"))
    tokenizer = modeling.load_tokenizer(teacher_dir)
    teacher_tokenizer_hash = modeling.tokenizer_hash(tokenizer)
    text_config = teacher_config.get("text_config") or {}
    teacher_vocab = int(teacher_config.get("vocab_size") or text_config.get("vocab_size") or 0)
    check_teacher_matches_corpus(teacher_dir, teacher_vocab, len(tokenizer), teacher_tokenizer_hash,
                                 corpus.meta, corpus_where)

    identity = modeling.model_identity(teacher_dir)
    model, head, device, dtype = load_teacher_for_extraction(teacher_dir, config)
    if head.vocab_size != teacher_vocab:
        raise TeacherCorpusMismatchError("vocab_size", f"the teacher's LM head has {head.vocab_size} rows, its "
                                                       f"config.json says vocab_size {teacher_vocab}")
    source = ArtifactSource(
        teacher_path=str(teacher_dir),
        teacher_config_sha256=identity["config_sha256"],
        teacher_weights_sha256=identity["weights_sha256"],
        tokenizer_sha256=teacher_tokenizer_hash,
        vocab_size=head.vocab_size,
        k=config.k,
        capture_dtype=dtype_name(dtype),
        capture_temperature=config.temperature,
        corpus_fingerprint=corpus.fingerprint,
    )

    arrays = CorpusArrays.from_table(corpus.samples)
    plan = arrays.plan(config)
    mine = rank_share(plan, rank, world_size)
    if config.check_head and plan:
        check_head_path(model, head, arrays.input_ids(plan[0].rows[0]), device)

    repaired = _drop_bad_shards(out_dir) if rank == 0 else []
    _barrier(world_size)  # every rank opens its writer after the check (opening drops manifest.json)

    codec = config.codec_object()
    workers = config.resolved_encode_workers(device)
    encoder = _PrecomputedCodec(codec, workers) if workers else None
    writer, restarted = _open_writer(out_dir, source, encoder or codec, config, rank, world_size)
    done = writer.completed_sample_ids
    ids = arrays.sample_ids
    # A batch with any sample left runs whole (same batch, same numbers); done samples are skipped.
    todo = [batch for batch in mine if any(ids[row] not in done for row in batch.rows)]
    skipped = sum(1 for batch in mine for row in batch.rows if ids[row] in done)

    from tqdm.auto import tqdm

    progress = tqdm(total=sum(int(arrays.lengths[row]) for batch in todo for row in batch.rows), unit="tok",
                    unit_scale=True, dynamic_ncols=True, mininterval=1.0, desc=f"teacher top-k ({device.type})",
                    disable=not config.progress or rank != 0)
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
    seconds = stats["seconds"]
    stats.update(rank=rank, world_size=world_size, device=str(device), capture_dtype=dtype_name(dtype),
                 samples_skipped_done=skipped, repaired_shards=repaired, restarted=restarted,
                 seconds=round(seconds, 3), tokens_per_second=round(stats["tokens"] / seconds, 1) if seconds else None,
                 trained_tokens_per_second=round(stats["trained_tokens"] / seconds, 1) if seconds else None,
                 total_seconds=round(time.perf_counter() - started, 3))
    logger.info("teacher_logits rank %d/%d: %d samples, %d tokens (%d trained) in %.1f s = %.0f tok/s on %s %s; "
                "%d samples already done", rank, world_size, stats["samples"], stats["tokens"], stats["trained_tokens"],
                seconds, stats["tokens"] / max(seconds, 1e-9), device, dtype_name(dtype), skipped)

    all_stats = _gather(stats, world_size)
    _barrier(world_size)
    if world_size > 1 and rank == 0:
        merge_manifests(out_dir, world_size)
    _barrier(world_size)
    manifest = Manifest.read(out_dir / MANIFEST_NAME)
    run = summarize_runs(all_stats)
    if rank == 0:
        record_run(out_dir, run)
    return {**stats, "run": run, "manifest": manifest.to_dict()}


def record_run(out_dir: Path, run: dict, keep: int = 20) -> None:
    """Append this run's totals to `extraction_run.json` (`runs`, newest last; a resumed or
    repaired artifact has several, a re-run with nothing to do adds one with no tokens)."""
    from kd_pipeline.core.atomic import write_json_atomic

    path = Path(out_dir) / RUN_STATS_FILE
    runs: list = []
    try:
        runs = list(json.loads(path.read_text(encoding="utf-8")).get("runs", []))
    except (OSError, ValueError, AttributeError):
        pass
    write_json_atomic(path, {"runs": (runs + [{**run, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}])[-keep:]})


def last_runs(out_dir: str | os.PathLike) -> tuple[dict | None, dict | None]:
    """(latest run, latest run that computed tokens) from `extraction_run.json`."""
    try:
        runs = json.loads((Path(out_dir) / RUN_STATS_FILE).read_text(encoding="utf-8")).get("runs", [])
    except (OSError, ValueError, AttributeError):
        return None, None
    working = [run for run in runs if run.get("tokens")]
    return (runs[-1] if runs else None), (working[-1] if working else None)


def summarize_runs(all_stats: Sequence[Mapping[str, Any]]) -> dict:
    """Totals over ranks: tokens, trained tokens, wall seconds (slowest rank), tokens/s, and the
    teacher's target statistics over the samples computed in this run."""
    tokens = sum(s["tokens"] for s in all_stats)
    trained = sum(s["trained_tokens"] for s in all_stats)
    seconds = max((s["seconds"] for s in all_stats), default=0.0)
    in_topk = sum(s["target_in_topk"] for s in all_stats)
    nll = sum(s["target_nll_sum"] for s in all_stats)
    return {
        "world_size": len(all_stats),
        "device": all_stats[0]["device"] if all_stats else None,
        "capture_dtype": all_stats[0]["capture_dtype"] if all_stats else None,
        "samples_computed": sum(s["samples"] for s in all_stats),
        "samples_skipped_done": sum(s["samples_skipped_done"] for s in all_stats),
        "repaired_shards": sorted(name for s in all_stats for name in s["repaired_shards"]),
        "restarted": any(s["restarted"] for s in all_stats),
        "tokens": tokens,
        "padded_tokens": sum(s["padded_tokens"] for s in all_stats),
        "trained_tokens": trained,
        "seconds": seconds,
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "trained_tokens_per_second": round(trained / seconds, 1) if seconds else None,
        "target_in_topk_rate": round(in_topk / trained, 6) if trained else None,
        "teacher_target_nll": round(nll / trained, 6) if trained else None,
        "per_rank": [{key: s[key] for key in ("rank", "samples", "tokens", "trained_tokens", "seconds",
                                              "tokens_per_second")} for s in all_stats],
    }


# ---------------------------------------------------------------------------------------------
# Command line (for torchrun and for tests that kill a real extraction)
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kd_pipeline.core.extraction --teacher DIR --corpus DIR --out DIR [--params JSON]`;
    under `torchrun --nproc-per-node N ...` every rank extracts its share."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--teacher", required=True, help="teacher HF folder")
    parser.add_argument("--corpus", required=True, help="tokenized corpus folder")
    parser.add_argument("--out", required=True, help="artifact folder")
    parser.add_argument("--params", default="{}", help="ExtractionConfig fields as a JSON object")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = ExtractionConfig.from_params(json.loads(args.params))
    device = config.resolved_device()
    rank, world_size = distributed_from_env(device.type)
    try:
        result = extract_teacher_topk(args.teacher, args.corpus, args.out, config, rank=rank, world_size=world_size)
    finally:
        if world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(result["run"], sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
