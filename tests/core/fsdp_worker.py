"""Trains the tiny student a few steps with `StudentWithLoss`, unsharded (plain `python`) or
FSDP2-sharded (`torchrun --nproc-per-node 2`, gloo), and writes what the tests compare.

Usage: fsdp_worker.py OUT_DIR JSON_SETTINGS

Settings: tied (bool), head_unit (shard an untied head as its own unit), steps. The global batch of each step is 2
micro-batches x 4 sequences; with 2 ranks, rank
r trains sequences 2r and 2r+1 of each micro-batch. In step 1's first micro-batch, sequences 2
and 3 (all of rank 1's share) have no trained token.
"""

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from kd_pipeline.core.losses import KDLossConfig
from kd_pipeline.core.tiny import TINY_VOCAB_SIZE, tiny_llama_config
from kd_pipeline.core.training.fsdp import shard_student
from kd_pipeline.core.training.loss_module import StudentWithLoss

SEQUENCES, LENGTH, K, MICRO_BATCHES = 4, 16, 4, 2
LOSS = KDLossConfig(kd_loss="fwd_kl", kd_loss_weight=1.0, sft_loss_weight=0.5, chunk_size=None)


def global_micro_batch(step: int, micro: int) -> dict:
    """The 4-sequence micro-batch `micro` of optimizer step `step` (the same on every rank)."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    input_ids = torch.randint(3, TINY_VOCAB_SIZE, (SEQUENCES, LENGTH), generator=g)
    lengths = torch.randint(LENGTH // 2, LENGTH + 1, (SEQUENCES,), generator=g)
    attention = torch.arange(LENGTH)[None, :] < lengths[:, None]
    trained = attention & (torch.rand(SEQUENCES, LENGTH, generator=g) < 0.7)
    trained[:, -1] = False
    if step == 1 and micro == 0:
        trained[2:] = False  # rank 1's whole share: a micro-batch without trained tokens
    labels = torch.where(attention, input_ids, -100)
    n = int(trained.sum())
    teacher = torch.randn(n, TINY_VOCAB_SIZE, generator=g).log_softmax(-1)
    topk_logprobs, topk_ids = teacher.topk(K, dim=-1)
    return {"input_ids": input_ids, "attention_mask": attention.long(), "kd_positions_mask": trained,
            "labels": labels, "kd_topk_ids": topk_ids, "kd_topk_logprobs": topk_logprobs}


def share(batch: dict, rank: int, world: int) -> dict:
    """Rank `rank`'s sequences of a global micro-batch (its rows of the flat top-k arrays too)."""
    per_rank = SEQUENCES // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    mask = batch["kd_positions_mask"]
    counts = mask.sum(1)
    start, stop = int(counts[: rows.start].sum()), int(counts[: rows.stop].sum())
    out = {key: batch[key][rows] for key in ("input_ids", "attention_mask", "kd_positions_mask", "labels")}
    out["kd_topk_ids"] = batch["kd_topk_ids"][start:stop]
    out["kd_topk_logprobs"] = batch["kd_topk_logprobs"][start:stop]
    return out


def build(settings: dict) -> StudentWithLoss:
    torch.manual_seed(0)
    config = LlamaConfig(**tiny_llama_config(tie_word_embeddings=settings["tied"]))
    return StudentWithLoss(LlamaForCausalLM(config), LOSS)


def count_all_gathers(model, batch: dict, chunk_size) -> int:
    """all-gathers of one forward + backward with the loss cut into `chunk_size`-token chunks."""
    original, calls = dist.all_gather_single, []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.loss_config = dataclasses.replace(LOSS, chunk_size=chunk_size)
    dist.all_gather_single = counting
    try:
        weights = torch.ones(int(batch["kd_positions_mask"].sum()))
        model(token_weights=weights, **batch).loss.backward()
    finally:
        dist.all_gather_single = original
        model.loss_config = LOSS
        model.zero_grad(set_to_none=True)
    return len(calls)


def main() -> None:
    out_dir, settings = Path(sys.argv[1]), json.loads(sys.argv[2])
    sharded = "WORLD_SIZE" in os.environ
    if sharded:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    model = build(settings)
    initial = {name: value.clone() for name, value in model.student_state_dict().items()}
    if sharded:
        shard_student(model, head_unit=settings.get("head_unit", False))
    # SGD: the update is linear in the gradient, so a parameter differs exactly as much as its
    # gradient does. (AdamW divides near-zero gradients by their own scale and turns float32
    # reduction-order noise of ~1e-9 into ~1e-6 updates on a few elements.)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    losses = {}
    for step in range(settings["steps"]):
        batches = [global_micro_batch(step, micro) for micro in range(MICRO_BATCHES)]
        # Global trained tokens of the step (all ranks, all micro-batches); the rank-local count
        # all-reduced, as DistillationTrainer.get_batch_samples does.
        local = [share(batch, rank, world) for batch in batches]
        total = torch.tensor(sum(int(b["kd_positions_mask"].sum()) for b in local))
        if sharded:
            dist.all_reduce(total)
        step_loss = torch.zeros((), dtype=torch.float64)
        for micro, batch in enumerate(local):
            if sharded:  # accelerate's no_sync: reduce-scatter on the last micro-batch only
                model.set_requires_gradient_sync(micro == MICRO_BATCHES - 1)
            n = int(batch["kd_positions_mask"].sum())
            # world / total: FSDP (like DDP) averages gradients over ranks.
            weights = torch.full((n,), world / float(total))
            out = model(token_weights=weights, **batch)
            out.loss.backward()
            step_loss += out.loss.detach().double() / world
        if sharded:
            dist.all_reduce(step_loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses[step + 1] = step_loss.item()

    record = {"losses": losses, "world": world}
    if sharded:
        from torch.distributed.tensor import DTensor

        record["sharded_parameters"] = sum(isinstance(p, DTensor) for p in model.parameters())
        probe = share(global_micro_batch(99, 0), rank, world)
        record["all_gathers"] = {str(size): count_all_gathers(model, probe, size) for size in (None, 2)}
        record["chunks_at_size_2"] = -(-int(probe["kd_positions_mask"].sum()) // 2)
    full = {}
    for name, value in model.student_state_dict().items():
        full[name] = value.full_tensor() if hasattr(value, "full_tensor") else value
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {name: value.detach().contiguous().clone() for name, value in full.items()}
        save_file(tensors, out_dir / "params.safetensors")
        save_file({name: value.contiguous().clone() for name, value in initial.items()},
                  out_dir / "initial.safetensors")
        (out_dir / "record.json").write_text(json.dumps(record))
    if sharded:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
