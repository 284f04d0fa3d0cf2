"""Settings of the teacher pass (parameters `teacher_logits`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import torch

from kd_pipeline.core.devices import DTYPES, is_device_spec, resolve_device, resolve_dtype
from kd_pipeline.core.models.device_map import check_device_map
from kd_pipeline.core.params import dataclass_from_params, is_number, require, require_bool, require_int


@dataclass(frozen=True)
class ExtractionConfig:
    """How the teacher pass runs (parameters `teacher_logits`).

    Attributes:
        k: Top-k entries stored per trained token (`capture.mode: topk`), or the most a
            `top_p` row stores.
        capture: What each row stores (`extraction.capture.CaptureConfig`): `{mode: topk}`
            (default), `{mode: top_p, p: 0.9}` or `{mode: sampled, draws: 32, seed: 0,
            proposal_temperature: null}`; a mapping, normalized to a `CaptureConfig`.
        codec: Artifact codec: `logquant_zstd` (the compact default; `compact` is an alias)
            or `raw` (exact reference), see `core.topk_store`.
        codec_settings: Codec options (e.g. `{step: 0.08}`), passed to the codec as given.
        batch_tokens: Budget of padded tokens per batch (batch size x longest sample).
        max_batch_size: Upper bound on samples per batch.
        shard_trained_tokens: Target trained tokens per shard file.
        dtype: `auto` (bfloat16 where the device has native bf16, `devices.has_native_bf16`; else
            float32), `float32`, `bfloat16` or `float16`. The LM head, log-softmax and top-k run
            in float32 either way.
        temperature: Capture temperature: logits are divided by it before normalization.
        logz_temperatures: Teacher temperatures at which every trained row also stores its
            full-vocabulary log-normalizer (a few bytes per row), so that training can temper
            the stored top-k exactly, tail included, at `target_logits_scale =
            temperature / t` for each `t` here. Normalized to a sorted tuple that includes
            `temperature`. Ratios 2, 1 and 1/2 to `temperature` cost one fused reduction each;
            others one `pow` pass over the row's logits each (see docs/benchmarks.md).
            `sampled` adds its proposal temperature.
        device: `auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`.
        head_chunk_rows: Trained rows per LM-head chunk; 0 = auto (CPU 1024, CUDA 8192).
        check_head: Check once, on a short slice, that the head path equals the model's own
            logits (guards against architectures with extra logit post-processing).
        encode_workers: Threads encoding samples while the teacher runs; -1 = auto (none on
            CPU, where the forward already uses every core; up to 8 on CUDA).
        resume: Keep verified shards of an earlier run with the same settings and skip their
            samples (False: start over).
        progress: Show a tqdm progress bar (rank 0 only).
        device_map: Split the teacher across devices (accelerate big-model inference): `auto`,
            `balanced`, `balanced_low_0`, `sequential` or an explicit `{module: device}` map
            (GPU index, `cpu`, `disk`); None loads it whole on `device`. Under torchrun each rank
            holds its own split copy (see `models.device_map`).
        max_memory: With `device_map`: bytes or sizes per device (`{0: 70GiB, cpu: 200GiB}`);
            None: each rank gets its share of the node's GPUs.
        offload_folder: With `device_map`: where `disk` modules' weights go when the checkpoint
            cannot be read in place (safetensors are read in place).
    """

    k: int = 64
    capture: Any = field(default_factory=dict)
    codec: str = "logquant_zstd"
    codec_settings: Mapping[str, Any] = field(default_factory=dict)
    batch_tokens: int = 8192
    max_batch_size: int = 64
    shard_trained_tokens: int = 32768
    dtype: str = "auto"
    temperature: float = 1.0
    logz_temperatures: tuple[float, ...] = (0.5, 1.0, 2.0)
    device: str = "auto"
    head_chunk_rows: int = 0
    check_head: bool = True
    encode_workers: int = -1
    resume: bool = True
    progress: bool = True
    device_map: str | Mapping[str, Any] | None = None
    max_memory: Mapping[Any, Any] | None = None
    offload_folder: str | None = None

    def __post_init__(self):
        what = "teacher_logits"
        for name in ("k", "batch_tokens", "max_batch_size", "shard_trained_tokens"):
            require_int(what, name, getattr(self, name), minimum=1)
        require_int(what, "head_chunk_rows", self.head_chunk_rows, minimum=0)
        require(isinstance(self.codec, str) and bool(self.codec), what, "codec", "a codec name", self.codec)
        require(isinstance(self.codec_settings, Mapping), what, "codec_settings", "a mapping", self.codec_settings)
        require(self.dtype == "auto" or self.dtype in DTYPES, what, "dtype", f"'auto' or one of {sorted(DTYPES)}",
                self.dtype)
        require(is_number(self.temperature) and math.isfinite(self.temperature) and self.temperature > 0, what,
                "temperature", "a finite number > 0", self.temperature)
        temperatures = self.logz_temperatures
        require(not isinstance(temperatures, (str, bytes, Mapping)) and hasattr(temperatures, "__iter__")
                and all(is_number(t) and math.isfinite(t) and t > 0 for t in temperatures),
                what, "logz_temperatures", "a list of finite numbers > 0", temperatures)
        require(is_device_spec(self.device), what, "device", "'auto', 'cpu', 'cuda' or 'cuda:N'", self.device)
        require_int(what, "encode_workers", self.encode_workers, minimum=-1)
        for name in ("check_head", "resume", "progress"):
            require_bool(what, name, getattr(self, name))
        check_device_map(self.device_map, self.max_memory, self.offload_folder, what)
        for name in ("device_map", "max_memory"):
            if isinstance(getattr(self, name), Mapping):
                object.__setattr__(self, name, dict(getattr(self, name)))
        # Frozen dataclass: normalize once (alias, plain dict, float).
        from kd_pipeline.core.topk_store import DEFAULT_CODEC, get_codec

        object.__setattr__(self, "codec", DEFAULT_CODEC if self.codec == "compact" else self.codec)
        object.__setattr__(self, "codec_settings", dict(self.codec_settings))
        object.__setattr__(self, "temperature", float(self.temperature))
        from kd_pipeline.core.extraction.capture import CaptureConfig

        capture = self.capture
        require(isinstance(capture, (Mapping, CaptureConfig)), what, "capture", "a mapping", capture)
        capture = capture if isinstance(capture, CaptureConfig) else CaptureConfig.from_params(capture)
        object.__setattr__(self, "capture", capture)
        held = {float(t) for t in temperatures} | {self.temperature}
        if capture.mode == "sampled":  # the estimator's weights need the proposal's log-normalizer
            held.add(capture.proposal(self.temperature))
        object.__setattr__(self, "logz_temperatures", tuple(sorted(held)))
        try:
            get_codec(self.codec, self.codec_settings)
        except ValueError as error:
            raise ValueError(f"teacher_logits.codec / codec_settings: {error}") from None

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> "ExtractionConfig":
        return dataclass_from_params(cls, params, "teacher_logits")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"capture": self.capture.to_dict()}

    @property
    def row_width(self) -> int:
        """The artifact's `k`: entries per row in memory (`capture.draws` for `sampled`)."""
        return self.capture.row_width(self.k)

    def resolved_device(self, local_rank: int | None = None) -> torch.device:
        """The device this process uses; under torchrun each CUDA rank takes its LOCAL_RANK GPU."""
        return resolve_device(self.device, local_rank)

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        return resolve_dtype(self.dtype, device)

    @property
    def logz_scales(self) -> tuple[float, ...]:
        """`temperature / t` per `logz_temperatures` entry: the scale that tempers the stored
        distribution to `t` (the same as the manifest's `ArtifactSource.logz_scales`)."""
        return tuple(self.temperature / t for t in self.logz_temperatures)

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
