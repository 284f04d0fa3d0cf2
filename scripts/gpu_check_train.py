"""GPU check of the distillation trainer: a few hundred steps of the default KD run in bf16 on one
GPU, with Liger kernels on and off (and the SFT-only baseline), tokens/s and peak memory.

Made for one H100 with torch + transformers (+ triton) and no kedro: it imports only
`kd_pipeline.core` (via `src/` on sys.path). liger-kernel is imported if present; otherwise pass
`--wheels DIR` holding a liger-kernel wheel (installed with `pip --no-index --no-deps`).

The student is SmolLM2-135M's shape pruned to 10 layers, random init (the default student until stop 8; now 25)
trained by `DistillationTrainer` (the same trainer `train_student` builds) on synthetic data:
sequences of `--seq` tokens (1/4 prompt, 3/4 trained), per-device batch `--batch` (default 8
as in conf/base/parameters_distill.yml), teacher top-k rows with k = 64. Each configuration
runs in its own subprocess (Liger patches the architecture module process-wide, so "off" must
not follow "on" in one process):

    kd_sft  liger on | kd_sft  liger off | sft_only liger on | sft_only liger off

Per configuration: steady-state tokens/s (steps after `--warmup`), peak CUDA memory
(`torch.cuda.max_memory_allocated`), the final loss, and the largest loss difference between
Liger on and off over the steps (numerics check; bf16 noise expected around 1e-2). Prints a
table; writes `gpu_check_train.json` under $OUT when set (or `--out FILE`).

`--dry-run`: a tiny model on CPU for a few steps, fp32, Liger off: checks the script itself.

Usage:
    python scripts/gpu_check_train.py [--steps 300] [--wheels DIR] [--dry-run]
"""

from __future__ import annotations

import argparse
import importlib.util
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

from kd_pipeline.core.atomic import write_json_atomic  # noqa: E402
from kd_pipeline.core.models.configs import SMOLLM2_135M_CONFIG  # noqa: E402

