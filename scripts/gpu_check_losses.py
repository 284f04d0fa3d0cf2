"""GPU check of the losses stack on one H100, in well under 8 minutes; prints a table.

(a) Liger on the student: a SmolLM2-135M-shaped Llama cut to 10 layers (hidden 576, vocab
    49152, random init from a config, no downloads), bf16, batch 8 x 1024 tokens. Forward +
    backward with HF's own loss, first unpatched, then patched in place with
    `liger_kernel.transformers.apply_liger_kernel_to_llama(rms_norm, rope, swiglu;
    cross_entropy=False, fused_linear_cross_entropy=False)` (the patch is process-wide, so the
    unpatched run must come first). Reports max |logits diff|, |loss diff|, the relative
    difference of the embedding gradient, and the step times.
(b) `fused_topk_kd_loss` at the benchmark shapes (N=4096, (H, V) = (576, 49152) and
    (2048, 128256), k=64): error of the bf16 and fp32 fused loss and gradients against the
    float64 reference on the same (upcast) values, then peak memory growth
    (`torch.cuda.max_memory_allocated` minus the allocation before the step) and time of one
    forward+backward, fused (auto chunk, chunk 1024, and compiled for the first shape) vs naive
    (bf16 logits + reference loss + autograd).

Runs with torch + transformers (+ triton); imports `kd_pipeline.core.losses` through `src/` on
sys.path (no install, no kedro). If `liger_kernel` is not importable it is installed from the
wheel folder given by `--wheels` (`pip --no-index --no-deps`); without one the Liger rows say
"liger unavailable". Every section catches its own errors, so a table is always printed.
Writes `gpu_check_losses.json` under $OUT when set (or `--out FILE`).

`--dry-run`: tiny shapes on CPU (Liger skipped): checks the script and its helpers.

Usage:
    python scripts/gpu_check_losses.py [--wheels DIR] [--out FILE] [--dry-run]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))

import torch  # noqa: E402

from kd_pipeline.core.atomic import write_json_atomic  # noqa: E402
from kd_pipeline.core.losses import (  # noqa: E402
    KDLossConfig,
    auto_chunk_size,
    fused_topk_kd_loss,
    topk_kd_loss_reference,
)

SMOLLM2_135M_10_LAYERS = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=10,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_act="silu",
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
)
TINY_LLAMA = dict(
    SMOLLM2_135M_10_LAYERS, vocab_size=256, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
)
LOSS_SHAPES = [(4096, 576, 49152, 64), (4096, 2048, 128256, 64)]  # (N, H, V, K)
TINY_LOSS_SHAPES = [(40, 16, 97, 8)]
LOSS_CONFIG = KDLossConfig(kd_loss_weight=1.0, sft_loss_weight=1.0)  # top-k and full-vocab paths


def ensure_liger(wheels: str | None) -> str:
    """Makes `liger_kernel` importable if possible; returns a status line."""
    if importlib.util.find_spec("liger_kernel") is not None:
        return "present"
    if not wheels:
        return "liger unavailable (not installed, no --wheels)"
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
               "--find-links", wheels, "liger-kernel"]
    result = subprocess.run(command, capture_output=True, text=True)
    importlib.invalidate_caches()
    if result.returncode != 0 or importlib.util.find_spec("liger_kernel") is None:
        return f"liger unavailable (pip from {wheels} failed: {result.stderr.strip()[-200:]})"
    return f"installed from {wheels}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median wall seconds of `fn()` over `repeats` calls after one warm-up; and the last result."""
    result = fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], result


