"""Benchmark: fused chunked top-k KD loss vs its GEMM floor, the naive full-logits loss and
Liger's chunked fused-linear JSD, in float32 and bf16 on CPU, side by side in one run.

For each case (N tokens, hidden H, vocab V, top-k K) and dtype (`--dtypes`, default
float32,bfloat16: hidden and lm_head weight in that dtype, loss accumulated in float32) it
measures one forward+backward step of

* floor: the three lm_head GEMMs alone, at full size: `z = h @ W.T` (N x V), `dh = z @ W`,
  `dW = z.T @ h` -- what any implementation of a loss on the student logits must compute;
* naive: `logits = hidden @ weight.T` (N x V) + `topk_kd_loss_reference` + autograd;
* fused: `fused_topk_kd_loss(hidden, weight, ...)` at the automatic chunk size and at each
  `--chunk-sizes` value, and with `compiled: true` (torch.compile of the chunk step) at each
  `--compiled-chunk-sizes` value (`first_call_wall_s`: the first two calls, compilation included);
* liger_jsd: `liger_kernel.chunked_loss.LigerFusedLinearJSDLoss` (eager; `--liger-compiled`
  for torch.compile) with a dense *online* teacher (teacher hidden + teacher lm_head of the same
  shape): a different loss that also needs the teacher's logits, shown for scale;

with `kd_loss_weight = sft_loss_weight = 1` (so both the top-k and the full-vocabulary gradient
paths run) and reports peak memory growth and time. Any implementation has to allocate the
gradients of the lm_head weight and of the hidden states, V*H + N*H floats (float32): that is
the memory floor; the goals are fused growth <= 1.25 x floor and fused time <= 1.25 x the GEMM
floor of the same dtype.

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
    python benchmarks/bench_loss.py [--quick] [--out FILE.json] [--repeats R] [--chunk-sizes 128,256]
        [--dtypes float32,bfloat16] [--cases 2048x576x49152x64] [--no-liger] [--liger-compiled]
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

from _common import status_kib as _read_status_kib
from _common import write_report

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))

FULL_CASES = [  # (N, H, V, K)
    (2048, 576, 49152, 64),
    (4096, 2048, 128256, 64),
]
QUICK_CASES = [(1024, 576, 49152, 64)]
BYTES_PER_FLOAT = 4
MEM_GOAL = 1.25
TIME_GOAL = 1.25  # fused time / GEMM floor time, same dtype


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


def _cast(inputs, dtype: str):
    import torch

    hidden, weight, *rest = inputs
    dtype = getattr(torch, dtype)
    return (hidden.to(dtype), weight.to(dtype), *rest)


def _step(impl: str, inputs, config, liger_loss=None) -> None:
    """One forward+backward of `impl`; grads stay on the leaves (hidden, weight)."""
    import torch

    from kd_pipeline.core.losses import fused_topk_kd_loss, topk_kd_loss_reference

    hidden, weight, topk_ids, topk_logprobs, labels, token_weights = inputs[:6]
    if impl == "floor":
        with torch.no_grad():
            logits = hidden @ weight.t()  # (N, V)
            hidden.grad = logits @ weight  # (N, H)
            weight.grad = logits.t() @ hidden  # (V, H)
        return
    if impl == "naive":
        logits = (hidden @ weight.t()).float()  # (N, V)
        out = topk_kd_loss_reference(logits, topk_ids, topk_logprobs, labels, token_weights, config)
        out.loss.backward()
    elif impl == "liger_jsd":
        teacher_hidden, teacher_weight = inputs[6:8]
        liger_loss(hidden, weight, teacher_hidden, teacher_weight, labels).backward()
    else:
        out = fused_topk_kd_loss(
            hidden, weight, None, topk_ids, topk_logprobs, labels, token_weights, config
        )
        out.loss.backward()


def _worker(args: argparse.Namespace) -> dict:
    import torch

    from kd_pipeline.core.losses import KDLossConfig

    config = KDLossConfig(kd_loss_weight=1.0, sft_loss_weight=1.0, chunk_size=args.chunk_size,
                          compiled=args.compiled)
    num_tokens, hidden_size, vocab_size, k = args.case
    liger_loss = None
    if args.impl == "liger_jsd":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger_loss = LigerFusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=1.0, beta=0.0,
                                             compiled=args.liger_compiled)

    def make(n, v, kk, seed):
        inputs = _cast(_make_inputs(n, hidden_size, v, kk, seed=seed), args.dtype)
        if args.impl == "liger_jsd":  # an online teacher of the same shape, no gradients
            gen = torch.Generator().manual_seed(seed + 7)
            dtype = inputs[0].dtype
            inputs = (*inputs, torch.randn(n, hidden_size, generator=gen).to(dtype),
                      (torch.randn(v, hidden_size, generator=gen) / hidden_size**0.5).to(dtype))
        return inputs

    warm = make(8, 256, min(k, 256), 1)
    warm_leaves = [t.requires_grad_() for t in warm[:2]]
    warm_start = time.perf_counter()
    _step(args.impl, warm, config, liger_loss)
    warm_wall = time.perf_counter() - warm_start  # with --compiled: the first compilation
    del warm, warm_leaves

    inputs = make(num_tokens, vocab_size, k, 0)
    leaves = inputs[:2]
    for leaf in leaves:
        leaf.requires_grad_()
    result: dict = {}
    if args.measure == "memory":
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        before_kib = _read_status_kib("VmRSS")
        _step(args.impl, inputs, config, liger_loss)
        result["growth_bytes"] = (_read_status_kib("VmHWM") - before_kib) * 1024
        result["warmup_wall_s"] = warm_wall
    else:
        wall, cpu = [], []
        for repeat in range(args.repeats + 1):
            for leaf in leaves:
                leaf.grad = None
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            _step(args.impl, inputs, config, liger_loss)
            if repeat > 0:  # the first step pays page faults and lazy init (and recompiles)
                wall.append(time.perf_counter() - wall_start)
                cpu.append(time.process_time() - cpu_start)
            else:
                first_wall = time.perf_counter() - wall_start
        result.update(wall_s=min(wall), cpu_s=min(cpu), threads=torch.get_num_threads(),
                      first_step_wall_s=first_wall, warmup_wall_s=warm_wall)
    return result


def _run_worker(impl: str, case, measure: str, dtype: str, chunk_size, args: argparse.Namespace,
                compiled: bool = False) -> dict:
    env = dict(os.environ)
    if measure == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    command = [
        sys.executable, __file__, "--worker", impl, "--measure", measure, "--dtype", dtype,
        "--case", *map(str, case), "--repeats", str(args.repeats),
    ]
    if chunk_size is not None:
        command += ["--chunk-size", str(chunk_size)]
    if args.liger_compiled:
        command.append("--liger-compiled")
    if compiled:
        command.append("--compiled")
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"worker {impl} {case} {dtype} {measure} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _run_case(case, dtype: str, args: argparse.Namespace) -> dict:
    from kd_pipeline.core.losses import auto_chunk_size

    num_tokens, hidden_size, vocab_size, k = case
    floor = (vocab_size * hidden_size + num_tokens * hidden_size) * BYTES_PER_FLOAT
    auto = auto_chunk_size(num_tokens, vocab_size, hidden_size)
    row = {"n": num_tokens, "hidden": hidden_size, "vocab": vocab_size, "k": k, "dtype": dtype,
           "auto_chunk_size": auto, "floor_bytes": floor, "impls": {}}
    impls = [("floor", None), ("naive", None), ("fused", None)]
    impls += [(f"fused_c{c}", c) for c in args.chunk_sizes if c != auto]
    impls += [(f"fused_compiled_c{c}", c) for c in args.compiled_chunk_sizes]
    if args.liger:
        impls.append(("liger_jsd", None))
    for name, chunk in impls:
        impl = "fused" if name.startswith("fused") else name
        compiled = name.startswith("fused_compiled")
        try:
            memory = _run_worker(impl, case, "memory", dtype, chunk, args, compiled)
            timing = _run_worker(impl, case, "time", dtype, chunk, args, compiled)
        except RuntimeError as error:
            row["impls"][name] = {"error": str(error)[-500:]}
            print(f"  {name}: failed ({str(error).splitlines()[-1][:200]})", file=sys.stderr)
            continue
        row["impls"][name] = {"chunk_size": chunk or (auto if impl == "fused" else None),
                              "growth_bytes": memory["growth_bytes"], "growth_over_floor": memory["growth_bytes"] / floor,
                              "wall_s": timing["wall_s"], "cpu_s": timing["cpu_s"],
                              "first_call_wall_s": timing["warmup_wall_s"] + timing["first_step_wall_s"]}
        print(f"  {dtype} {name}: cpu {timing['cpu_s']:.2f} s, wall {timing['wall_s']:.2f} s, "
              f"growth {memory['growth_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    gemm = row["impls"].get("floor", {})
    for entry in row["impls"].values():
        if "cpu_s" in entry and "cpu_s" in gemm:
            entry["cpu_over_gemm_floor"] = entry["cpu_s"] / gemm["cpu_s"]
            entry["wall_over_gemm_floor"] = entry["wall_s"] / gemm["wall_s"]
    fused = row["impls"].get("fused", {})
    if "cpu_over_gemm_floor" in fused:
        row["time_goal_met"] = fused["cpu_over_gemm_floor"] <= TIME_GOAL
        row["mem_goal_met"] = fused["growth_over_floor"] <= MEM_GOAL
    return row


def _format_table(rows: list[dict]) -> str:
    mib = 2**20
    header = ("| N | H | V | K | dtype | impl | chunk | growth MiB (x mem floor) | s (cpu / wall) | "
              "x GEMM floor (cpu / wall) |")
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        for name, e in r["impls"].items():
            if "error" in e:
                lines.append(f"| {r['n']} | {r['hidden']} | {r['vocab']} | {r['k']} | {r['dtype']} | {name} | | failed | | |")
                continue
            ratio = (f"{e['cpu_over_gemm_floor']:.2f} / {e['wall_over_gemm_floor']:.2f}"
                     if "cpu_over_gemm_floor" in e else "")
            lines.append(
                f"| {r['n']} | {r['hidden']} | {r['vocab']} | {r['k']} | {r['dtype']} | {name} | {e['chunk_size'] or ''} "
                f"| {e['growth_bytes'] / mib:.0f} ({e['growth_over_floor']:.2f}) "
                f"| {e['cpu_s']:.2f} / {e['wall_s']:.2f} | {ratio} |"
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
    parser.add_argument("--quick", action="store_true", help="one small case, float32 + bf16, a few minutes")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per implementation")
    parser.add_argument("--chunk-sizes", default="256", help="extra fused chunk sizes (comma list)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--cases", default=None, help="NxHxVxK,... (default: the full or quick set)")
    parser.add_argument("--no-liger", dest="liger", action="store_false", help="skip Liger's chunked JSD")
    parser.add_argument("--liger-compiled", action="store_true", help="torch.compile Liger's chunk step")
    parser.add_argument("--compiled-chunk-sizes", default="",
                        help="also the fused loss with `compiled: true` at these chunk sizes (comma list)")
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["floor", "naive", "fused", "liger_jsd"], help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["memory", "time"], help=argparse.SUPPRESS)
    parser.add_argument("--case", type=int, nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        args.impl = args.worker
        print(json.dumps(_worker(args)))
        return
    if args.quick:
        args.repeats = min(args.repeats, 1)
    args.chunk_sizes = [int(c) for c in args.chunk_sizes.split(",") if c]
    args.compiled_chunk_sizes = [int(c) for c in args.compiled_chunk_sizes.split(",") if c]
    if args.cases:
        cases = [tuple(int(x) for x in case.split("x")) for case in args.cases.split(",")]
    else:
        cases = QUICK_CASES if args.quick else FULL_CASES
    rows = []
    load_start = os.getloadavg()[0]
    for case in cases:
        for dtype in args.dtypes.split(","):
            rows.append(_run_case(case, dtype, args))
            print(f"done {case} {dtype}", file=sys.stderr, flush=True)
    import torch

    from kd_pipeline.core.losses import KDLossConfig

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "load_average_1m": [load_start, os.getloadavg()[0]]},
        "config": {"kd_loss": KDLossConfig().kd_loss, "topk_normalization": KDLossConfig().topk_normalization,
                   "kd_loss_weight": 1.0, "sft_loss_weight": 1.0},
        "goals": {"fused_growth_over_floor_max": MEM_GOAL, "fused_time_over_gemm_floor_max": TIME_GOAL},
        "cases": rows,
    }
    print(_format_table(rows))
    if args.out:
        write_report(args.out, report)


if __name__ == "__main__":
    main()
