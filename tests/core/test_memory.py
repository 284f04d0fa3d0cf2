"""core.memory: freed allocator pages go back to the OS."""

import sys
from types import SimpleNamespace

import pytest
import torch

from kd_pipeline.core import memory

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
