"""Top-k artifact codecs: bytes per trained token, KD-loss error vs `raw`, encode/decode speed.

Runs on synthetic LLM-like teacher distributions over a 128k vocabulary (Llama-3 size) and,
with `--artifact DIR`, on the samples of a real artifact (e.g. data/04_feature/teacher_topk
written with the `raw` codec). Prints a table and writes JSON.

    python benchmarks/bench_artifact.py --quick --out /tmp/bench_artifact.json
    python benchmarks/bench_artifact.py --artifact data/04_feature/teacher_topk

Synthetic distributions. Per sample of `--rows` trained positions, teacher logits are
    prior(id) + 1.6 * context_noise + topic boosts + peak, all / 0.45
with a Zipf-like prior (-0.6 * log(id + 20) + noise: frequent tokens have low ids, as BPE
merge order gives), context noise that is AR(1) along the positions (rho 0.55: neighbouring
positions share part of their top-k), a per-sample "topic" of 256 tokens whose boosts drift
slowly, and a peak of random height on one topic token (top-1 probability anywhere from ~0.05
to ~0.99). The constants were set so that SmolLM2-135M on King James text (V=49152) and the
generator at the same V agree on: mean top-1 probability (0.50 vs 0.51), top-128 mass (0.95 vs
0.96), overlap of neighbouring top-128 sets (0.26 vs 0.25) and the share of top-128 ids below
1000 (0.38 vs 0.36); `--quick` prints these statistics for the generated data.

Throughput is tokens per CPU-second of the benchmark process (fastest of several runs per
sample): encode and decode are single-threaded, so this is what one core does; the reader's
`get_many` includes Parquet reads and the copy into torch tensors.

KD loss error. Students are the teacher logits plus Gaussian noise over the full vocabulary
(`--student-noise`, default 1.0 and 0.5: about 0.3 and 0.1 nats/token forward KL). Two forward
KL variants are computed in float64 from the definition: over the top-k renormalized on both
sides, and over K+1 categories (top-k plus the rest of the vocabulary). Error = |loss(decoded
targets) - loss(raw targets)|, relative to the raw loss and absolute (nats/token). On a real
artifact (no full-vocabulary student), the student is the K+1 teacher categories plus noise.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kd_pipeline.core.topk_store import (  # noqa: E402
    ArtifactSource,
    TopKArrays,
    TopKReader,
    TopKShardWriter,
    get_codec,
)

# (name, settings): the reference, the compact default, and a finer step for very close students.
CODECS = (("raw", {}), ("logquant_zstd", {}), ("logquant_zstd", {"step": 0.05}))
KS = (16, 64, 128)


# -- data ----------------------------------------------------------------------------------------


def synthetic_sample(generator: torch.Generator, rows: int, vocab: int, k: int, student_noises: tuple[float, ...]):
    """One synthetic sample: teacher top-k (ids, log-probs), target log-probs, and per student
    its full-vocabulary log-probs gathered at the teacher ids plus its log mass outside them."""
    ranks = torch.arange(vocab, dtype=torch.float32)
    prior = -0.6 * torch.log(ranks + 20.0) + 0.7 * torch.randn(vocab, generator=generator)
    noise = torch.randn(rows, vocab, generator=generator)
    for row in range(1, rows):  # context persists between neighbouring positions
        noise[row].mul_((1 - 0.55**2) ** 0.5).add_(noise[row - 1], alpha=0.55)
    logits = prior + 1.6 * noise
    del noise
    topic = torch.randint(0, vocab, (256,), generator=generator)
    boost = torch.zeros(rows, 256)
    drift = torch.randn(256, generator=generator)
    for row in range(rows):  # topic salience drifts slowly along the sample
        drift = 0.9 * drift + (1 - 0.81) ** 0.5 * torch.randn(256, generator=generator)
        boost[row] = drift
    logits.scatter_add_(1, topic.expand(rows, -1), 2.5 * boost)
    peak = topic[torch.randint(0, 256, (rows,), generator=generator)]
    logits[torch.arange(rows), peak] += 6.0 * torch.rand(rows, generator=generator)
    logits /= 0.45
    teacher = torch.log_softmax(logits, dim=-1)
    values, ids = torch.topk(teacher, k, dim=-1)
    # The actual next token, sampled from the teacher over K+1 categories (top-k ids and "the
    # rest"); a rest draw takes the log-prob of a random vocabulary id (cheaper than sampling
    # from all V, same purpose: targets mostly inside the top-k, sometimes far below it).
    mass = torch.logsumexp(values, dim=-1, keepdim=True)
    rest = torch.log(-torch.expm1(mass).clamp_max(-1e-12))
    choices = torch.cat([values, rest], dim=-1)
    gumbel = -torch.log(-torch.log(torch.rand(choices.shape, generator=generator).clamp_min(1e-20)))
    choice = torch.argmax(choices + gumbel, dim=-1)
    random_ids = torch.randint(0, vocab, (rows,), generator=generator)
    target_logprobs = torch.where(choice < k, values.gather(1, choice.clamp_max(k - 1)[:, None])[:, 0],
                                  teacher.gather(1, random_ids[:, None])[:, 0])
    students = []
    for sigma in student_noises:
        student = torch.log_softmax(logits + sigma * torch.randn(rows, vocab, generator=generator), dim=-1)
        students.append(student.gather(1, ids).double().numpy())
    return ids.numpy(), values.numpy(), target_logprobs.numpy(), students


def neighbour_statistics(samples: list[dict], k: int) -> dict[str, float]:
    overlaps, top1, coverage, low = [], [], [], []
    for sample in samples:
        ids, logprobs = sample["ids"][:, :k], sample["logprobs"][:, :k]
        sorted_ids = np.sort(ids, axis=1)
        for row in range(1, len(ids)):
            overlaps.append(np.intersect1d(sorted_ids[row], sorted_ids[row - 1], assume_unique=True).size / k)
        top1.append(np.exp(logprobs[:, 0]))
        coverage.append(np.exp(logprobs.astype(np.float64)).sum(1))
        low.append((ids < 1000).mean())
    return {"neighbour_overlap": float(np.mean(overlaps)), "top1_p_mean": float(np.concatenate(top1).mean()),
            "topk_mass_mean": float(np.concatenate(coverage).mean()), "ids_below_1000": float(np.mean(low))}


def real_samples(directory: Path, limit: int, student_noises: tuple[float, ...], seed: int):
    reader = TopKReader(directory)
    if reader.manifest.codec_name != "raw":
        print(f"warning: {directory} uses codec {reader.manifest.codec_name!r}; its decoded values are the "
              "reference here, so the errors shown are relative to already-quantized targets")
    rng = np.random.default_rng(seed)
    samples = []
    for sample_id in reader.sample_ids()[:limit]:
        sample = reader.get(sample_id)
        if sample.num_positions == 0:
            continue
        logprobs = sample.topk_logprobs.double().numpy()
        with_rest = np.concatenate([logprobs, _log_rest(logprobs)], axis=1)
        students = []
        for sigma in student_noises:
            noisy = with_rest + sigma * rng.standard_normal(with_rest.shape)
            students.append((noisy - np.logaddexp.reduce(noisy, axis=1, keepdims=True))[:, :-1])
        samples.append({"ids": sample.topk_ids.numpy(), "logprobs": sample.topk_logprobs.numpy(),
                        "target": sample.target_logprobs.numpy(), "positions": sample.positions.numpy(),
                        "students": students})
    return samples, reader.manifest.source.vocab_size, reader.k


# -- measures ------------------------------------------------------------------------------------


def _log_rest(logprobs: np.ndarray) -> np.ndarray:
    mass = np.logaddexp.reduce(logprobs, axis=1, keepdims=True)
    return np.log(np.clip(-np.expm1(mass), 1e-300, None))


def kl_topk(teacher: np.ndarray, student: np.ndarray) -> float:
    """Summed forward KL over the top-k, both renormalized on it (float64)."""
    t = teacher - np.logaddexp.reduce(teacher, axis=1, keepdims=True)
    s = student - np.logaddexp.reduce(student, axis=1, keepdims=True)
    return float((np.exp(t) * (t - s)).sum())


def kl_with_rest(teacher: np.ndarray, student: np.ndarray) -> float:
    """Summed forward KL over K+1 categories: top-k and the rest of the vocabulary (float64)."""
    t = np.concatenate([teacher, _log_rest(teacher)], axis=1)
    s = np.concatenate([student, _log_rest(student)], axis=1)
    return float((np.exp(t) * (t - s)).sum())


def by_id(ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    return np.take_along_axis(values, np.argsort(ids, axis=1), axis=1)


def best_time(function, repeats: int) -> float:
    """Fastest of `repeats` runs, in CPU seconds of this process.

    CPU time rather than wall time: the measured code is single-threaded numpy/zstd, so on an
    idle machine the two agree, and on a shared one CPU time does not count the waits.
    """
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        function()
        best = min(best, time.process_time() - start)
    return max(best, 1e-9)


def summed_best_time(functions: list, repeats: int) -> float:
    """Sum over items of each item's fastest run (each item is a sample or a small batch)."""
    return sum(best_time(function, repeats) for function in functions)


