"""The student: depth-pruned from the teacher (its layers, embeddings, norm and head), randomly
initialized from a config, or loaded from a local folder; it always shares the teacher's vocabulary."""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from kd_pipeline.core.models.identity import tokenizer_hash
from kd_pipeline.core.models.loading import (
    has_tokenizer_files,
    load_causal_lm,
    load_tokenizer,
    model_from_config_dict,
    require_local_dir,
    seeded_model_from_config,
)
from kd_pipeline.core.models.teacher import read_teacher_record
from kd_pipeline.core.params import (
    check_unused_fields,
    dataclass_from_params,
    require_bool,
    require_choice,
    require_int,
)

logger = logging.getLogger(__name__)

STUDENT_METHODS = ("from_pretrained", "from_config", "prune_teacher")
#: The mutually exclusive ways `prune_teacher` is told which teacher layers to keep.
LAYER_CHOICES = ("keep_layers", "keep_every", "num_layers", "drop_layers")

#: The fraction of teacher layers `prune_teacher` keeps when no layer choice is configured.
DEFAULT_PRUNE_FRACTION = 1 / 3

# Per-layer lists in a config that must be cut down with the layers when pruning.
_PER_LAYER_CONFIG_KEYS = ("layer_types",)


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
        what = "distill.student_init"
        require_choice(what, "method", self.method, STUDENT_METHODS)
        check_unused_fields(self, self._USED_FIELDS[self.method], "method", "student")
        if self.method == "from_pretrained" and not self.path:
            raise ValueError("student method 'from_pretrained' needs `path` (a local HF folder)")
        if self.method == "from_config" and not isinstance(self.config, Mapping):
            raise ValueError("student method 'from_config' needs `config` (an HF config dict with model_type)")
        require_int(what, "seed", self.seed, allow_none=True)
        require_bool(what, "trust_remote_code", self.trust_remote_code)
        chosen = [name for name in LAYER_CHOICES if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise ValueError(f"prune_teacher takes one of {', '.join(LAYER_CHOICES)}; got {chosen}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> "StudentInit":
        """Build from a params dict (e.g. `distill.student`); unknown keys are an error."""
        return dataclass_from_params(cls, params, "distill.student_init")


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
    student = seeded_model_from_config(student_config, seed=0)
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


def init_student(init: StudentInit, teacher_dir: str | os.PathLike, student_tokenizer_dir: str | os.PathLike | None = None):
    """Create the student for the prepared teacher at `teacher_dir`.

    The student uses the teacher's tokenizer, except a `from_pretrained` student folder that has
    its own tokenizer, which is used if it has as many tokens as the teacher's. In every case the
    student's vocab_size must equal the teacher's.

    With `student_tokenizer_dir` (cross-tokenizer distillation) the student has that tokenizer
    instead and its vocab_size is that tokenizer's size; it cannot be a pruned teacher.

    Args:
        init: How to initialize.
        teacher_dir: A folder made by `prepare_teacher`.
        student_tokenizer_dir: The student's own tokenizer folder, or None.

    Returns:
        `(model, tokenizer)`: a float32 model on CPU in eval mode, and its tokenizer.
    """
    from transformers import AutoConfig

    if student_tokenizer_dir is not None:
        return _init_student_with_own_tokenizer(init, student_tokenizer_dir)
    teacher_dir = require_local_dir(teacher_dir, "teacher")
    # A teacher prepared from a folder with its own code needs that code to load again.
    record = read_teacher_record(teacher_dir) or {}
    teacher_trusts_code = bool(record.get("source", {}).get("trust_remote_code", False))
    teacher_tokenizer = load_tokenizer(teacher_dir, trust_remote_code=teacher_trusts_code)
    teacher_config = AutoConfig.from_pretrained(teacher_dir, trust_remote_code=teacher_trusts_code)
    teacher_where = f"teacher {teacher_dir}"

    if init.method == "from_pretrained":
        model = load_causal_lm(init.path, trust_remote_code=init.trust_remote_code)
        _check_vocab_sizes(model.config.vocab_size, f"student {init.path}", teacher_config.vocab_size, teacher_where)
        tokenizer = teacher_tokenizer
        if has_tokenizer_files(Path(init.path)):
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
        model = seeded_model_from_config(model_from_config_dict(config_dict, "student"), init.seed or 0)
        logger.info("student: random %s init from config (seed %d)", model.config.model_type, init.seed or 0)
        return model, teacher_tokenizer

    teacher = load_causal_lm(teacher_dir, trust_remote_code=teacher_trusts_code)
    keep = select_layers(teacher.config.num_hidden_layers, init.keep_layers, init.keep_every, init.num_layers,
                         init.drop_layers)
    student = prune_causal_lm(teacher, keep)
    logger.info("student: teacher pruned to %d of %d layers %s", len(keep), teacher.config.num_hidden_layers, keep)
    return student, teacher_tokenizer


def _init_student_with_own_tokenizer(init: StudentInit, tokenizer_dir: str | os.PathLike):
    tokenizer = load_tokenizer(tokenizer_dir)
    where = f"student tokenizer {tokenizer_dir}"
    if init.method == "prune_teacher":
        raise ValueError(f"a student with its own tokenizer ({tokenizer_dir}) cannot be a pruned teacher (its "
                         "vocabulary differs): use student_init.method from_config or from_pretrained")
    if init.method == "from_pretrained":
        model = load_causal_lm(init.path, trust_remote_code=init.trust_remote_code)
        _check_own_vocab(model.config.vocab_size, f"student {init.path}", len(tokenizer), where)
        return model, tokenizer
    config_dict = dict(init.config)
    config_dict.setdefault("vocab_size", len(tokenizer))
    _check_own_vocab(config_dict["vocab_size"], "student config", len(tokenizer), where)
    model = seeded_model_from_config(model_from_config_dict(config_dict, "student"), init.seed or 0)
    logger.info("student: random %s init from config (seed %d), own tokenizer %s", model.config.model_type,
                init.seed or 0, tokenizer_dir)
    return model, tokenizer


def _check_own_vocab(vocab_size: int, model_where: str, tokenizer_size: int, tokenizer_where: str) -> None:
    if vocab_size != tokenizer_size:
        raise ValueError(f"student vocab_size {vocab_size} ({model_where}) does not match the {tokenizer_size} "
                         f"tokens of its {tokenizer_where}")
