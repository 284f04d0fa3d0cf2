"""FSDP2 around `StudentWithLoss`: the HF `fsdp` / `fsdp_config` settings, `fully_shard` without a
Trainer (tests, benchmarks), saving a sharded student, and running accelerate's FSDP path on CPU
for tests and dry runs."""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch

from kd_pipeline.core.training.loss_module import StudentWithLoss


def shard_student(model: StudentWithLoss, *, mesh=None, reshard_after_forward: bool = True,
                  head_unit: bool = False, mp_policy=None) -> StudentWithLoss:
    """Apply FSDP2 `fully_shard` as accelerate's `fsdp2_prepare_model` does, without a Trainer.

    One FSDP group per decoder layer (`_no_split_modules`), then the root (embeddings, final norm
    and head; FSDP keeps the root gathered between forward and backward). `head_unit` shards an
    untied head as a unit of its own instead (the path where `gathered_head_parameters` gathers).
    For code that runs FSDP2 without the HF Trainer: tests, benchmarks.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    layer_names = set(model._no_split_modules or ())
    if not layer_names:
        raise ValueError(f"{type(model.student).__name__} names no decoder layer class (_no_split_modules)")
    for module in list(model.modules()):
        if type(module).__name__ in layer_names:
            fully_shard(module, reshard_after_forward=reshard_after_forward, **kwargs)
    head = model.student.get_output_embeddings()
    if head_unit:
        if head.weight is model.student.get_input_embeddings().weight:
            raise ValueError("a tied lm_head shares its weight with the embeddings: it stays in the root group")
        fully_shard(head, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, **kwargs)  # the root: reshard_after_forward=None resolves to False
    return model


def unsharded_copy(student: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (non-FSDP) copy of `student` holding the gathered full `state_dict`, to save with
    `save_pretrained` on one rank: `save_pretrained` on the sharded student itself would run
    DTensor collectives (tied-weight checks) on that rank alone and hang.

    Built on the meta device and filled by assignment, so its weights are `state_dict`'s tensors
    (no second copy)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        copy = type(student)(student.config)
    missing, unexpected = copy.load_state_dict(state_dict, strict=False, assign=True)
    tied = {name for name in missing if name.endswith("lm_head.weight")} if student.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"gathered student state dict does not fit {type(student).__name__}: missing "
                           f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    copy.tie_weights()
    copy.generation_config = student.generation_config
    return copy.eval()


# ---- HF Trainer / accelerate ----------------------------------------------------------------

#: `fsdp_config` defaults: FSDP2, parameters resharded after each layer's forward (ZeRO-3), and
#: checkpoints written by every rank as its own shard (torch.distributed.checkpoint).
FSDP_CONFIG_DEFAULTS = {"version": 2, "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"}


def fsdp_training_arguments(fsdp, fsdp_config) -> dict:
    """The HF `fsdp` / `fsdp_config` of `distill.trainer`, with `FSDP_CONFIG_DEFAULTS` under the
    given `fsdp_config` ({} when `fsdp` is off: DDP).

    Raises:
        ValueError: `fsdp_config` without `fsdp`, a non-mapping `fsdp_config`, or an FSDP version
            other than 2.
    """
    if not fsdp:
        if fsdp_config:
            raise ValueError("distill.trainer.fsdp_config is set but fsdp is off: set fsdp: true to shard")
        return {}
    if fsdp_config is not None and not isinstance(fsdp_config, Mapping):
        raise ValueError(f"distill.trainer.fsdp_config must be a mapping, got {fsdp_config!r}")
    config = {**FSDP_CONFIG_DEFAULTS, **(fsdp_config or {})}
    if str(config["version"]) != "2":
        raise ValueError(f"distill.trainer.fsdp_config.version must be 2 (FSDP2, fully_shard), got "
                         f"{config['version']!r}")
    return {"fsdp": fsdp, "fsdp_config": config}


@contextlib.contextmanager
def accelerate_fsdp_on_cpu() -> Iterator[None]:
    """Let accelerate run FSDP on CPU processes (gloo), for CPU tests and dry runs only.

    accelerate 1.15 turns its FSDP plugin on only for accelerator device types: CPU processes
    silently get DDP. Inside this context an `AcceleratorState` built with an FSDP plugin on
    CPU processes is switched to `DistributedType.FSDP`, so that the Trainer's own FSDP2 path
    (`fsdp2_prepare_model`, sharded checkpoints) runs; `fully_shard` itself works on CPU.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.fsdp_plugin = fsdp_plugin
            # Every later AcceleratorState() copies PartialState's fields over its own: set both.
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init
    try:
        yield
    finally:
        AcceleratorState.__init__ = original
