"""Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) patched into a student on CUDA."""

from __future__ import annotations

import inspect
import logging

import torch

logger = logging.getLogger(__name__)

#: `auto` (on for a CUDA device), `on` (error without CUDA) or `off`.
LIGER_MODES = ("auto", "on", "off")


def apply_liger_kernels(model, mode: str = "auto", device: str | torch.device = "cpu") -> bool:
    """Patch the model's architecture with Liger's Triton kernels (RMSNorm, RoPE, SwiGLU).

    Liger's kernels run on CUDA only (every Triton op fails on CPU), so `auto` means on for a
    CUDA device and off otherwise. The fused-linear cross-entropy is never patched in: the KD
    loss takes the final hidden states and does its own chunked lm_head projection. Note that
    Liger's RoPE patch replaces the function in the architecture's transformers module, so it
    applies to every model of that architecture in the process.

    Args:
        model: The model to patch in place.
        mode: `auto` | `on` | `off`.
        device: The device the model runs on.

    Returns:
        Whether the kernels were applied.

    Raises:
        ValueError: Unknown mode; `on` without a CUDA device; `on` for an architecture Liger does
            not support.
    """
    if mode not in LIGER_MODES:
        raise ValueError(f"liger: mode {mode!r} is not one of {list(LIGER_MODES)}")
    device = torch.device(device)
    on_cuda = device.type == "cuda" and torch.cuda.is_available()
    if mode == "off":
        logger.info("liger: off (configured)")
        return False
    if not on_cuda:
        if mode == "on":
            raise ValueError(
                f"liger: on requires CUDA (device is {device}, CUDA available: {torch.cuda.is_available()}); "
                "use liger: auto or off"
            )
        logger.info("liger: off on %s (Liger's Triton kernels run only on CUDA)", device)
        return False

    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(model.config, "model_type", None)
    apply_fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply_fn is None:
        message = f"liger: no Liger kernels for architecture {model_type!r}"
        if mode == "on":
            raise ValueError(f"{message}; supported: {sorted(MODEL_TYPE_TO_APPLY_LIGER_FN)}")
        logger.warning("%s; running unpatched", message)
        return False
    wanted = {
        "rms_norm": True, "rope": True, "swiglu": True,
        "cross_entropy": False, "fused_linear_cross_entropy": False,
    }
    accepted = inspect.signature(apply_fn).parameters
    apply_fn(model=model, **{key: value for key, value in wanted.items() if key in accepted})
    logger.info("liger: patched %s (rms_norm, rope, swiglu) on %s", model_type, device)
    return True
