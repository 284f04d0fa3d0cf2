"""GPU check of FSDP2 training: the distillation trainer with `fsdp: true` (FSDP2 through the HF
Trainer / accelerate, the fused loss inside `StudentWithLoss.forward`) against DDP, on `--gpus`
GPUs (default 1: FSDP2's code path, sharding over one rank), tokens/s and peak memory.

Made for one H100/H200 with torch + transformers and no kedro: it imports only `kd_pipeline.core`
(via `src/` on sys.path). Each mode runs in its own `torchrun --nproc-per-node GPUS` (FSDP needs a
process group even for one GPU):

    ddp    | fsdp2 (reshard_after_forward: true) | fsdp2_keep (reshard_after_forward: false)

The student is SmolLM2-135M's shape pruned to 10 layers, random init, bf16 mixed precision, on
the synthetic data of `gpu_check_train.py` (sequences of `--seq` tokens, 3/4 trained, k = 64).
Per mode: steady-state tokens/s (steps after `--warmup`, all ranks), peak CUDA memory of rank 0
(`torch.cuda.max_memory_allocated`), the step losses; then the largest loss difference of each
FSDP2 mode from DDP (same data and seed: bf16 noise expected, ~1e-2) and the memory / speed
ratios. Prints a table; writes `gpu_check_fsdp.json` under $OUT when set (or `--out FILE`).

`--dry-run`: a tiny model on 2 CPU processes (gloo), fp32, a few steps, with accelerate's FSDP
gate lifted on CPU (`training.fsdp.accelerate_fsdp_on_cpu`): checks the script itself.

Usage:
    python scripts/gpu_check_fsdp.py [--steps 200] [--gpus 1] [--dry-run] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(Path(__file__).parent))

from gpu_check_train import SMOLLM2_135M_10_LAYERS, TINY, SyntheticSamples  # noqa: E402

from kd_pipeline.core.atomic import write_json_atomic  # noqa: E402

MODES = {"ddp": None, "fsdp2": {"reshard_after_forward": True}, "fsdp2_keep": {"reshard_after_forward": False}}


def run_mode(mode: str, args) -> dict:
    """One mode on this torchrun rank: build, train `args.steps` steps, measure."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

    from kd_pipeline.core.losses import KDLossConfig
    from kd_pipeline.core.training.config import TrainConfig, training_arguments
    from kd_pipeline.core.training.data import DistillCollator
    from kd_pipeline.core.training.fsdp import accelerate_fsdp_on_cpu
    from kd_pipeline.core.training.trainer import DistillationTrainer

    cuda = torch.cuda.is_available() and not args.dry_run
    config_dict = dict(TINY if args.dry_run else SMOLLM2_135M_10_LAYERS)
    model_type = config_dict.pop("model_type")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config_dict)).float()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dataset = SyntheticSamples(args.steps * args.batch * world, args.seq, config_dict["vocab_size"], args.k,
                               with_targets=True)

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.losses = [], []

        def on_step_end(self, cb_args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

        def on_log(self, cb_args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append((state.global_step, logs["loss"]))

    clock = Clock()
    settings = dict(max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=3e-4,
                    lr_scheduler_type="cosine", warmup_steps=0.1, save_steps=0, eval_steps=0, logging_steps=1,
                    precision="bf16" if cuda else "fp32", liger="off", disable_tqdm=True,
                    pad_to_multiple_of=8 if cuda else None, seed=0)
    if MODES[mode] is not None:
        settings.update(fsdp=True, fsdp_config=MODES[mode])
    gate = accelerate_fsdp_on_cpu() if args.dry_run else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as tmp, gate:
        train = TrainConfig.from_dict(settings)
        trainer = DistillationTrainer(model=model, args=training_arguments(train, Path(tmp), False, [], model_type),
                                      train_dataset=dataset,
                                      data_collator=DistillCollator(2, train.pad_to_multiple_of),
                                      loss_config=KDLossConfig(kd_loss_weight=1.0, sft_loss_weight=0.5),
                                      reduction="token", callbacks=[clock])
        sharded = trainer.is_fsdp_enabled
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - started
    tokens = sum(len(dataset[i]["input_ids"]) for i in range(args.warmup * args.batch * world, len(dataset)))
    steady = clock.times[-1] - clock.times[args.warmup - 1] if len(clock.times) > args.warmup else float("nan")
    return {
        "mode": mode, "fsdp_enabled": sharded, "world_size": world, "device": "cuda" if cuda else "cpu",
        "dtype": "bf16" if cuda else "fp32", "steps": args.steps, "batch": args.batch, "seq": args.seq, "k": args.k,
        "tokens_per_s": tokens / steady if steady > 0 else None, "steady_seconds": steady, "total_seconds": total,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "final_loss": clock.losses[-1][1] if clock.losses else None, "losses": clock.losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20, help="steps excluded from tokens/s")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--gpus", type=int, default=1, help="processes per mode (torchrun --nproc-per-node)")
    parser.add_argument("--dry-run", action="store_true", help="tiny model, 2 CPU processes (gloo), a few steps")
    parser.add_argument("--out", type=Path, help="JSON output (default: $OUT/gpu_check_fsdp.json if $OUT is set)")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # worker
    args = parser.parse_args()
    if args.dry_run:
        args.steps, args.warmup, args.batch, args.seq, args.k, args.gpus = 6, 2, 2, 32, 8, 2

    if args.mode:
        result = run_mode(args.mode, args)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return

    import torch
    import transformers

    started = time.perf_counter()
    results, failures = [], {}
    for mode in MODES:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.gpus),
                   __file__, "--mode", mode, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--k", str(args.k)]
        if args.dry_run:
            command.append("--dry-run")
        t0 = time.perf_counter()
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **({"OMP_NUM_THREADS": "1"} if args.dry_run else {})}
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
        if result.returncode != 0 or not lines:
            failures[mode] = result.stderr.strip()[-3000:]
            print(f"{mode}: FAILED ({time.perf_counter() - t0:.0f} s)\n{result.stderr[-3000:]}", flush=True)
            continue
        results.append(json.loads(lines[-1][len("RESULT "):]))
        print(f"{mode}: done in {time.perf_counter() - t0:.0f} s", flush=True)

    by_mode = {row["mode"]: row for row in results}
    comparisons = {}
    ddp = by_mode.get("ddp")
    for mode in ("fsdp2", "fsdp2_keep"):
        row = by_mode.get(mode)
        if not (ddp and row):
            continue
        diffs = [abs(a[1] - b[1]) for a, b in zip(row["losses"], ddp["losses"])]
        comparisons[f"{mode}_max_loss_diff_vs_ddp"] = max(diffs) if diffs else None
        if row["tokens_per_s"] and ddp["tokens_per_s"]:
            comparisons[f"{mode}_tokens_per_s_over_ddp"] = row["tokens_per_s"] / ddp["tokens_per_s"]
        if row["peak_memory_gib"] and ddp["peak_memory_gib"]:
            comparisons[f"{mode}_peak_memory_over_ddp"] = row["peak_memory_gib"] / ddp["peak_memory_gib"]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.dry_run else None
    report = {
        "check": "gpu_check_fsdp", "dry_run": args.dry_run, "gpu": gpu, "processes": args.gpus,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "cuda": torch.version.cuda},
        "results": [{key: value for key, value in row.items() if key != "losses"} | {"losses": row["losses"][::10]}
                    for row in results],
        "comparisons": comparisons, "failures": failures, "seconds": time.perf_counter() - started,
    }
    print(f"\nFSDP2 vs DDP on {gpu or 'CPU'} x {args.gpus} ({'dry run' if args.dry_run else f'{args.steps} steps'}, "
          f"batch {args.batch} x <= {args.seq} tokens per rank, k {args.k})")
    print(f"{'mode':<11} {'sharded':<8} {'dtype':<5} {'tokens/s':>10} {'peak GiB':>9} {'final loss':>11} {'seconds':>8}")
    for row in results:
        tokens = f"{row['tokens_per_s']:.0f}" if row["tokens_per_s"] else "-"
        memory = f"{row['peak_memory_gib']:.2f}" if row["peak_memory_gib"] is not None else "-"
        print(f"{row['mode']:<11} {str(row['fsdp_enabled']):<8} {row['dtype']:<5} {tokens:>10} {memory:>9} "
              f"{row['final_loss']:>11.4f} {row['total_seconds']:>8.1f}")
    for key, value in comparisons.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    out = args.out or (Path(os.environ["OUT"]) / "gpu_check_fsdp.json" if os.environ.get("OUT") else None)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, report)
        print(f"wrote {out}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
