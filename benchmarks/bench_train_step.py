"""Benchmark: one optimizer step of the distillation trainer, KD+SFT vs SFT-only, fp32 vs bf16, on CPU.

The student is SmolLM2-135M's config pruned to 10 layers (the default student until stop 8; now 25)
(hidden 576, 9 heads / 3 KV heads, MLP 1536, vocabulary 49152, tied embeddings), random init
(timing does not depend on the weights). A synthetic batch of `--batch` sequences of `--seq`
tokens (default 8 x 256, the default params' per-device batch) with a 1/4 prompt (masked) and
3/4 response (trained), and for KD `--k` (64) teacher top-k rows per trained token.

Each step is the real trainer path: `DistillationTrainer.get_batch_samples` (global token
count), `training_step` (`StudentWithLoss.forward`: the base model, hidden states of the
trained positions, `fused_topk_kd_loss`, backward) and `optimizer.step()` (AdamW). Modes:

* `kd_sft`: kd_loss_weight 1, sft_loss_weight 0.5 (the default params);
* `sft_only`: kd_loss_weight 0, sft_loss_weight 1, no targets (the baseline: same code path);
* `hf_ce`: reference only: the plain Hugging Face loss, `model(input_ids, labels=...)`, which
  materializes [B, T, V] logits.

Precisions (`--precisions`, default fp32,bf16): each gets its own copy of the student and its own
trainer (`trainer.precision` fp32 or bf16: bf16 is accelerate's CPU autocast around the step,
the fused loss's lm_head GEMMs in bf16, float32 master weights and AdamW state). `--layers`
sets the student depth (default 10; the default job's student has 25).

The (mode, precision) pairs are interleaved step by step (A B C A B C ...) so that load from other processes on
a shared machine hits them alike; per mode the median over `--steps` timed steps (after
`--warmup` untimed ones) of wall time and of process CPU time (user + sys). The ratio
KD+SFT / SFT-only is reported for both; the goal is <= 1.15.

Memory: the worker runs with `MALLOC_MMAP_THRESHOLD_=65536` (large buffers are returned to the
kernel on free, so RSS tracks live tensors); before a step it writes "5" to /proc/self/clear_refs
(resets the peak-RSS counter VmHWM) and reads VmRSS; after the step it reads VmHWM:
`peak_step_growth = VmHWM - VmRSS_before`, the largest over the timed steps.

Usage:
    python benchmarks/bench_train_step.py [--quick] [--out FILE.json] [--steps N] [--batch B] [--seq T]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from _common import status_kib, write_report

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))

from kd_pipeline.core.models.configs import SMOLLM2_135M_CONFIG  # noqa: E402

SMOLLM2_135M = {**SMOLLM2_135M_CONFIG, "num_hidden_layers": 10}  # SmolLM2-135M pruned to 10 layers
MODES = ("kd_sft", "sft_only", "hf_ce")
PRECISIONS = ("fp32", "bf16")
RATIO_GOAL = 1.15


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _batch(batch_size: int, seq_len: int, k: int, vocab: int, seed: int = 0) -> dict:
    """A collated batch as DistillCollator makes it (all sequences full length)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch_size, seq_len), generator=generator)
    loss_mask = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    loss_mask[:, seq_len // 4:] = True
    labels = torch.where(loss_mask, input_ids, torch.full_like(input_ids, -100))
    kd_mask = torch.zeros_like(loss_mask)
    kd_mask[:, :-1] = loss_mask[:, 1:]
    n = int(kd_mask.sum())
    logits = torch.randn(n, k, generator=generator) * 2
    topk_logprobs = (torch.log_softmax(logits, dim=-1) + torch.log(torch.tensor(0.9))).sort(dim=-1, descending=True).values
    topk_ids = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(n)])
    return {
        "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
        "kd_positions_mask": kd_mask, "kd_topk_ids": topk_ids, "kd_topk_logprobs": topk_logprobs.float(),
        "sample_index": torch.arange(batch_size), "sample_ids": [f"bench{i}" for i in range(batch_size)],
    }


