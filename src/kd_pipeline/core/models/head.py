"""A causal LM's decoder body and LM head, and the one policy for the logit transform its own
forward applies after the head.

Extraction, evaluation and training all take the final hidden states and apply the head
themselves (to trained rows only), so they must reproduce whatever `model.forward` does to the
head's output. Hugging Face causal LMs do one of: Granite divides by `config.logits_scaling`,
Cohere multiplies by `config.logit_scale`, Gemma 2/3 soft-cap with
`config.final_logit_softcapping` (`tanh(z / cap) * cap`). Some heads are also padded past the
tokenizer (`config.vocab_size > len(tokenizer)`): those rows are not tokens, and no stage may
give them probability mass. `head_transform` reads all of this; extraction and evaluation
apply it to their chunk of logits (`apply_`), and the fused training loss applies the same
`apply_` inside its kernel, with the chain rule through `linear_factor` and `softcap_slope`.
"""

from __future__ import annotations

import math
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
    vocab_size: int | None = None  # real tokens (len(tokenizer)) of a head padded beyond them

    @property
    def settings(self) -> dict[str, float]:
        """The config settings that are in effect, by their config name."""
        named = {"logits_scaling": self.divide_by, "logit_scale": self.multiply_by,
                 "final_logit_softcapping": self.softcap}
        return {name: value for name, value in named.items() if value is not None}

    @property
    def is_identity(self) -> bool:
        return not self.settings and self.vocab_size is None

    @property
    def linear_factor(self) -> float:
        """The scaling before the soft-cap, `multiply_by / divide_by` (1.0 when neither is set)."""
        return (self.multiply_by or 1.0) / (self.divide_by or 1.0)

    def apply_(self, logits: torch.Tensor) -> torch.Tensor:
        """Transform float logits in place (as the model's forward does) and return them; the
        columns of padded rows (>= vocab_size) become -inf (no probability mass)."""
        if self.divide_by is not None:
            logits.div_(self.divide_by)
        if self.multiply_by is not None:
            logits.mul_(self.multiply_by)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        if self.vocab_size is not None and logits.shape[-1] > self.vocab_size:
            logits[..., self.vocab_size:] = -math.inf
        return logits

    def softcap_slope(self, transformed: torch.Tensor) -> torch.Tensor | None:
        """d(soft-cap output) / d(its input) from the output `u = cap * tanh(x / cap)`:
        `1 - (u / cap)**2` (a new tensor); None without a soft-cap."""
        if self.softcap is None:
            return None
        ratio = transformed / self.softcap
        return 1.0 - ratio * ratio


def head_transform(model, num_tokens: int | None = None) -> HeadTransform:
    """The transform `model.forward` applies to the head's output (identity for Llama-likes),
    plus the real vocabulary: with `num_tokens = len(tokenizer)` below the head's rows, the
    rows from `num_tokens` on are padding (never a token, never given probability mass)."""
    config = model.config
    scaling = getattr(config, "logits_scaling", None)
    scale = getattr(config, "logit_scale", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    rows = int(model.get_output_embeddings().weight.shape[0])
    if num_tokens is not None and not 1 <= int(num_tokens) <= rows:
        raise ValueError(f"{type(model).__name__}: the tokenizer has {num_tokens} tokens but the LM head only "
                         f"{rows} rows")
    return HeadTransform(
        divide_by=None if scaling in (None, 1, 1.0) else float(scaling),
        multiply_by=None if scale in (None, 1, 1.0) else float(scale),
        softcap=float(softcap) if softcap else None,
        vocab_size=None if num_tokens is None or int(num_tokens) == rows else int(num_tokens),
    )