def measure(samples: list[dict], codec_name: str, settings: dict, k: int, vocab: int, repeats: int,
            student_noises: tuple[float, ...]) -> dict:
    codec = get_codec(codec_name, settings)
    arrays = [TopKArrays.from_any(s["positions"], s["ids"][:, :k], s["logprobs"][:, :k], s["target"]) for s in samples]
    tokens = sum(a.num_positions for a in arrays)
    payloads = [codec.encode(a) for a in arrays]
    payload_bytes = sum(len(value) for payload in payloads for value in payload.values())
    encode_s = summed_best_time([lambda a=a: codec.encode(a) for a in arrays], repeats)
    decode_s = summed_best_time([lambda p=p, a=a: codec.decode(p, a.num_positions, k)
                                 for p, a in zip(payloads, arrays)], repeats)
    decoded = [codec.decode(p, a.num_positions, k) for p, a in zip(payloads, arrays)]

    losses = {}
    for student_index, sigma in enumerate(student_noises):
        for name, loss in (("topk", kl_topk), ("with_rest", kl_with_rest)):
            raw = decoded_loss = 0.0
            for sample, array, out in zip(samples, arrays, decoded):
                student = by_id(array.topk_ids, sample["students"][student_index][:, :k])
                raw += loss(by_id(array.topk_ids, array.topk_logprobs.astype(np.float64)), student)
                decoded_loss += loss(by_id(out.topk_ids, out.topk_logprobs.astype(np.float64)), student)
            losses[f"sigma{sigma}_{name}"] = {"raw_nats_per_token": raw / tokens,
                                              "abs_error_nats_per_token": abs(decoded_loss - raw) / tokens,
                                              "rel_error": abs(decoded_loss - raw) / raw}

    # End to end: write an artifact (Parquet, sample ids included) and read it back.
    with tempfile.TemporaryDirectory() as directory:
        source = ArtifactSource("bench", "-", "-", "-", vocab, k, "float32", 1.0, "synthetic")
        with TopKShardWriter(directory, source, codec) as writer:
            for index, array in enumerate(arrays):
                writer.add(f"{index:032x}", array.positions, array.topk_ids, array.topk_logprobs, array.target_logprobs)
        reader = TopKReader(directory)
        ids = reader.sample_ids()
        reader.verify()
        batches = [ids[start:start + 4] for start in range(0, len(ids), 4)]  # 4 samples per batch
        read_s = summed_best_time([lambda batch=batch: reader.get_many(batch) for batch in batches], repeats)
        artifact_bytes = reader.manifest.num_bytes
    return {
        "codec": codec_name, "settings": codec.settings(), "changed_settings": dict(settings), "k": k, "tokens": tokens,
        "payload_bytes_per_token": payload_bytes / tokens, "artifact_bytes_per_token": artifact_bytes / tokens,
        "encode_tokens_per_s": tokens / encode_s, "decode_tokens_per_s": tokens / decode_s,
        "reader_get_many_tokens_per_s": tokens / read_s, "kd_loss": losses,
    }


