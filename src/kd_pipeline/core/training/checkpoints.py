"""Resumable checkpoints of a training run: which checkpoint to resume from, and discarding those
of a different run (identified by the hash of everything that changes what is computed)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from kd_pipeline.core.atomic import canonical_json, write_json_atomic

logger = logging.getLogger(__name__)

RUN_IDENTITY_FILE = "run_identity.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else None


def last_complete_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The highest `checkpoint-N` folder holding `trainer_state.json` (the Trainer writes it last,
    so a run killed mid-save leaves a folder without it, which is skipped)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    complete = [(step, path) for path in directory.iterdir()
                if (step := checkpoint_step(path)) is not None and (path / "trainer_state.json").is_file()]
    return max(complete)[1] if complete else None


def is_finished(checkpoint: Path) -> bool:
    """Whether a checkpoint is the last step of its run (`global_step >= max_steps`)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return 0 < state.get("max_steps", 0) <= state.get("global_step", 0)


def run_identity(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(parts).encode("utf-8")).hexdigest()


def prepare_checkpoint_dir(directory: Path, identity: dict, resume: bool, is_main: bool) -> Path | None:
    """The checkpoint to resume from; checkpoints of a different run are removed (with a warning)."""
    record_path = directory / RUN_IDENTITY_FILE
    key = run_identity(identity)
    if directory.is_dir() and is_main:
        previous = json.loads(record_path.read_text()) if record_path.is_file() else None
        if previous is None or previous.get("key") != key or not resume:
            stale = [path for path in directory.iterdir() if checkpoint_step(path) is not None]
            if stale:
                changed = sorted(name for name in identity
                                 if previous is None or previous.get("identity", {}).get(name) != identity[name])
                logger.warning("distill: discarding %d checkpoint(s) in %s (%s)", len(stale), directory,
                               "resume disabled" if not resume else f"different run: {changed} changed")
                for path in stale:
                    shutil.rmtree(path, ignore_errors=True)
    if is_main:
        write_json_atomic(record_path, {"key": key, "identity": identity})
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # other ranks look only after the main one has cleaned up
    return last_complete_checkpoint(directory) if resume else None


def load_checkpoint_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Load a checkpoint's safetensors weights into `model` in place. A weight the checkpoint
    leaves out is accepted only when it is tied to one it holds (e.g. lm_head = embeddings)."""
    from safetensors.torch import load_file

    state = {}
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    names_of: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    untied = [name for name in missing
              if name not in parameters or not set(names_of[id(parameters[name])]) & set(state)]
    if untied or unexpected:
        raise RuntimeError(f"checkpoint {checkpoint} does not fit the student: missing {untied[:5]}, "
                           f"unexpected {list(unexpected)[:5]}")


#: Where accelerate writes a sharded (FSDP2 `SHARDED_STATE_DICT`) checkpoint's model state.
SHARDED_MODEL_DIR = "pytorch_model_fsdp_0"


def load_sharded_checkpoint_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Load the model state of a sharded checkpoint (accelerate's `torch.distributed.checkpoint`
    folder, `{"model": state_dict}`) into the unsharded `model`, whatever the number of ranks
    that wrote it (DCP reshards on load). Every rank must call it."""
    import torch.distributed.checkpoint as dcp

    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(Path(checkpoint) / SHARDED_MODEL_DIR))
    model.load_state_dict(state["model"])

