"""Greedy generations of fixed chat prompts, for reading a student's outputs beside the teacher's."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from kd_pipeline.core.params import dataclass_from_params, require, require_bool, require_int

#: The default prompts: three KJV continuations (the training distribution) and one off-topic.
DEFAULT_PROMPTS = (
    "Continue this passage from the King James Bible.\n\nIn the beginning God created the heaven and the earth.",
    "Here is the beginning of a passage from the King James Version. Write how it continues.\n\n"
    "The LORD is my shepherd; I shall not want.",
    "What comes next in this passage of scripture? Continue it.\n\n"
    "Blessed are the poor in spirit: for theirs is the kingdom of heaven.",
    "Write one sentence about the sea.",
)

@dataclass(frozen=True)
class GenerationConfig:
    """Greedy generations for fixed prompts (`evaluate.generation` params).

    Attributes:
        prompts: user messages, each rendered as a one-turn chat with the tokenizer's chat
            template and the generation prompt.
        max_new_tokens: tokens generated per prompt (stops earlier at EOS).
        system_prompt: optional system message put before each prompt.
        include_teacher: also generate with the teacher, for side-by-side reading.
    """

    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_new_tokens: int = 64
    system_prompt: str | None = None
    include_teacher: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        require(all(isinstance(prompt, str) and prompt for prompt in self.prompts), "evaluate.generation", "prompts",
                "non-empty strings", self.prompts)
        require_int("evaluate.generation", "max_new_tokens", self.max_new_tokens, minimum=1)
        require(self.system_prompt is None or isinstance(self.system_prompt, str), "evaluate.generation",
                "system_prompt", "a string or null", self.system_prompt)
        require_bool("evaluate.generation", "include_teacher", self.include_teacher)

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> "GenerationConfig":
        return dataclass_from_params(cls, params, "evaluate.generation")


def chat_prompt_ids(tokenizer, prompt: str, system_prompt: str | None = None) -> list[int]:
    """A one-turn user chat rendered with the tokenizer's chat template + generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("generations use the chat format, but the tokenizer has no chat template")
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def generate_greedy(model, tokenizer, config: GenerationConfig) -> list[str]:
    """Greedy completions (decoded, special tokens dropped) of each prompt, one prompt at a time."""
    from transformers import GenerationConfig as HFGenerationConfig

    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # A fresh config: the model's own may carry sampling defaults (temperature, top_p).
    hf_config = HFGenerationConfig(do_sample=False, max_new_tokens=config.max_new_tokens, eos_token_id=eos,
                                   pad_token_id=pad)
    outputs = []
    for prompt in config.prompts:
        ids = torch.tensor([chat_prompt_ids(tokenizer, prompt, config.system_prompt)], dtype=torch.long, device=device)
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=hf_config)
        outputs.append(tokenizer.decode(generated[0, ids.shape[1]:].tolist(), skip_special_tokens=True))
    return outputs


def format_generations(config: GenerationConfig, completions: Mapping[str, Sequence[str]]) -> str:
    """Plain text: each prompt followed by each model's completion (`completions`: model -> list)."""
    out = io.StringIO()
    out.write(f"# Greedy generations (chat format, max_new_tokens={config.max_new_tokens})\n")
    if config.system_prompt:
        out.write(f"# system: {config.system_prompt}\n")
    for index, prompt in enumerate(config.prompts):
        out.write(f"\n## Prompt {index + 1}\n{prompt}\n")
        for name, texts in completions.items():
            text = texts[index]
            # A whitespace-only completion (an untrained model's newlines) would read as empty.
            shown = text.rstrip() if text.strip() else f"(whitespace only: {text!r})"
            out.write(f"\n### {name}\n{shown}\n")
    return out.getvalue()


def generate_side_by_side(folders: Mapping[str, str | os.PathLike], config: GenerationConfig) -> str:
    """Greedy completions of every prompt by each model folder (`name -> folder`), as text."""
    from kd_pipeline.core.models.loading import load_causal_lm, load_tokenizer

    completions = {}
    for name, folder in folders.items():
        model, tokenizer = load_causal_lm(folder), load_tokenizer(folder)
        completions[name] = generate_greedy(model, tokenizer, config)
    return format_generations(config, completions)