def machine() -> dict:
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown"
    return {"cpu": model, "cores": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
            "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__}


def print_table(title: str, results: list[dict], student_noises: tuple[float, ...]) -> None:
    print(f"\n{title}")
    loss_columns = [f"sigma{sigma}_{name}" for sigma in student_noises for name in ("topk", "with_rest")]
    header = (f"{'codec':<20}{'k':>4}{'B/token':>9}{'B/token':>9}{'encode':>10}{'decode':>10}{'get_many':>10}  "
              + "  ".join(f"{column:>18}" for column in loss_columns))
    print(f"{'':<24}{'payload':>9}{'artifact':>9}{'tok/s':>10}{'tok/s':>10}{'tok/s':>10}  "
          + "  ".join(f"{'rel err (KL nats)':>18}" for _ in loss_columns))
    print(header)
    for result in results:
        losses = result["kd_loss"]
        cells = [f"{losses[c]['rel_error']:>8.3%} ({losses[c]['raw_nats_per_token']:.2f})" for c in loss_columns]
        label = result["codec"] + "".join(f" {key}={value}" for key, value in result["changed_settings"].items())
        print(f"{label:<20}{result['k']:>4}{result['payload_bytes_per_token']:>9.1f}"
              f"{result['artifact_bytes_per_token']:>9.1f}{result['encode_tokens_per_s']:>10.3g}"
              f"{result['decode_tokens_per_s']:>10.3g}{result['reader_get_many_tokens_per_s']:>10.3g}  "
              + "  ".join(f"{cell:>18}" for cell in cells))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (under a minute)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--artifact", type=Path, help="also measure on this artifact directory (real teacher)")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--rows", type=int, default=256, help="trained positions per synthetic sample")
    parser.add_argument("--samples", type=int, help="synthetic samples (default 4 quick, 16 full)")
    parser.add_argument("--student-noise", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    num_samples = args.samples or (3 if args.quick else 16)
    repeats = 5 if args.quick else 9
    noises = tuple(args.student_noise)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    started = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    samples = []
    for _ in range(num_samples):
        ids, logprobs, target, students = synthetic_sample(generator, args.rows, args.vocab, max(KS), noises)
        samples.append({"ids": ids, "logprobs": logprobs, "target": target,
                        "positions": np.arange(args.rows), "students": students})
    statistics = {f"k{k}": neighbour_statistics(samples, k) for k in KS}
    report = {"date": datetime.date.today().isoformat(), "machine": machine(),
              "synthetic": {"vocab": args.vocab, "rows_per_sample": args.rows, "samples": num_samples,
                            "student_noise": list(noises), "statistics": statistics, "results": []}}
    for k in KS:
        for name, settings in CODECS:
            report["synthetic"]["results"].append(measure(samples, name, settings, k, args.vocab, repeats, noises))
    print(f"synthetic LLM-like distributions: V={args.vocab}, {num_samples} samples x {args.rows} trained tokens")
    for k in KS:
        s = statistics[f"k{k}"]
        print(f"  k={k:<4} top-1 p {s['top1_p_mean']:.2f}  top-k mass {s['topk_mass_mean']:.3f}  "
              f"neighbour top-k overlap {s['neighbour_overlap']:.2f}  ids < 1000 {s['ids_below_1000']:.2f}")
    print_table("synthetic", report["synthetic"]["results"], noises)

    if args.artifact:
        real, vocab, artifact_k = real_samples(args.artifact, 64 if args.quick else 512, noises, args.seed)
        ks = [k for k in KS if k <= artifact_k] or [artifact_k]
        report["real"] = {"artifact": str(args.artifact), "vocab": vocab, "samples": len(real),
                          "statistics": {f"k{k}": neighbour_statistics(real, k) for k in ks}, "results": []}
        for k in ks:
            for name, settings in CODECS:
                report["real"]["results"].append(measure(real, name, settings, k, vocab, repeats, noises))
        print_table(f"real teacher outputs: {args.artifact} (V={vocab}, {len(real)} samples)",
                    report["real"]["results"], noises)

    report["wall_s"] = time.perf_counter() - started
    print(f"\n{report['machine']['cpu']}, {report['machine']['cores']} cores, load average "
          f"{report['machine']['load_average_1min']:.1f} at start, {report['wall_s']:.0f} s")
    if args.out:
        write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
