"""Device and dtype resolution from parameters, in one place: `auto`, `cpu`, `cuda`, `cuda:N`
for devices; `auto`, `float32`, `bfloat16`, `float16` (or a torch dtype) for dtypes; and the one
check of whether a device computes in bfloat16 natively (`has_native_bf16`), which every `auto`
precision (extraction dtype, training precision) follows."""

from __future__ import annotations

import os

import torch

#: The floating dtypes a parameter may name.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_device_spec(spec: object) -> bool:
    """Whether `spec` is `auto`, `cpu`, `cuda` or `cuda:N`."""
    return isinstance(spec, str) and (
        spec in ("auto", "cpu", "cuda") or (spec.startswith("cuda:") and spec[5:].isdigit())
    )


def resolve_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """The device this process uses.

    `auto` is CUDA when available, else the CPU. `auto` and `cuda` take this process's GPU:
    `local_rank`, else `LOCAL_RANK` (set by torchrun), else 0. Anything else is `torch.device(spec)`.
    """
    if spec == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if spec in ("auto", "cuda"):
        index = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", index)
    return torch.device(spec)


def has_native_bf16(device: torch.device | str | None = None) -> bool:
    """Whether `device` (default: CUDA when available, else the CPU) runs bfloat16 matmuls natively.

    CUDA: `torch.cuda.is_bf16_supported()` (Ampere and later). CPU: AVX512-BF16 or AMX tiles, as
    torch's own oneDNN dispatch detects them; without them torch emulates bf16 on CPU, slower
    than float32, so `auto` stays float32 there. The environment variable
    `KD_PIPELINE_NATIVE_BF16=0` (or `1`) overrides the detection, e.g. to compare the two.
    """
    forced = os.environ.get("KD_PIPELINE_NATIVE_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    device = torch.device(device) if device is not None else resolve_device("auto")
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    return False


def resolve_dtype(dtype: torch.dtype | str, device: torch.device | None = None) -> torch.dtype:
    """A torch dtype from a dtype or its name; `auto` is bfloat16 where `device` has native bf16
    (`has_native_bf16`) and float32 elsewhere (and when no device is given)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device is not None and has_native_bf16(device) else torch.float32
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unknown floating dtype {dtype!r} (use float32, bfloat16 or float16)")
    return resolved


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `bfloat16` (as manifests and reports record it)."""
    return str(dtype).removeprefix("torch.")