def worker(args) -> dict:
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kd_pipeline.core.losses import KDLossConfig
    from kd_pipeline.core.training.config import TrainConfig, training_arguments
    from kd_pipeline.core.training.data import DistillCollator
    from kd_pipeline.core.training.trainer import DistillationTrainer

    config_dict = {**SMOLLM2_135M, "num_hidden_layers": args.layers}
    model_type = config_dict.pop("model_type")
    batch_kd = _batch(args.batch, args.seq, args.k, SMOLLM2_135M["vocab_size"])
    batch_sft = {key: value for key, value in batch_kd.items() if not key.startswith("kd_topk")}
    losses = {"kd_sft": KDLossConfig(kd_loss_weight=1.0, sft_loss_weight=0.5, chunk_size=args.chunk_size),
              "sft_only": KDLossConfig(kd_loss_weight=0.0, sft_loss_weight=1.0, chunk_size=args.chunk_size)}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for precision in args.precisions:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config_dict)).float()
            parameters = sum(p.numel() for p in model.parameters())
            train = TrainConfig.from_dict(dict(max_steps=10_000, per_device_train_batch_size=args.batch,
                                               disable_tqdm=True, save_steps=0, logging_steps=10_000,
                                               precision=precision, liger="off"))
            trainer = DistillationTrainer(model=model, args=training_arguments(train, Path(tmp) / precision, False, []),
                                          data_collator=DistillCollator(2), loss_config=losses["kd_sft"])
            trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
            trainer.current_gradient_accumulation_steps = 1
            trainers[precision] = trainer

        def step(mode: str, precision: str) -> float:
            trainer = trainers[precision]
            model, device = trainer.model, trainer.args.device
            model.train()
            # What accelerate wraps the prepared model's forward in (a no-op for fp32).
            with trainer.accelerator.autocast():
                if mode == "hf_ce":
                    student = model.student  # the plain causal LM inside StudentWithLoss
                    out = student(input_ids=batch_kd["input_ids"], attention_mask=batch_kd["attention_mask"],
                                  labels=batch_kd["labels"])
                    out.loss.backward()
                    loss = float(out.loss)
                else:
                    trainer.loss_config = losses[mode]
                    batch = batch_kd if mode == "kd_sft" else batch_sft
                    samples, num_items = trainer.get_batch_samples(iter([batch]), 1, device)
                    loss = float(trainer.training_step(trainer.model, samples[0], num_items))
            trainer.optimizer.step()
            model.zero_grad(set_to_none=True)
            return loss

        pairs = [(mode, precision) for mode in args.modes for precision in args.precisions]
        results = {f"{mode}/{precision}": {"wall_s": [], "cpu_s": [], "growth_kib": [], "peak_rss_kib": []}
                   for mode, precision in pairs}
        for index in range(args.warmup + args.steps):
            for mode, precision in pairs:
                _reset_peak()
                before = status_kib("VmRSS")
                wall, cpu = time.perf_counter(), time.process_time()
                step(mode, precision)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                peak = status_kib("VmHWM")
                if index >= args.warmup:
                    record = results[f"{mode}/{precision}"]
                    record["wall_s"].append(wall)
                    record["cpu_s"].append(cpu)
                    record["growth_kib"].append(peak - before)
                    record["peak_rss_kib"].append(peak)
    tokens = args.batch * args.seq
    summary = {}
    for mode, record in results.items():
        wall, cpu = statistics.median(record["wall_s"]), statistics.median(record["cpu_s"])
        summary[mode] = {
            "step_wall_s": wall, "step_cpu_s": cpu, "tokens_per_s": tokens / wall,
            "peak_step_growth_mib": max(record["growth_kib"]) / 1024, "peak_rss_mib": max(record["peak_rss_kib"]) / 1024,
            "wall_s_all": record["wall_s"], "cpu_s_all": record["cpu_s"],
        }
    return {"parameters": parameters, "modes": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (1 warm-up, 2 timed)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--layers", type=int, default=10, help="student decoder layers (default job: 25)")
    parser.add_argument("--chunk-size", type=int, default=None, help="fused-loss chunk (default: auto)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = 2, 1
    args.modes = [mode for mode in args.modes.split(",") if mode]
    args.precisions = [precision for precision in args.precisions.split(",") if precision]

    if args.worker:
        print(json.dumps(worker(args)))
        return

    import torch

    command = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch), "--seq", str(args.seq), "--k", str(args.k), "--modes", ",".join(args.modes),
               "--precisions", ",".join(args.precisions), "--layers", str(args.layers)]
    if args.chunk_size:
        command += ["--chunk-size", str(args.chunk_size)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"benchmark worker failed:\n{result.stderr[-4000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    modes = measured["modes"]
    ratios = {}
    for precision in args.precisions:
        kd, sft = modes.get(f"kd_sft/{precision}"), modes.get(f"sft_only/{precision}")
        if kd and sft:
            ratios[f"kd_sft_over_sft_only_wall/{precision}"] = kd["step_wall_s"] / sft["step_wall_s"]
            ratios[f"kd_sft_over_sft_only_cpu/{precision}"] = kd["step_cpu_s"] / sft["step_cpu_s"]
    for mode in args.modes:
        fp32, bf16 = modes.get(f"{mode}/fp32"), modes.get(f"{mode}/bf16")
        if fp32 and bf16:
            ratios[f"bf16_speedup_wall/{mode}"] = fp32["step_wall_s"] / bf16["step_wall_s"]
            ratios[f"bf16_speedup_cpu/{mode}"] = fp32["step_cpu_s"] / bf16["step_cpu_s"]
    report = {
        "benchmark": "bench_train_step",
        "date": date.today().isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_1m_at_end": os.getloadavg()[0]},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "student": {"config": {**SMOLLM2_135M, "num_hidden_layers": args.layers}, "parameters": measured["parameters"]},
        "precisions": args.precisions,
        "batch": {"batch_size": args.batch, "seq_len": args.seq, "tokens": args.batch * args.seq,
                  "trained_tokens": args.batch * (args.seq - args.seq // 4), "k": args.k},
        "steps": {"warmup": args.warmup, "timed": args.steps, "quick": args.quick},
        "modes": modes,
        "ratios": ratios,
        "goal": {"kd_sft_over_sft_only": RATIO_GOAL,
                 "met_cpu": {p: ratios[f"kd_sft_over_sft_only_cpu/{p}"] <= RATIO_GOAL
                             for p in args.precisions if f"kd_sft_over_sft_only_cpu/{p}" in ratios}},
        "seconds": time.perf_counter() - started,
    }
    header = f"{'mode/precision':<16} {'step wall s':>11} {'step cpu s':>10} {'tokens/s':>9} {'peak growth MiB':>15} {'peak RSS MiB':>12}"
    print(f"train step, {report['student']['parameters'] / 1e6:.1f}M-param student, batch {args.batch} x {args.seq}, "
          f"k {args.k}, {args.steps} timed steps (median)")
    print(header)
    for mode, row in modes.items():
        print(f"{mode:<16} {row['step_wall_s']:>11.2f} {row['step_cpu_s']:>10.2f} {row['tokens_per_s']:>9.0f} "
              f"{row['peak_step_growth_mib']:>15.0f} {row['peak_rss_mib']:>12.0f}")
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    if args.out:
        write_report(args.out, report)


if __name__ == "__main__":
    main()
