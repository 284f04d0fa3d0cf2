"""Benchmark: a bf16 vs a float32 teacher on the default corpus: numerics and extraction tokens/s.

The teacher folder (default `data/06_models/teacher`) is loaded twice, float32 and bfloat16,
and both run the production extraction path (`core.extraction.head.teacher_rows`: decoder,
LM head on the trained rows only, top-k, log-normalizer) over the same length-planned batches of
the tokenized corpus (default `data/03_primary/tokenized_corpus`, `--samples` of them spread over
the length range). Variants:

* `fp32`: float32 weights (the reference);
* `bf16`: bfloat16 decoder, LM head in float32 (the head's float32 copy; the extraction default);
* `bf16_head_bf16`: bfloat16 decoder and head, logits rounded to bf16 before the float32 top-k.

Numerics per variant against `fp32`, over all trained rows: the mean and the 5th percentile of
|top-k set intersection| / k, top-1 agreement, the max and mean |log-prob error| of the top-k
entries (matched by id where both have it) and of the target token's log-prob.

Speed: the passes are interleaved batch by batch (fp32, bf16, bf16_head_bf16, rotated per
repeat) so that load from other processes hits them alike; per variant the summed wall and
process-CPU seconds of the fastest repeat of each batch, tokens/s from those, and the
bf16 / fp32 ratio.

Usage:
    python benchmarks/bench_precision.py [--samples 48] [--repeats 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from _common import write_report

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))

from kd_pipeline.core.corpus import TokenizedCorpus  # noqa: E402
from kd_pipeline.core.devices import has_native_bf16  # noqa: E402
from kd_pipeline.core.extraction.config import ExtractionConfig  # noqa: E402
from kd_pipeline.core.extraction.head import TopKHead, teacher_rows  # noqa: E402
from kd_pipeline.core.extraction.plan import CorpusArrays  # noqa: E402
from kd_pipeline.core.models.loading import load_causal_lm  # noqa: E402

VARIANTS = ("fp32", "bf16", "bf16_head_bf16")


def _numerics(reference, got, k: int) -> dict:
    ref_ids, got_ids = reference.topk_ids.long(), got.topk_ids.long()
    # |intersection| per row: ids of `got` found in the row of `ref`.
    match = got_ids[:, :, None] == ref_ids[:, None, :]  # (N, k, k)
    overlap = match.any(dim=2).float().sum(dim=1) / k
    top1 = (ref_ids[:, 0] == got_ids[:, 0]).float()
    # Log-prob error over the entries both sets hold: got's entry j vs ref's entry at the same id.
    in_ref = match.any(dim=2)
    ref_at = (match.float() * reference.topk_logprobs[:, None, :]).sum(dim=2)
    errors = (got.topk_logprobs - ref_at).abs()[in_ref]
    target_err = (got.target_logprobs - reference.target_logprobs).abs()
    return {
        "rows": int(ref_ids.shape[0]),
        "topk_overlap_mean": float(overlap.mean()),
        "topk_overlap_p05": float(overlap.quantile(0.05)),
        "top1_agreement": float(top1.mean()),
        "topk_logprob_abs_err_mean": float(errors.mean()),
        "topk_logprob_abs_err_max": float(errors.max()),
        "top1_logprob_abs_err_mean": float((got.topk_logprobs[:, 0] - reference.topk_logprobs[:, 0]).abs().mean()),
        "target_logprob_abs_err_mean": float(target_err.mean()),
        "target_logprob_abs_err_max": float(target_err.max()),
        "target_nll_reference": float(-reference.target_logprobs.double().mean()),
        "target_nll": float(-got.target_logprobs.double().mean()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(REPO_ROOT / "data/06_models/teacher"))
    parser.add_argument("--corpus", default=str(REPO_ROOT / "data/03_primary/tokenized_corpus"))
    parser.add_argument("--samples", type=int, default=48, help="corpus samples used (spread over lengths)")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    device = torch.device("cpu")
    corpus = TokenizedCorpus.load(args.corpus)
    samples = corpus.samples
    order = np.argsort(np.asarray(samples["length"].to_pylist()))
    pick = sorted(int(order[round(i * (len(order) - 1) / max(1, args.samples - 1))]) for i in range(args.samples))
    arrays = CorpusArrays.from_table(samples.take(sorted(set(pick))))
    config = ExtractionConfig(k=args.k, batch_tokens=args.batch_tokens, max_batch_size=64, progress=False)
    batches = arrays.plan(config)
    inputs = [arrays.batch(b) for b in batches]
    tokens = sum(i.tokens for i in inputs)

    models = {"fp32": load_causal_lm(args.teacher, dtype=torch.float32, device=device)}
    models["bf16"] = load_causal_lm(args.teacher, dtype=torch.bfloat16, device=device)
    heads = {
        "fp32": TopKHead(models["fp32"], args.k, chunk_rows=1024),
        "bf16": TopKHead(models["bf16"], args.k, chunk_rows=1024),
        "bf16_head_bf16": TopKHead(models["bf16"], args.k, chunk_rows=1024, fp32_logits=False),
    }
    model_of = {"fp32": "fp32", "bf16": "bf16", "bf16_head_bf16": "bf16"}
    rows = {name: [] for name in VARIANTS}
    wall = {name: [[float("inf")] * len(inputs) for _ in range(1)][0] for name in VARIANTS}
    cpu = {name: [float("inf")] * len(inputs) for name in VARIANTS}
    with torch.inference_mode():
        for repeat in range(args.repeats):
            for b, batch in enumerate(inputs):
                for shift in range(len(VARIANTS)):
                    name = VARIANTS[(shift + repeat + b) % len(VARIANTS)]
                    w, c = time.perf_counter(), time.process_time()
                    out = teacher_rows(models[model_of[name]], heads[name], batch, device)
                    w, c = time.perf_counter() - w, time.process_time() - c
                    wall[name][b] = min(wall[name][b], w)
                    cpu[name][b] = min(cpu[name][b], c)
                    if repeat == 0:
                        rows[name].append(out)

    def cat(outs):
        from kd_pipeline.core.extraction.head import HeadRows

        return HeadRows(*(torch.cat([getattr(o, f) for o in outs]) for f in ("topk_ids", "topk_logprobs", "target_logprobs")))

    merged = {name: cat(outs) for name, outs in rows.items()}
    report_variants = {}
    for name in VARIANTS:
        entry = {"wall_s": sum(wall[name]), "cpu_s": sum(cpu[name]), "tokens_per_s": tokens / sum(wall[name]),
                 "tokens_per_cpu_s": tokens / sum(cpu[name])}
        if name != "fp32":
            entry["numerics_vs_fp32"] = _numerics(merged["fp32"], merged[name], args.k)
        report_variants[name] = entry
    report = {
        "benchmark": "bench_precision",
        "date": date.today().isoformat(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "native_bf16": has_native_bf16(device), "load_average_1m_at_end": os.getloadavg()[0]},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "data": {"teacher": args.teacher, "corpus": args.corpus, "samples": len(set(pick)), "batches": len(inputs),
                 "tokens": tokens, "trained_rows": int(merged["fp32"].topk_ids.shape[0]), "k": args.k},
        "repeats": args.repeats,
        "variants": report_variants,
        "bf16_over_fp32_wall": report_variants["bf16"]["wall_s"] / report_variants["fp32"]["wall_s"],
        "bf16_over_fp32_cpu": report_variants["bf16"]["cpu_s"] / report_variants["fp32"]["cpu_s"],
        "seconds": time.perf_counter() - started,
    }
    print(f"teacher extraction path, {tokens} tokens in {len(inputs)} batches, {report['data']['trained_rows']} trained "
          f"rows, k {args.k}; fastest of {args.repeats} repeats per batch")
    print(f"{'variant':<16} {'wall s':>7} {'cpu s':>7} {'tok/s':>6} {'top-k overlap':>13} {'p05':>5} {'top-1 agr':>9} "
          f"{'|dlogp| mean':>12} {'max':>6} {'|d target| mean':>15} {'max':>6}")
    for name, entry in report_variants.items():
        n = entry.get("numerics_vs_fp32")
        cols = (f"{n['topk_overlap_mean']:>13.4f} {n['topk_overlap_p05']:>5.3f} {n['top1_agreement']:>9.4f} "
                f"{n['topk_logprob_abs_err_mean']:>12.4f} {n['topk_logprob_abs_err_max']:>6.3f} "
                f"{n['target_logprob_abs_err_mean']:>15.4f} {n['target_logprob_abs_err_max']:>6.3f}") if n else "(reference)"
        print(f"{name:<16} {entry['wall_s']:>7.1f} {entry['cpu_s']:>7.1f} {entry['tokens_per_s']:>6.0f} {cols}")
    print(f"bf16 / fp32 time: {report['bf16_over_fp32_wall']:.3f} (wall), {report['bf16_over_fp32_cpu']:.3f} (cpu)")
    if args.out:
        write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
