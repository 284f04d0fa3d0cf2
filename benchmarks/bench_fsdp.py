"""Benchmark: parameter + gradient + optimizer memory per rank, FSDP2 on 2 ranks vs one process.

The student is SmolLM2-135M's config pruned to `--layers` (6) layers (hidden 576, vocabulary
49152, tied embeddings), float32, random init, wrapped in `StudentWithLoss`; AdamW. The sharded
run is `torchrun --nproc-per-node 2` (gloo, CPU) with `shard_student` (one FSDP2 group per decoder
layer plus the root, as accelerate's `fsdp2_prepare_model` does); the unsharded run is one
process with the same model. Each rank trains `--steps` (2) steps on its own synthetic batch of
`--batch` x `--seq` tokens with `--k` teacher top-k rows per trained token.

Measured per rank, right after the last backward (gradients present) and after the optimizer
step (AdamW's two moments allocated):

* `params`, `grads`, `optimizer`: bytes of the rank's *local* tensors (a DTensor's local shard;
  storages counted once, so tied weights count once), and their sum `state_bytes`: the memory
  that FSDP divides by the number of ranks. The goal is sharded / unsharded ~= 1/2 with 2 ranks.
* `peak_rss_growth_kib`: VmHWM - VmRSS before the step (with `MALLOC_MMAP_THRESHOLD_=65536`, so
  freed buffers leave RSS), the process's largest step; it includes activations, the transient
  all-gathered layers and the loss's [C, V] chunk, which sharding does not divide.

Usage:
    python benchmarks/bench_fsdp.py [--quick] [--out FILE.json] [--layers N] [--batch B] [--seq T]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from _common import status_kib, write_report

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))

SMOLLM2_135M = {  # HuggingFaceTB/SmolLM2-135M config.json (layers set by --layers)
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "hidden_act": "silu", "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
    "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}
RATIO_GOAL = 0.5


def _local_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a DTensor counts its local shard)."""
    seen, total = set(), 0
    for tensor in tensors:
        if tensor is None:
            continue
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        storage = local.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _batch(batch_size: int, seq_len: int, k: int, vocab: int, seed: int) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch_size, seq_len), generator=generator)
    kd_mask = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    kd_mask[:, seq_len // 4:-1] = True
    n = int(kd_mask.sum())
    topk_logprobs = (torch.randn(n, k, generator=generator) * 2).log_softmax(-1) + torch.log(torch.tensor(0.9))
    topk_ids = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(n)])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone(),
            "kd_positions_mask": kd_mask, "kd_topk_ids": topk_ids,
            "kd_topk_logprobs": topk_logprobs.sort(-1, descending=True).values, "token_weights": torch.full((n,), 1.0 / n)}


def worker(args) -> dict:
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    from kd_pipeline.core.losses import KDLossConfig
    from kd_pipeline.core.training.fsdp import shard_student
    from kd_pipeline.core.training.loss_module import StudentWithLoss

    sharded = "WORLD_SIZE" in os.environ
    if sharded:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    torch.manual_seed(0)
    config = dict(SMOLLM2_135M, num_hidden_layers=args.layers)
    model_type = config.pop("model_type")
    student = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).float()
    parameters = sum(p.numel() for p in student.parameters())
    model = StudentWithLoss(student, KDLossConfig(kd_loss_weight=1.0, sft_loss_weight=0.5))
    if sharded:
        shard_student(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    record = {}
    growth = 0
    for step in range(args.steps):
        batch = _batch(args.batch, args.seq, args.k, config["vocab_size"], seed=100 * step + rank)
        _reset_peak()
        before = status_kib("VmRSS")
        started = time.perf_counter()
        model(**batch).loss.backward()
        params = _local_bytes(model.parameters())
        grads = _local_bytes(p.grad for p in model.parameters())
        optimizer.step()
        seconds = time.perf_counter() - started
        growth = max(growth, status_kib("VmHWM") - before)
        optimizer_bytes = _local_bytes(value for state in optimizer.state.values() for value in state.values()
                                       if torch.is_tensor(value) and value.dim() > 0)
        optimizer.zero_grad(set_to_none=True)
        record = {"rank": rank, "world": world, "parameters": parameters, "params": params, "grads": grads,
                  "optimizer": optimizer_bytes, "state_bytes": params + grads + optimizer_bytes,
                  "peak_rss_growth_kib": growth, "last_step_s": seconds}
    if sharded:
        gathered = [None] * world
        dist.all_gather_object(gathered, record)
        dist.destroy_process_group()
        return {"ranks": gathered}
    return {"ranks": [record]}


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _launch(args, ranks: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": str(REPO_ROOT / "src")}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--standalone"]
                if ranks > 1 else [sys.executable])
    command = [*launcher, __file__, "--worker", str(out), "--layers", str(args.layers), "--batch", str(args.batch),
               "--seq", str(args.seq), "--k", str(args.k), "--steps", str(args.steps)]
    subprocess.run(command, env=env, check=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, 1 x 64 tokens")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        result = worker(args)
        if int(os.environ.get("RANK", "0")) == 0:
            args.worker.write_text(json.dumps(result))
        return
    if args.quick:
        args.layers, args.batch, args.seq = 2, 1, 64
    with tempfile.TemporaryDirectory() as tmp:
        single = _launch(args, 1, Path(tmp) / "single.json")["ranks"][0]
        sharded = _launch(args, 2, Path(tmp) / "sharded.json")["ranks"]
    mib = 1 / 2 ** 20
    print(f"\nStudentWithLoss, SmolLM2-135M shape, {args.layers} layers ({single['parameters'] / 1e6:.1f}M parameters, "
          f"fp32, AdamW), batch {args.batch} x {args.seq} per rank\n")
    header = f"{'run':<18}{'params MiB':>12}{'grads MiB':>12}{'optim MiB':>12}{'sum MiB':>10}{'peak RSS growth MiB':>22}"
    print(header)
    print("-" * len(header))
    rows = [("1 process", single)] + [(f"FSDP2 rank {r['rank']}/2", r) for r in sharded]
    for name, row in rows:
        print(f"{name:<18}{row['params'] * mib:>12.1f}{row['grads'] * mib:>12.1f}{row['optimizer'] * mib:>12.1f}"
              f"{row['state_bytes'] * mib:>10.1f}{row['peak_rss_growth_kib'] / 1024:>22.1f}")
    ratio = max(r["state_bytes"] for r in sharded) / single["state_bytes"]
    print(f"\nparam+grad+optimizer per rank, sharded / unsharded: {ratio:.3f} (goal ~{RATIO_GOAL})")
    result = {
        "benchmark": "bench_fsdp", "date": date.today().isoformat(), "machine": platform.platform(),
        "cpus": os.cpu_count(), "torch_threads_per_rank": 1, "settings": vars(args) | {"out": str(args.out)},
        "unsharded": single, "sharded": sharded, "state_ratio_sharded_over_unsharded": ratio,
        "goal": RATIO_GOAL,
    }
    if args.out:
        write_report(args.out, result)


if __name__ == "__main__":
    main()
