"""A causal LM's decoder body and LM head, and the one policy for the logit transform its own
forward applies after the head.

Extraction, evaluation and training all take the final hidden states and apply the head
themselves (to trained rows only), so they must reproduce whatever `model.forward` does to the
head's output. Hugging Face causal LMs do one of: Granite divides by `config.logits_scaling`,
Cohere multiplies by `config.logit_scale`, Gemma 2/3 soft-cap with
`config.final_logit_softcapping` (`tanh(z / cap) * cap`). `head_transform` reads these;
extraction and evaluation apply it, and the training loss, which runs the bare head inside its
fused kernel, refuses a model that needs one (`require_plain_head`), naming the setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The causal LM's base decoder (hidden states) and its LM head."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    head = model.get_output_embeddings()
    if decoder is None or head is None:
        raise ValueError(f"{type(model).__name__}: cannot find the base decoder and the LM head")
    return decoder, head


@dataclass(frozen=True)
class HeadTransform:
    """The post-head logit transform of one model (None: that step is not applied)."""

    divide_by: float | None = None  # Granite: config.logits_scaling
    multiply_by: float | None = None  # Cohere: config.logit_scale
    softcap: float | None = None  # Gemma 2/3: config.final_logit_softcapping

    @property
    def settings(self) -> dict[str, float]:
        """The config settings that are in effect, by their config name."""
        named = {"logits_scaling": self.divide_by, "logit_scale": self.multiply_by,
                 "final_logit_softcapping": self.softcap}
        return {name: value for name, value in named.items() if value is not None}

    def apply_(self, logits: torch.Tensor) -> torch.Tensor:
        """Transform float logits in place (as the model's forward does) and return them."""
        if self.divide_by is not None:
            logits.div_(self.divide_by)
        if self.multiply_by is not None:
            logits.mul_(self.multiply_by)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits


def head_transform(model) -> HeadTransform:
    """The transform `model.forward` applies to the head's output (identity for Llama-likes)."""
    config = model.config
    scaling = getattr(config, "logits_scaling", None)
    scale = getattr(config, "logit_scale", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    return HeadTransform(
        divide_by=None if scaling in (None, 1, 1.0) else float(scaling),
        multiply_by=None if scale in (None, 1, 1.0) else float(scale),
        softcap=float(softcap) if softcap else None,
    )


def require_plain_head(model, what: str) -> None:
    """Refuse a model whose forward transforms the head's output, for a `what` that cannot."""
    settings = head_transform(model).settings
    if settings:
        names = ", ".join(f"config.{name}" for name in settings)
        raise ValueError(f"{type(model).__name__} sets {names}; {what} applies the plain lm_head only")
