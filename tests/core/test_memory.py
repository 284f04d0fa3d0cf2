"""core.memory: freed allocator pages go back to the OS."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from kd_pipeline.core import memory
from kd_pipeline.core.devices import has_native_bf16

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self, glibc malloc_trim")


@linux_only
def test_release_returns_freed_heap_pages_that_free_keeps():
    # 100 KB blocks are below glibc's mmap threshold: they live in the heap, and a small block
    # kept after each one pins the heap's top, so `free` alone cannot shrink it.
    blocks = [(bytearray(100_000), bytearray(64)) for _ in range(3000)]
    for block in blocks:
        block[0][::4096] = b"\x01" * len(block[0][::4096])  # touch every page
    resident_full = memory.resident_bytes()
    kept = [small for _, small in blocks]
    del blocks
    resident_freed = memory.resident_bytes()
    released = memory.release_unused_memory("test")
    resident_after = memory.resident_bytes()
    assert memory._malloc_trim() is not None
    assert resident_freed > resident_full - 100e6  # free() kept most of the 300 MB resident
    assert released > 200e6, (resident_full, resident_freed, resident_after)
    assert resident_after < resident_freed - 200e6
    assert len(kept) == 3000


def test_free_optimizer_state_drops_moments_and_gradients():
    from kd_pipeline.core.training.run import _free_optimizer_state

    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 8)).sum().backward()
    optimizer.step()
    assert len(optimizer.state) == 2 and model.weight.grad is not None
    wrapper = SimpleNamespace(optimizer=optimizer)  # accelerate's AcceleratedOptimizer holds it so
    _free_optimizer_state(SimpleNamespace(optimizer=wrapper, model=model))
    assert len(optimizer.state) == 0
    assert model.weight.grad is None and model.bias.grad is None


def test_training_hands_freed_memory_back_after_steps_evaluations_and_checkpoints(monkeypatch):
    from kd_pipeline.core.training import trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "release_unused_memory", lambda label, collect=True: calls.append((label, collect)))
    callback = trainer_module.ReleaseMemoryCallback()
    callback.on_step_end(None, None, None)
    callback.on_evaluate(None, None, None)
    callback.on_save(None, None, None)
    # Between steps only the allocator is trimmed (no garbage collection: ~0.1 s each).
    assert calls == [("distill: step", False), ("distill: evaluation", True), ("distill: checkpoint", True)]


def _import_in_fresh_process(environment: dict[str, str]) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in memory.KERNEL_CACHE_VARIABLES}
    script = ("import json, os, kd_pipeline; "
              f"print(json.dumps({{k: os.environ.get(k) for k in {list(memory.KERNEL_CACHE_VARIABLES)}}}))")
    done = subprocess.run([sys.executable, "-c", script], env={**env, **environment}, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


def test_importing_the_package_bounds_the_kernel_caches_unless_the_user_set_them():
    assert _import_in_fresh_process({}) == dict.fromkeys(memory.KERNEL_CACHE_VARIABLES, "64")
    assert _import_in_fresh_process({"LRU_CACHE_CAPACITY": "7"}) == {
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "7"}
    with pytest.raises(ValueError, match="at least 1, got 0"):
        memory.bound_kernel_caches(0)


_KERNEL_GROWTH = """
import os, sys
os.environ.update(ONEDNN_PRIMITIVE_CACHE_CAPACITY=sys.argv[1], LRU_CACHE_CAPACITY=sys.argv[1])
import torch
from kd_pipeline.core.memory import release_unused_memory, resident_bytes
torch.set_num_threads(1)
layer = torch.nn.Linear(256, 768).to(torch.bfloat16)
def shapes():
    for rows in range(64, 64 + 8 * 48, 8):
        layer(torch.randn(rows, 256, dtype=torch.bfloat16, requires_grad=True)).sum().backward()
shapes(); release_unused_memory(); start = resident_bytes()
for rows in range(1000, 1000 + 8 * 48, 8):
    layer(torch.randn(rows, 256, dtype=torch.bfloat16, requires_grad=True)).sum().backward()
release_unused_memory(); print(resident_bytes() - start)
"""


@linux_only
def test_the_kernel_cache_bound_stops_per_shape_growth(monkeypatch):
    monkeypatch.delenv("KD_PIPELINE_NATIVE_BF16", raising=False)  # the hardware's answer, not the suite's
    if not has_native_bf16("cpu"):
        pytest.skip("oneDNN's bf16 kernels (the ones cached per shape) need a CPU with native bf16")

    def growth(capacity: int) -> int:
        done = subprocess.run([sys.executable, "-c", _KERNEL_GROWTH, str(capacity)], capture_output=True,
                              text=True, check=True)
        return int(done.stdout.split()[-1])

    unbounded, bounded = growth(1024), growth(4)
    assert unbounded > 20 * 2**20, unbounded  # 48 new shapes each keep their compiled kernels
    assert bounded < unbounded / 4, (bounded, unbounded)