SMOLLM2_135M_10_LAYERS = {**SMOLLM2_135M_CONFIG, "num_hidden_layers": 10}
TINY = {**SMOLLM2_135M_10_LAYERS, "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
CONFIGS = (("kd_sft", "on"), ("kd_sft", "off"), ("sft_only", "on"), ("sft_only", "off"))


class SyntheticSamples:
    """A map-style dataset of DistillDataset-like items with teacher top-k rows, deterministic per index."""

    def __init__(self, num_samples: int, seq_len: int, vocab: int, k: int, with_targets: bool):
        self.num_samples, self.seq_len, self.vocab, self.k, self.with_targets = num_samples, seq_len, vocab, k, with_targets

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        import numpy as np

        rng = np.random.default_rng(index)
        length = int(rng.integers(self.seq_len // 2, self.seq_len + 1))
        input_ids = rng.integers(3, self.vocab, size=length)
        loss_mask = np.zeros(length, dtype=np.int8)
        loss_mask[length // 4:] = 1
        item = {"sample_index": index, "sample_id": f"synthetic-{index:06d}", "input_ids": input_ids,
                "loss_mask": loss_mask}
        if self.with_targets:
            n = int(loss_mask.sum())
            logits = rng.normal(size=(n, self.k)) * 2.0
            logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)) + np.log(0.9)
            item["topk_logprobs"] = -np.sort(-logprobs, axis=1).astype(np.float32)
            ids = rng.integers(0, self.vocab, size=(n, self.k))
            ids[:, 0] = input_ids[np.flatnonzero(loss_mask)]  # the actual next token is the teacher's top-1
            item["topk_ids"] = ids
        return item


def _ensure_liger(wheels: str | None) -> str:
    """'present', 'installed from DIR', or 'absent (...)'."""
    if importlib.util.find_spec("liger_kernel") is not None:
        return "present"
    if not wheels:
        return "absent (pass --wheels DIR)"
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links", wheels, "liger-kernel"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return f"absent (pip install from {wheels} failed: {result.stderr.strip()[-300:]})"
    importlib.invalidate_caches()
    return f"installed from {wheels}"


def run_config(mode: str, liger: str, args) -> dict:
    """One configuration in this process: build, train `args.steps` steps, measure."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

    from kd_pipeline.core.losses import KDLossConfig
    from kd_pipeline.core.training.config import TrainConfig, training_arguments
    from kd_pipeline.core.training.data import DistillCollator
    from kd_pipeline.core.training.trainer import DistillationTrainer

    cuda = torch.cuda.is_available() and not args.dry_run
    config_dict = dict(TINY if args.dry_run else SMOLLM2_135M_10_LAYERS)
    model_type = config_dict.pop("model_type")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config_dict)).float()
    device = torch.device("cuda" if cuda else "cpu")

    loss = KDLossConfig(kd_loss_weight=1.0, sft_loss_weight=0.5) if mode == "kd_sft" else \
        KDLossConfig(kd_loss_weight=0.0, sft_loss_weight=1.0)
    batches = args.steps * args.batch
    dataset = SyntheticSamples(batches, args.seq, config_dict["vocab_size"], args.k, with_targets=mode == "kd_sft")

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
    with tempfile.TemporaryDirectory() as tmp:
        # Liger goes through the Trainer's own switch (TrainingArguments.use_liger_kernel).
        train = TrainConfig.from_dict(dict(
            max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=3e-4,
            lr_scheduler_type="cosine", warmup_steps=0.1, save_steps=0, eval_steps=0, logging_steps=1,
            precision="fp32" if not cuda else "bf16", liger=liger if cuda else "off", disable_tqdm=True,
            pad_to_multiple_of=8 if cuda else None, seed=0))
        training_args = training_arguments(train, Path(tmp), False, [], model_type)
        liger_applied = training_args.use_liger_kernel
        trainer = DistillationTrainer(model=model, args=training_args,
                                      train_dataset=dataset, data_collator=DistillCollator(2, train.pad_to_multiple_of),
                                      loss_config=loss, reduction="token", callbacks=[clock])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - started
        tokens = sum(len(dataset[i]["input_ids"]) for i in range(args.warmup * args.batch, args.steps * args.batch))
    steady = clock.times[-1] - clock.times[args.warmup - 1] if len(clock.times) > args.warmup else float("nan")
    history = trainer.state.log_history
    last = next((row for row in reversed(history) if "loss" in row), {})
    return {
        "mode": mode, "liger_requested": liger, "liger_applied": liger_applied, "device": str(device),
        "dtype": "bf16" if cuda else "fp32", "steps": args.steps, "batch": args.batch, "seq": args.seq, "k": args.k,
        "tokens_per_s": tokens / steady if steady > 0 else None,
        "steady_seconds": steady, "total_seconds": total,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "final_loss": last.get("loss"), "final_kd": last.get("kd"), "final_sft": last.get("sft"),
        "losses": clock.losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20, help="steps excluded from tokens/s")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--wheels", help="folder with a liger-kernel wheel, installed if liger is absent")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU, a few steps")
    parser.add_argument("--out", type=Path, help="JSON output (default: $OUT/gpu_check_train.json if $OUT is set)")
    parser.add_argument("--config", help=argparse.SUPPRESS)  # worker: mode:liger
    args = parser.parse_args()
    if args.dry_run:
        args.steps, args.warmup, args.batch, args.seq, args.k = 6, 2, 2, 32, 8

    if args.config:
        mode, liger = args.config.split(":")
        print("RESULT " + json.dumps(run_config(mode, liger, args)), flush=True)
        return

    import torch
    import transformers

    started = time.perf_counter()
    liger_status = "not used (dry run)" if args.dry_run else _ensure_liger(args.wheels)
    cuda = torch.cuda.is_available() and not args.dry_run
    results, failures = [], {}
    for mode, liger in CONFIGS:
        if liger == "on" and (not cuda or not liger_status.startswith(("present", "installed"))):
            failures[f"{mode}:{liger}"] = "skipped: " + ("no CUDA" if not cuda else f"liger {liger_status}")
            continue
        command = [sys.executable, __file__, "--config", f"{mode}:{liger}", "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq), "--k", str(args.k)]
        if args.dry_run:
            command.append("--dry-run")
        t0 = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
        if result.returncode != 0 or not lines:
            failures[f"{mode}:{liger}"] = result.stderr.strip()[-2000:]
            print(f"{mode} liger {liger}: FAILED ({time.perf_counter() - t0:.0f} s)\n{result.stderr[-2000:]}", flush=True)
            continue
        results.append(json.loads(lines[-1][len("RESULT "):]))
        print(f"{mode} liger {liger}: done in {time.perf_counter() - t0:.0f} s", flush=True)

    by_key = {(row["mode"], row["liger_requested"]): row for row in results}
    comparisons = {}
    for mode in ("kd_sft", "sft_only"):
        on, off = by_key.get((mode, "on")), by_key.get((mode, "off"))
        if on and off:
            diffs = [abs(a[1] - b[1]) for a, b in zip(on["losses"], off["losses"])]
            comparisons[f"{mode}_liger_speedup"] = (on["tokens_per_s"] or 0) / (off["tokens_per_s"] or float("nan"))
            comparisons[f"{mode}_liger_max_loss_diff"] = max(diffs) if diffs else None
    for liger in ("on", "off"):
        kd, sft = by_key.get(("kd_sft", liger)), by_key.get(("sft_only", liger))
        if kd and sft and kd["tokens_per_s"] and sft["tokens_per_s"]:
            # tokens/s differ by the data, not only the step: compare per-token time.
            comparisons[f"kd_sft_over_sft_only_time_per_token_liger_{liger}"] = sft["tokens_per_s"] / kd["tokens_per_s"]

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    report = {
        "check": "gpu_check_train", "dry_run": args.dry_run, "gpu": gpu, "liger": liger_status,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "cuda": torch.version.cuda},
        "results": [{key: value for key, value in row.items() if key != "losses"} | {"losses": row["losses"][::10]}
                    for row in results],
        "comparisons": comparisons, "failures": failures, "seconds": time.perf_counter() - started,
    }
    print(f"\ntrainer check on {gpu or 'CPU'} ({'dry run' if args.dry_run else f'{args.steps} steps'}, "
          f"batch {args.batch} x <= {args.seq} tokens, k {args.k}); liger: {liger_status}")
    print(f"{'mode':<9} {'liger':<6} {'applied':<8} {'dtype':<5} {'tokens/s':>10} {'peak GiB':>9} {'final loss':>11} {'seconds':>8}")
    for row in results:
        tokens = f"{row['tokens_per_s']:.0f}" if row["tokens_per_s"] else "-"
        memory = f"{row['peak_memory_gib']:.2f}" if row["peak_memory_gib"] is not None else "-"
        print(f"{row['mode']:<9} {row['liger_requested']:<6} {str(row['liger_applied']):<8} {row['dtype']:<5} "
              f"{tokens:>10} {memory:>9} {row['final_loss']:>11.4f} {row['total_seconds']:>8.1f}")
    for key, value in comparisons.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    for key, value in failures.items():
        print(f"{key}: {value.splitlines()[-1] if value else value}")
    out = args.out or (Path(os.environ["OUT"]) / "gpu_check_train.json" if os.environ.get("OUT") else None)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, report)
        print(f"wrote {out}")
    sys.exit(1 if any(not value.startswith("skipped") for value in failures.values()) else 0)


if __name__ == "__main__":
    main()