def peak_growth_bytes(fn, device: torch.device) -> int | None:
    """Peak CUDA allocation during `fn()` above what was allocated before it (None on CPU)."""
    if device.type != "cuda":
        fn()
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def relative_max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference| (both compared in float64)."""
    reference = reference.double()
    scale = reference.abs().max().item()
    return (value.double() - reference).abs().max().item() / (scale if scale > 0 else 1.0)


def make_loss_inputs(n: int, h: int, v: int, k: int, device: torch.device, seed: int = 0):
    """float32 hidden/weight and teacher top-k rows (K distinct ids, full-vocab log-probs)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / math.sqrt(h)
    offset = torch.randint(0, v, (n, 1), generator=gen)
    step = torch.randint(1, max(2, v // k), (n, 1), generator=gen)
    topk_ids = (offset + step * torch.arange(k)) % v  # distinct: k * step < v
    topk_logprobs = (3 * torch.randn(n, k + 1, generator=gen)).log_softmax(-1)[:, :k]
    topk_logprobs = topk_logprobs.sort(dim=1, descending=True).values
    labels = torch.randint(0, v, (n,), generator=gen)
    token_weights = torch.full((n,), 1.0 / n)
    return tuple(t.to(device) for t in (hidden, weight, topk_ids, topk_logprobs, labels, token_weights))


def loss_step(impl: str, hidden, weight, targets, config: KDLossConfig):
    """One forward+backward; returns (loss, grad_hidden, grad_weight). `impl`: fused | naive."""
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    if impl == "fused":
        out = fused_topk_kd_loss(hidden, weight, None, *targets, config)
    else:
        out = topk_kd_loss_reference(hidden @ weight.t(), *targets, config)
    out.loss.backward()
    return out.loss.detach(), hidden.grad, weight.grad


def check_loss_shape(shape, device: torch.device, repeats: int, compile_ok: bool) -> list[dict]:
    n, h, v, k = shape
    hidden, weight, *targets = make_loss_inputs(n, h, v, k, device)
    rows = []
    base = {"section": "kd_loss", "n": n, "hidden": h, "vocab": v, "k": k}

    # Accuracy: fused in bf16 / fp32 vs the float64 reference on the same rounded values.
    for dtype in (torch.bfloat16, torch.float32):
        row = dict(base, check=f"fused {str(dtype).split('.')[-1]} vs float64 reference")
        try:
            h_in, w_in = hidden.to(dtype), weight.to(dtype)
            loss, grad_h, grad_w = loss_step("fused", h_in, w_in, targets, LOSS_CONFIG)
            ref_targets = [t.double() if t.is_floating_point() else t for t in targets]
            ref_loss, ref_h, ref_w = loss_step("naive", h_in.double(), w_in.double(), ref_targets, LOSS_CONFIG)
            row.update(
                loss=loss.item(), reference_loss=ref_loss.item(),
                loss_rel_error=abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
                grad_hidden_rel_error=relative_max_error(grad_h, ref_h),
                grad_weight_rel_error=relative_max_error(grad_w, ref_w),
            )
            del ref_h, ref_w, grad_h, grad_w
        except Exception as error:  # report, keep going
            row["error"] = _short(error)
        rows.append(row)
        _free(device)

    # Memory and time, bf16: naive vs fused (auto chunk, chunk 1024, compiled).
    h_bf16, w_bf16 = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
    floor = (v * h + n * h) * 2  # bf16 gradients of the lm_head weight and of the hidden states
    variants = [("naive", LOSS_CONFIG), ("fused", LOSS_CONFIG),
                ("fused", KDLossConfig(kd_loss_weight=1.0, sft_loss_weight=1.0, chunk_size=1024))]
    if compile_ok:
        variants.append(("fused", KDLossConfig(kd_loss_weight=1.0, sft_loss_weight=1.0, compiled=True)))
    # The GEMM floor: the three lm_head GEMMs alone (logits, d hidden, d weight) at full size.
    floor_time = None
    row = dict(base, check="bf16 time: GEMM floor (3 head GEMMs)")
    try:
        def gemms():
            with torch.no_grad():
                logits = h_bf16 @ w_bf16.t()
                return logits @ w_bf16, logits.t() @ h_bf16

        floor_time, _ = timed(gemms, device, repeats)
        row["seconds"] = floor_time
    except Exception as error:
        row["error"] = _short(error)
    rows.append(row)
    _free(device)
    liger_jsd = _liger_jsd_step(n, h, v, device, targets[2])
    if liger_jsd is not None:
        variants.append(("liger_jsd", liger_jsd))
    naive_time = naive_peak = None
    for impl, config in variants:
        if impl == "liger_jsd":
            row = dict(base, check="bf16 memory/time: Liger chunked fused-linear JSD (dense online teacher)",
                       floor_bytes=floor)
            try:
                seconds, _ = timed(config, device, repeats)
                _free(device)
                peak = peak_growth_bytes(config, device)
                row.update(seconds=seconds, peak_growth_bytes=peak)
                if peak is not None:
                    row["growth_over_floor"] = peak / floor
                if floor_time:
                    row["time_over_gemm_floor"] = seconds / floor_time
            except Exception as error:
                row["error"] = _short(error)
            rows.append(row)
            _free(device)
            continue
        chunk = config.chunk_size or auto_chunk_size(n, v, h)
        label = "naive" if impl == "naive" else f"fused chunk={chunk}" + (" compiled" if config.compiled else "")
        row = dict(base, check=f"bf16 memory/time: {label}", floor_bytes=floor)
        try:
            def step(impl=impl, config=config):
                return loss_step(impl, h_bf16, w_bf16, targets, config)

            seconds, _ = timed(step, device, repeats)  # also warms up (and compiles)
            _free(device)
            peak = peak_growth_bytes(step, device)
            row.update(seconds=seconds, peak_growth_bytes=peak)
            if peak is not None:
                row["growth_over_floor"] = peak / floor
            if floor_time:
                row["time_over_gemm_floor"] = seconds / floor_time
            if impl == "naive":
                naive_time, naive_peak = seconds, peak
            else:
                if naive_time:
                    row["time_ratio_fused_over_naive"] = seconds / naive_time
                if naive_peak and peak:
                    row["mem_ratio_naive_over_fused"] = naive_peak / peak
        except Exception as error:
            row["error"] = _short(error)
        rows.append(row)
        _free(device)
    return rows


def _liger_jsd_step(n: int, h: int, v: int, device: torch.device, labels: torch.Tensor):
    """A forward+backward of Liger's chunked fused-linear JSD (bf16, a dense teacher of the same
    shape given as hidden states + lm_head), or None when liger_kernel is not importable."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        return None
    gen = torch.Generator().manual_seed(11)
    teacher_hidden = torch.randn(n, h, generator=gen).to(device, torch.bfloat16)
    teacher_weight = (torch.randn(v, h, generator=gen) / math.sqrt(h)).to(device, torch.bfloat16)
    student_hidden = torch.randn(n, h, generator=gen).to(device, torch.bfloat16)
    student_weight = (torch.randn(v, h, generator=gen) / math.sqrt(h)).to(device, torch.bfloat16)
    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=1.0, beta=0.0,
                                      compiled=device.type == "cuda")

    def step():
        hidden = student_hidden.detach().requires_grad_()
        weight = student_weight.detach().requires_grad_()
        loss = loss_fn(hidden, weight, teacher_hidden, teacher_weight, labels)
        loss.backward()
        return loss.detach()

    return step


def check_liger_student(device: torch.device, liger_status: str, dry_run: bool) -> list[dict]:
    """Unpatched vs Liger-patched Llama student: numerics and fwd+bwd time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**(TINY_LLAMA if dry_run else SMOLLM2_135M_10_LAYERS))
    dtype = torch.float32 if dry_run else torch.bfloat16
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    batch, seq = (2, 16) if dry_run else (8, 1024)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
        return out.logits.detach(), out.loss.detach(), model.get_input_embeddings().weight.grad

    seconds, (logits, loss, grad) = timed(step, device, repeats=2 if dry_run else 5)
    rows = [{"section": "liger_student", "check": "unpatched", "seconds": seconds, "loss": loss.item()}]
    if device.type != "cuda" or liger_status.startswith("liger unavailable"):
        reason = "skipped on CPU (Triton kernels need CUDA)" if device.type != "cuda" else liger_status
        rows.append({"section": "liger_student", "check": "liger patched", "error": reason})
        return rows
    row = {"section": "liger_student", "check": "liger patched (rms_norm, rope, swiglu)"}
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=model)
        patched_seconds, (patched_logits, patched_loss, patched_grad) = timed(step, device, repeats=5)
        row.update(
            seconds=patched_seconds, loss=patched_loss.item(),
            speedup=seconds / patched_seconds,
            max_abs_logits_diff=(patched_logits.float() - logits.float()).abs().max().item(),
            abs_loss_diff=abs(patched_loss.item() - loss.item()),
            embedding_grad_rel_error=relative_max_error(patched_grad, grad),
        )
    except Exception as error:
        row["error"] = _short(error)
    rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    keys = ["section", "check", "n", "hidden", "vocab", "loss_rel_error", "grad_hidden_rel_error",
            "grad_weight_rel_error", "max_abs_logits_diff", "abs_loss_diff", "embedding_grad_rel_error",
            "seconds", "peak_growth_bytes", "growth_over_floor", "mem_ratio_naive_over_fused",
            "time_ratio_fused_over_naive", "time_over_gemm_floor", "speedup", "error"]
    present = [key for key in keys if any(key in row for row in rows)]
    lines = ["| " + " | ".join(present) + " |", "|" + "---|" * len(present)]
    for row in rows:
        cells = []
        for key in present:
            value = row.get(key, "")
            if key == "peak_growth_bytes" and isinstance(value, int):
                value = f"{value / 2**20:.0f} MiB"
            elif isinstance(value, float):
                value = f"{value:.3g}"
            cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _short(error: Exception) -> str:
    tail = traceback.format_exception_only(type(error), error)[-1].strip()
    return tail[:300]


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", help="folder with a liger-kernel wheel, installed if liger is absent")
    parser.add_argument("--out", type=Path, help="JSON output (default $OUT/gpu_check_losses.json)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device: run with --dry-run for the CPU self-check", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    liger_status = "not used (dry run)" if args.dry_run else ensure_liger(args.wheels)
    report = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu (dry run)",
        "torch": torch.__version__, "liger": liger_status, "rows": [],
    }
    try:
        import transformers

        report["transformers"] = transformers.__version__
    except ImportError:
        report["transformers"] = "absent"

    sections = [("liger_student", lambda: check_liger_student(device, liger_status, args.dry_run))]
    shapes = TINY_LOSS_SHAPES if args.dry_run else LOSS_SHAPES
    for index, shape in enumerate(shapes):
        compile_ok = cuda and index == 0 and not args.no_compile
        sections.append(("kd_loss", lambda shape=shape, compile_ok=compile_ok: check_loss_shape(
            shape, device, repeats=2 if args.dry_run else 5, compile_ok=compile_ok)))
    for name, run in sections:
        section_start = time.perf_counter()
        try:
            report["rows"].extend(run())
        except Exception as error:
            report["rows"].append({"section": name, "check": "section failed", "error": _short(error)})
            traceback.print_exc()
        print(f"[{name}] {time.perf_counter() - section_start:.1f}s", file=sys.stderr, flush=True)
        _free(device)
    report["total_seconds"] = time.perf_counter() - started

    print(f"device: {report['device']}  torch {report['torch']}  transformers {report['transformers']}  "
          f"liger: {liger_status}")
    print(format_table(report["rows"]))
    out = args.out or (Path(os.environ["OUT"]) / "gpu_check_losses.json" if os.environ.get("OUT") else None)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, report, default=str)
    expected_gaps = ("skipped", "liger unavailable")
    failed = [row for row in report["rows"] if not str(row.get("error", "skipped")).startswith(expected_gaps)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
