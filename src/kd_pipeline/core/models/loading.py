"""Loading models and tokenizers from local Hugging Face folders, never from a hub.

Every path is checked to be a local folder before transformers sees it, so a typo can never turn
into a download attempt; weights are safetensors only.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from kd_pipeline.core.devices import resolve_dtype

logger = logging.getLogger(__name__)

#: Files of an HF folder that make up a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
)


def require_local_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path if it is an existing folder; otherwise a clear error (and no hub lookup)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist (only local folders are used, never a hub)")
    return folder


def log_ignored_custom_code(folder: Path, config_name: str, auto_class: str, loaded: Any,
                            trust_remote_code: bool) -> None:
    """Warn when a folder's `auto_map` names its own code that was not run.

    With trust_remote_code off, transformers loads the built-in class of a known `model_type`
    and silently ignores `auto_map`: the folder's author may have meant different code (other
    layers, another forward), so the substitution is said out loud.
    """
    if trust_remote_code:
        return
    try:
        config = json.loads((folder / config_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not auto_map:
        return
    custom = auto_map.get(auto_class, auto_map) if isinstance(auto_map, dict) else auto_map
    model_type = config.get("model_type")
    logger.warning("%s: custom code ignored: %s auto_map names %s (%s), but trust_remote_code is off, so the "
                   "built-in %s%s was loaded instead; set trust_remote_code: true for this folder only if you "
                   "trust its code", folder, config_name, custom, auto_class, type(loaded).__name__,
                   f" for model_type {model_type!r}" if model_type else "")



def load_causal_lm(
    path: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    device_map: str | Mapping[str, Any] | None = None,
    max_memory: Mapping[Any, Any] | None = None,
    offload_folder: str | os.PathLike | None = None,
):
    """Load a causal LM from a local HF folder (safetensors weights only), in eval mode.

    Args:
        path: The model folder.
        dtype: Parameter dtype (a torch dtype or its name).
        device: Where to put the model (ignored with `device_map`).
        trust_remote_code: Allow the folder's own modeling code.
        device_map, max_memory, offload_folder: split the model across devices with
            accelerate's big-model inference instead (see `models.device_map`).

    Returns:
        The `PreTrainedModel`.
    """
    from transformers import AutoModelForCausalLM

    from kd_pipeline.core.models.device_map import split_loading_kwargs

    folder = require_local_dir(path, "model")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model folder {folder} has no config.json")
    split = split_loading_kwargs(device_map, max_memory, offload_folder) if device_map is not None else {}
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=resolve_dtype(dtype), use_safetensors=True, trust_remote_code=trust_remote_code, **split
    )
    log_ignored_custom_code(folder, "config.json", "AutoModelForCausalLM", model, trust_remote_code)
    return (model if split else model.to(device)).eval()


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """Load the tokenizer (chat template included) from a local folder."""
    from transformers import AutoTokenizer

    folder = require_local_dir(path, "tokenizer")
    if not has_tokenizer_files(folder):
        raise FileNotFoundError(f"tokenizer folder {folder} holds no tokenizer files (e.g. tokenizer.json)")
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    log_ignored_custom_code(folder, "tokenizer_config.json", "AutoTokenizer", tokenizer, trust_remote_code)
    return tokenizer


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def model_from_config_dict(config: Mapping[str, Any], what: str):
    """An HF `PretrainedConfig` from a plain dict holding `model_type`."""
    from transformers import AutoConfig

    config = dict(config)
    model_type = config.pop("model_type", None)
    if not model_type:
        raise ValueError(f"{what} config needs `model_type` (e.g. 'llama')")
    try:
        return AutoConfig.for_model(model_type, **config)
    except (ValueError, KeyError) as error:
        raise ValueError(f"{what} config: {error}") from error


def seeded_model_from_config(config, seed: int):
    """A randomly initialized causal LM, the same for the same config and seed.

    The global RNG is forked so that initializing a model does not shift the random stream of
    whatever runs next (data shuffling, dropout).
    """
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.float().eval()


def random_causal_lm(config: Mapping[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu"):
    """A seeded random causal LM from a config dict with `model_type` (benchmarks, GPU checks)."""
    model = seeded_model_from_config(model_from_config_dict(config, "random model"), seed)
    return model.to(device=device, dtype=dtype).eval()
