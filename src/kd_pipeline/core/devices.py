"""Device and dtype resolution from parameters, in one place: `auto`, `cpu`, `cuda`, `cuda:N`
for devices; `auto`, `float32`, `bfloat16`, `float16` (or a torch dtype) for dtypes."""

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


def resolve_dtype(dtype: torch.dtype | str, device: torch.device | None = None) -> torch.dtype:
    """A torch dtype from a dtype or its name; `auto` is bfloat16 on CUDA and float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unknown floating dtype {dtype!r} (use float32, bfloat16 or float16)")
    return resolved


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `bfloat16` (as manifests and reports record it)."""
    return str(dtype).removeprefix("torch.")
