"""A teacher larger than one device: split across devices with accelerate's big-model inference
(`from_pretrained(device_map=..., max_memory=...)`, see `loading.load_causal_lm`), for the
extraction pass.

`device_map` is `auto` (or `balanced`, `balanced_low_0`, `sequential`: accelerate fills the
devices in `max_memory` in order) or an explicit `{module name: device}` map whose devices are
GPU indices, `cpu` or `disk`. Modules on `cpu`/`disk` are offloaded: accelerate's hooks move
their weights to the execution device when the module runs (`disk` reads them from the
checkpoint's safetensors, or from `offload_folder`).

Data parallel on top: each torchrun rank loads its own copy split across its group of GPUs.
With `device_map` set and no `max_memory`, a rank's group is `GPUs / LOCAL_WORLD_SIZE`
consecutive GPUs (one rank per node: all of the node's GPUs); an explicit `max_memory` is used
as given.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping

import torch

#: The `device_map` strategies accelerate computes itself.
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map: Any, max_memory: Any, offload_folder: Any, where: str = "teacher_logits") -> None:
    """Raise a ValueError naming the field when `device_map` / `max_memory` / `offload_folder` are malformed."""
    if device_map is not None:
        if isinstance(device_map, str):
            if device_map not in STRATEGIES:
                raise ValueError(f"{where}.device_map must be one of {list(STRATEGIES)} or a mapping "
                                 f"{{module: device}}, got {device_map!r}")
        elif isinstance(device_map, Mapping):
            for module, device in device_map.items():
                if not isinstance(module, str):
                    raise ValueError(f"{where}.device_map: module names must be strings, got {module!r}")
                if not _is_device(device):
                    raise ValueError(f"{where}.device_map[{module!r}] must be a GPU index, 'cuda:N', 'cpu' or "
                                     f"'disk', got {device!r}")
        else:
            raise ValueError(f"{where}.device_map must be a strategy name or a mapping, got {device_map!r}")
    if max_memory is not None:
        if device_map is None:
            raise ValueError(f"{where}.max_memory needs device_map (it bounds what accelerate puts on each device)")
        if not isinstance(max_memory, Mapping) or not max_memory:
            raise ValueError(f"{where}.max_memory must be a mapping {{device: size}}, e.g. {{0: '70GiB', cpu: "
                             f"'200GiB'}}, got {max_memory!r}")
        for device, size in max_memory.items():
            if not _is_device(device) or device == "disk":
                raise ValueError(f"{where}.max_memory key {device!r} must be a GPU index, 'cuda:N' or 'cpu'")
            if isinstance(size, bool) or not isinstance(size, (int, str)):
                raise ValueError(f"{where}.max_memory[{device!r}] must be bytes (int) or a size like '70GiB', "
                                 f"got {size!r}")
    if offload_folder is not None and (device_map is None or not isinstance(offload_folder, str)):
        raise ValueError(f"{where}.offload_folder must be a path string and needs device_map, got {offload_folder!r}")


def _is_device(device: Any) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return device >= 0
    if isinstance(device, str):
        return device in ("cpu", "disk") or device.isdigit() or (device.startswith("cuda:") and device[5:].isdigit())
    return False


def _normalized_device(device):
    """`'0'` / `'cuda:1'` (YAML) become the GPU indices accelerate expects; `cpu` / `disk` stay."""
    if isinstance(device, str) and device.startswith("cuda:"):
        return int(device[5:])
    if isinstance(device, str) and device.isdigit():
        return int(device)
    return device


def rank_max_memory(local_rank: int, local_world_size: int, gpu_bytes: list[int]) -> dict | None:
    """`max_memory` restricting a rank to its group of consecutive GPUs: the rank's GPUs keep
    their size (`gpu_bytes[i]`), the others get 0. None: one rank per node (all its GPUs) or no GPU.

    Raises:
        ValueError: the GPUs do not split evenly over the node's ranks.
    """
    gpu_count = len(gpu_bytes)
    if gpu_count == 0 or local_world_size <= 1:
        return None
    if gpu_count % local_world_size:
        raise ValueError(f"{gpu_count} GPUs cannot be split evenly over {local_world_size} ranks per node; set "
                         "teacher_logits.max_memory per rank or use a rank count that divides the GPUs")
    group = gpu_count // local_world_size
    mine = range(local_rank * group, (local_rank + 1) * group)
    return {index: size if index in mine else 0 for index, size in enumerate(gpu_bytes)}


def split_loading_kwargs(device_map, max_memory=None, offload_folder=None) -> dict:
    """`from_pretrained` keyword arguments for this rank's split (see the module docstring)."""
    kwargs: dict[str, Any] = {"device_map": device_map}
    if isinstance(device_map, Mapping):
        kwargs["device_map"] = {module: _normalized_device(device) for module, device in device_map.items()}
    if max_memory is not None:
        kwargs["max_memory"] = {_normalized_device(device): size for device, size in max_memory.items()}
    elif torch.cuda.is_available():
        sizes = [torch.cuda.get_device_properties(index).total_memory for index in range(torch.cuda.device_count())]
        memory = rank_max_memory(int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                                 sizes)
        if memory is not None:
            kwargs["max_memory"] = memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    return kwargs


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes: its accelerate hook's execution device, else its parameters' device."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


@contextlib.contextmanager
def materialized(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`module` with its weights on its execution device for the duration (accelerate's
    `align_module_device`; a no-op for a module that is not offloaded)."""
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield module
