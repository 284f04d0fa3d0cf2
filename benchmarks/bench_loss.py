"""Benchmark: fused chunked top-k KD loss vs the naive full-logits loss, float32 on CPU.

For each case (N tokens, hidden H, vocab V, top-k K) it measures one forward+backward step of

* naive: `logits = hidden @ weight.T` (N x V) + `topk_kd_loss_reference` + autograd, and
* fused: `fused_topk_kd_loss(hidden, weight, ...)`,

with `kd_loss_weight = sft_loss_weight = 1` (so both the top-k and the full-vocabulary gradient
paths run) and reports peak memory growth and time. Any implementation has to allocate the
gradients of the lm_head weight and of the hidden states, V*H + N*H floats: that is the floor,
and the goals are fused growth <= 1.25 x floor and fused time <= naive time.

How memory is measured (robust on CPU, no psutil):
    every (case, implementation) runs in a fresh worker subprocess started with
    `MALLOC_MMAP_THRESHOLD_=65536`, so glibc serves every buffer >= 64 KiB with its own mmap and
    returns it to the kernel on free; resident memory then tracks live tensors instead of
    allocator caches. The worker builds its inputs, runs a tiny warm-up step (thread pools,
    MKL/oneDNN init), writes "5" to /proc/self/clear_refs (resets the kernel's peak-RSS counter
    VmHWM to the current RSS), reads VmRSS, runs one step and reads VmHWM:
    growth = VmHWM - VmRSS_before. The step's outputs (loss, .grad tensors) are still alive at
    that point, so the floor is part of the growth.

How time is measured:
    in another fresh worker with the default allocator, min over `--repeats` steps after one
    untimed step, as wall time and as process CPU time (user+sys, all threads). On a shared
    2-core machine CPU time is much less disturbed by other processes than wall time, so the
    `time_ratio` (fused / naive) uses CPU time; the wall-time ratio is reported too.

Usage:
    python benchmarks/bench_loss.py [--quick] [--out FILE.json] [--repeats R] [--chunk-size C]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))

FULL_CASES = [  # (N, H, V, K)
    (4096, 576, 49152, 64),
    (4096, 2048, 128256, 64),
]
QUICK_CASES = [(1024, 576, 49152, 64)]
BYTES_PER_FLOAT = 4
MEM_GOAL = 1.25
TIME_GOAL = 1.0


def _make_inputs(num_tokens: int, hidden_size: int, vocab_size: int, k: int, seed: int):
    """Random inputs without any [N, V] temporary (so none is freed before the baseline)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen)
    weight = torch.randn(vocab_size, hidden_size, generator=gen) / hidden_size**0.5
    # K distinct ids per row: an arithmetic progression mod V whose step keeps k*step < V.
    offset = torch.randint(0, vocab_size, (num_tokens, 1), generator=gen)
    step = torch.randint(1, max(2, vocab_size // k), (num_tokens, 1), generator=gen)
    topk_ids = (offset + step * torch.arange(k)) % vocab_size  # (N, K) int64
    # Full-vocabulary log-probs: K+1 buckets (the last is the tail), sorted descending.
    buckets = (3 * torch.randn(num_tokens, k + 1, generator=gen)).log_softmax(-1)
    topk_logprobs = buckets[:, :k].sort(dim=1, descending=True).values
    labels = torch.randint(0, vocab_size, (num_tokens,), generator=gen)
    token_weights = torch.full((num_tokens,), 1.0 / num_tokens)
    return hidden, weight, topk_ids, topk_logprobs, labels, token_weights


def _step(impl: str, inputs, config) -> None:
    """One forward+backward of `impl` ('naive' or 'fused'); grads stay on the leaves."""
    from kd_pipeline.core.losses import fused_topk_kd_loss, topk_kd_loss_reference

    hidden, weight, topk_ids, topk_logprobs, labels, token_weights = inputs
    if impl == "naive":
        logits = hidden @ weight.t()  # (N, V)
        out = topk_kd_loss_reference(logits, topk_ids, topk_logprobs, labels, token_weights, config)
    else:
        out = fused_topk_kd_loss(
            hidden, weight, None, topk_ids, topk_logprobs, labels, token_weights, config
        )
    out.loss.backward()


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _worker(args: argparse.Namespace) -> dict:
    import torch

    from kd_pipeline.core.losses import KDLossConfig

    config = KDLossConfig(kd_loss_weight=1.0, sft_loss_weight=1.0, chunk_size=args.chunk_size)
    num_tokens, hidden_size, vocab_size, k = args.case
    warm = _make_inputs(8, hidden_size, 256, min(k, 256), seed=1)
    warm_leaves = [t.requires_grad_() for t in warm[:2]]
    _step(args.impl, warm, config)
    del warm, warm_leaves

    inputs = _make_inputs(num_tokens, hidden_size, vocab_size, k, seed=0)
    leaves = inputs[:2]
    for leaf in leaves:
        leaf.requires_grad_()
    result: dict = {}
    if args.measure == "memory":
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        before_kib = _read_status_kib("VmRSS")
        _step(args.impl, inputs, config)
        result["growth_bytes"] = (_read_status_kib("VmHWM") - before_kib) * 1024
    else:
        wall, cpu = [], []
        for repeat in range(args.repeats + 1):
            for leaf in leaves:
                leaf.grad = None
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            _step(args.impl, inputs, config)
            if repeat > 0:  # the first step pays page faults and lazy init
                wall.append(time.perf_counter() - wall_start)
                cpu.append(time.process_time() - cpu_start)
        result.update(wall_s=min(wall), cpu_s=min(cpu), threads=torch.get_num_threads())
    return result


def _run_worker(impl: str, case, measure: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    if measure == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    command = [
        sys.executable, __file__, "--worker", impl, "--measure", measure,
        "--case", *map(str, case), "--repeats", str(args.repeats),
    ]
    if args.chunk_size is not None:
        command += ["--chunk-size", str(args.chunk_size)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"worker {impl} {case} {measure} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _run_case(case, args: argparse.Namespace) -> dict:
    from kd_pipeline.core.losses import auto_chunk_size

    num_tokens, hidden_size, vocab_size, k = case
    floor = (vocab_size * hidden_size + num_tokens * hidden_size) * BYTES_PER_FLOAT
    row = {
        "n": num_tokens, "hidden": hidden_size, "vocab": vocab_size, "k": k,
        "chunk_size": args.chunk_size or auto_chunk_size(num_tokens, vocab_size, hidden_size),
        "floor_bytes": floor,
    }
    for impl in ("naive", "fused"):
        memory = _run_worker(impl, case, "memory", args)
        timing = _run_worker(impl, case, "time", args)
        row[f"{impl}_growth_bytes"] = memory["growth_bytes"]
        row[f"{impl}_growth_over_floor"] = memory["growth_bytes"] / floor
        row[f"{impl}_wall_s"] = timing["wall_s"]
        row[f"{impl}_cpu_s"] = timing["cpu_s"]
    # mem_ratio: naive / fused growth (higher is better); time_ratio: fused / naive CPU time.
    row["mem_ratio"] = row["naive_growth_bytes"] / row["fused_growth_bytes"]
    row["time_ratio"] = row["fused_cpu_s"] / row["naive_cpu_s"]
    row["wall_time_ratio"] = row["fused_wall_s"] / row["naive_wall_s"]
    row["mem_goal_met"] = row["fused_growth_over_floor"] <= MEM_GOAL
    row["time_goal_met"] = row["time_ratio"] <= TIME_GOAL
    return row


def _format_table(rows: list[dict]) -> str:
    mib = 2**20
    header = (
        "| N | H | V | K | chunk | floor MiB | naive growth MiB (x floor) | fused growth MiB "
        "(x floor) | mem naive/fused | naive s (cpu / wall) | fused s (cpu / wall) | "
        "time fused/naive (cpu / wall) |"
    )
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['hidden']} | {r['vocab']} | {r['k']} | {r['chunk_size']} "
            f"| {r['floor_bytes'] / mib:.0f} "
            f"| {r['naive_growth_bytes'] / mib:.0f} ({r['naive_growth_over_floor']:.2f}) "
            f"| {r['fused_growth_bytes'] / mib:.0f} ({r['fused_growth_over_floor']:.2f}) "
            f"| {r['mem_ratio']:.1f} "
            f"| {r['naive_cpu_s']:.2f} / {r['naive_wall_s']:.2f} "
            f"| {r['fused_cpu_s']:.2f} / {r['fused_wall_s']:.2f} "
            f"| {r['time_ratio']:.2f} / {r['wall_time_ratio']:.2f} |"
        )
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small case, under a minute")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per implementation")
    parser.add_argument("--chunk-size", type=int, default=None, help="fused chunk (default auto)")
    parser.add_argument("--worker", choices=["naive", "fused"], help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["memory", "time"], help=argparse.SUPPRESS)
    parser.add_argument("--case", type=int, nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        args.impl = args.worker
        print(json.dumps(_worker(args)))
        return
    if args.quick:
        args.repeats = min(args.repeats, 1)
    cases = QUICK_CASES if args.quick else FULL_CASES
    rows = []
    for case in cases:
        rows.append(_run_case(case, args))
        print(f"done {case}", file=sys.stderr, flush=True)
    import torch

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__},
        "dtype": "float32",
        "config": {"kd_loss": "fwd_kl", "topk_normalization": "renormalize",
                   "kd_loss_weight": 1.0, "sft_loss_weight": 1.0},
        "goals": {"fused_growth_over_floor_max": MEM_GOAL, "time_ratio_fused_over_naive_max": TIME_GOAL},
        "cases": rows,
    }
    print(_format_table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
