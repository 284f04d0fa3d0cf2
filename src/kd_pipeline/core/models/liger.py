"""Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) for the student, through Hugging Face's own
switch (`TrainingArguments(use_liger_kernel=..., liger_kernel_config=...)`), with our `auto`."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

#: `auto` (on for a CUDA device), `on` (error without CUDA) or `off`.
LIGER_MODES = ("auto", "on", "off")

#: What the Trainer patches in. The (fused linear) cross-entropy never: the KD loss takes the
#: final hidden states and does its own chunked lm_head projection.
LIGER_KERNEL_CONFIG = {"rms_norm": True, "rope": True, "swiglu": True, "cross_entropy": False,
                       "fused_linear_cross_entropy": False}


def liger_kernel_arguments(mode: str, model_type: str | None, device: str | torch.device = "cpu") -> dict:
    """The `TrainingArguments` that switch Liger on or off for `mode` on `device`.

    Liger's kernels run on CUDA only (every Triton op fails on CPU), so `auto` means on for a
    CUDA device and off otherwise. Note that Liger's RoPE patch replaces the function in the
    architecture's transformers module, so it applies to every model of that architecture in
    the process.

    Returns:
        `{"use_liger_kernel": True, "liger_kernel_config": LIGER_KERNEL_CONFIG}` or
        `{"use_liger_kernel": False}`.

    Raises:
        ValueError: Unknown mode; `on` without a CUDA device; `on` for an architecture Liger does
            not support.
    """
    off = {"use_liger_kernel": False}
    if mode not in LIGER_MODES:
        raise ValueError(f"liger: mode {mode!r} is not one of {list(LIGER_MODES)}")
    device = torch.device(device)
    on_cuda = device.type == "cuda" and torch.cuda.is_available()
    if mode == "off":
        logger.info("liger: off (configured)")
        return off
    if not on_cuda:
        if mode == "on":
            raise ValueError(
                f"liger: on requires CUDA (device is {device}, CUDA available: {torch.cuda.is_available()}); "
                "use liger: auto or off"
            )
        logger.info("liger: off on %s (Liger's Triton kernels run only on CUDA)", device)
        return off

    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        message = f"liger: no Liger kernels for architecture {model_type!r}"
        if mode == "on":
            raise ValueError(f"{message}; supported: {sorted(MODEL_TYPE_TO_APPLY_LIGER_FN)}")
        logger.warning("%s; running unpatched", message)
        return off
    logger.info("liger: the Trainer patches %s (rms_norm, rope, swiglu) on %s", model_type, device)
    return {"use_liger_kernel": True, "liger_kernel_config": dict(LIGER_KERNEL_CONFIG)}
