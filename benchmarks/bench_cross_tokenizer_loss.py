"""Benchmark: the cross-tokenizer loss against the same-tokenizer fused loss, float32 on CPU.

For each case (N student rows, hidden H, student vocab V, top-k K) one forward+backward of

* `fused`: `fused_topk_kd_loss` (the same-tokenizer path, one teacher row per student row),
* `cross_identity`: `cross_tokenizer_kd_loss` with the identity map and one-row groups (the
  same loss value, tested), and
* `cross_pair`: `cross_tokenizer_kd_loss` on a map like a real pair (about half the classes
  matched, some with several ids per side) and groups of 1-3 rows, with the ULD term,

all with `kd_loss_weight = sft_loss_weight = 1`. Memory and time are measured as in
`bench_loss.py` (fresh worker per measurement, `MALLOC_MMAP_THRESHOLD_`, VmHWM growth; min CPU
time over repeats). The floor is the gradients of the lm_head and the hidden states, V*H + N*H
floats. Goal: cross growth <= 2 x floor (a chunk holds its logits, the hand-assembled gradient
and the first rows' copy outside the matched buckets; met since stop 18, docs/benchmarks.md). No
time goal (reported).

Usage:
    python benchmarks/bench_cross_tokenizer_loss.py [--quick] [--out FILE.json] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FULL_CASES = [(2048, 576, 49152, 64), (2048, 576, 8192, 64)]  # (N, H, V, K)
QUICK_CASES = [(512, 256, 8192, 32)]
IMPLS = ("fused", "cross_identity", "cross_pair")
BYTES_PER_FLOAT = 4
MEM_GOAL = 2.0


def _make_inputs(impl: str, num_tokens: int, hidden_size: int, vocab_size: int, k: int, seed: int):
    import numpy as np
    import torch

    from kd_pipeline.core.cross_tokenizer.groups import AlignedGroupBatch
    from kd_pipeline.core.cross_tokenizer.vocab_map import VocabMap

    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen)
    weight = torch.randn(vocab_size, hidden_size, generator=gen) / hidden_size**0.5
    labels = torch.randint(0, vocab_size, (num_tokens,), generator=gen)
    token_weights = torch.full((num_tokens,), 1.0 / num_tokens)
    if impl == "cross_pair":
        rng = np.random.default_rng(seed)
        teacher_vocab = vocab_size + vocab_size // 4
        shared = vocab_size // 2
        teacher_class = np.concatenate([rng.integers(0, shared, teacher_vocab // 2),
                                        shared + np.arange(teacher_vocab - teacher_vocab // 2)])
        student_class = np.concatenate([np.arange(shared), rng.integers(0, shared, vocab_size // 4),
                                        teacher_vocab + np.arange(vocab_size - shared - vocab_size // 4)])
        vocab_map = VocabMap(teacher_class, student_class, {})
        sizes = rng.integers(1, 4, num_tokens)
        stops = np.cumsum(sizes)
        stops = stops[stops <= num_tokens]
        starts = np.concatenate([[0], stops[:-1]])
    else:
        teacher_vocab = vocab_size
        vocab_map = VocabMap(np.arange(vocab_size), np.arange(vocab_size), {})
        starts, stops = np.arange(num_tokens), np.arange(1, num_tokens + 1)
    groups = len(starts)
    topk_logprobs, topk_ids = (2 * torch.randn(groups, teacher_vocab, generator=gen)).log_softmax(-1).topk(k, dim=-1)
    chain = -torch.rand(groups, generator=gen) * (torch.as_tensor(stops - starts) > 1)
    batch = AlignedGroupBatch(torch.as_tensor(starts), torch.as_tensor(stops), topk_ids, topk_logprobs, chain,
                              token_weights[torch.as_tensor(starts)])
    return hidden, weight, labels, token_weights, batch, vocab_map.projection()


def _step(impl: str, inputs, config, options) -> None:
    from kd_pipeline.core.cross_tokenizer.loss import cross_tokenizer_kd_loss
    from kd_pipeline.core.losses import fused_topk_kd_loss

    hidden, weight, labels, token_weights, batch, projection = inputs
    if impl == "fused":
        out = fused_topk_kd_loss(hidden, weight, None, batch.topk_ids, batch.topk_logprobs, labels, token_weights,
                                 config)
    else:
        out = cross_tokenizer_kd_loss(hidden, weight, None, labels, token_weights, batch, projection, config, options)
    out.loss.backward()


def _worker(args: argparse.Namespace) -> dict:
    import torch
    from _common import status_kib as _read_status_kib

    from kd_pipeline.core.cross_tokenizer.loss import CrossTokenizerOptions
    from kd_pipeline.core.losses import KDLossConfig

    config = KDLossConfig(kd_loss_weight=1.0, sft_loss_weight=1.0, topk_normalization="tail_bucket")
    options = CrossTokenizerOptions(uld_loss_weight=1.0)
    num_tokens, hidden_size, vocab_size, k = args.case
    warm = _make_inputs(args.impl, 8, hidden_size, 256, min(k, 64), seed=1)
    for leaf in warm[:2]:
        leaf.requires_grad_()
    _step(args.impl, warm, config, options)
    del warm
    inputs = _make_inputs(args.impl, num_tokens, hidden_size, vocab_size, k, seed=0)
    leaves = inputs[:2]
    for leaf in leaves:
        leaf.requires_grad_()
    result: dict = {}
    if args.measure == "memory":
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        before_kib = _read_status_kib("VmRSS")
        _step(args.impl, inputs, config, options)
        result["growth_bytes"] = (_read_status_kib("VmHWM") - before_kib) * 1024
    else:
        cpu, wall = [], []
        for repeat in range(args.repeats + 1):
            for leaf in leaves:
                leaf.grad = None
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            _step(args.impl, inputs, config, options)
            if repeat > 0:
                wall.append(time.perf_counter() - wall_start)
                cpu.append(time.process_time() - cpu_start)
        result.update(wall_s=min(wall), cpu_s=min(cpu), threads=torch.get_num_threads())
    return result


def _run_worker(impl: str, case, measure: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    if measure == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    command = [sys.executable, __file__, "--worker", impl, "--measure", measure, "--case", *map(str, case),
               "--repeats", str(args.repeats)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"worker {impl} {case} {measure} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks/results/bench_cross_tokenizer_loss.json")
    parser.add_argument("--worker", choices=IMPLS)
    parser.add_argument("--measure", choices=("memory", "time"))
    parser.add_argument("--case", type=int, nargs=4)
    args = parser.parse_args(argv)
    if args.worker:
        args.impl = args.worker
        print(json.dumps(_worker(args)))
        return
    rows = []
    for case in QUICK_CASES if args.quick else FULL_CASES:
        n, h, v, k = case
        floor = (v * h + n * h) * BYTES_PER_FLOAT
        row = {"n": n, "hidden": h, "vocab": v, "k": k, "floor_bytes": floor}
        for impl in IMPLS:
            row[f"{impl}_growth_over_floor"] = _run_worker(impl, case, "memory", args)["growth_bytes"] / floor
            row[f"{impl}_cpu_s"] = _run_worker(impl, case, "time", args)["cpu_s"]
        row["mem_goal_met"] = max(row["cross_identity_growth_over_floor"], row["cross_pair_growth_over_floor"]) <= MEM_GOAL
        rows.append(row)
    lines = ["| N | H | V | K | growth x floor: fused / cross identity / cross pair | CPU s: fused / cross identity / "
             "cross pair | cross <= 2x floor |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['hidden']} | {r['vocab']} | {r['k']} | {r['fused_growth_over_floor']:.2f} / "
                     f"{r['cross_identity_growth_over_floor']:.2f} / {r['cross_pair_growth_over_floor']:.2f} | "
                     f"{r['fused_cpu_s']:.2f} / {r['cross_identity_cpu_s']:.2f} / {r['cross_pair_cpu_s']:.2f} | "
                     f"{r['mem_goal_met']} |")
    print("\n".join(lines))
    from _common import write_report

    write_report(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
