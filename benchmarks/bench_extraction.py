"""Teacher top-k extraction cost against a bare teacher forward over the same batches.

Passes over the same length-sorted batches. Timing runs batch by batch: all passes on one
batch back to back (order rotated per repeat), `--repeats` times; the headline is the median
over (repeat, batch) of extract ÷ bare for such adjacent pairs, which a shared machine's
fluctuating background load hurts least. The sum over batches of each pass's fastest repeat is
given too, and process CPU time alongside wall time.

- `bare`: the causal LM's own forward, `model(input_ids).logits` at every position;
- `decoder`: the base decoder only (hidden states), the floor of any extraction;
- `naive`: bare forward + full `log_softmax` + top-k + target gather at every position;
- `extract (no write)`: the production loop (`core.extraction.run.run_batches`): decoder, LM head
  on trained rows only, top-k and in-place logsumexp, host copy; samples dropped;
- `extract`: the same plus encoding and writing shards (`TopKShardWriter`, the configured codec),
  i.e. what `extract_teacher_topk` spends per batch;
- `extract (no write, no logz)`: `extract (no write)` with log-normalizers at the capture
  temperature only: the headline `logz_overhead` is the paired median of `extract (no write)` ÷
  this, minus 1 (the cost of the per-row log-normalizers at `--logz-temperatures`), and
  `logz_bytes_per_trained_token` what they add to the encoded payload per codec.

Teacher: `--teacher` or data/06_models/teacher when present, else the SmolLM2-135M architecture
with random weights. Samples: `--corpus` or data/03_primary/tokenized_corpus when present (and
of the teacher's vocabulary), else synthetic chat-like samples (prompt masked, lengths 96-320).

    python benchmarks/bench_extraction.py --quick --out data/08_reporting/bench_extraction.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kd_pipeline.core.devices import dtype_name  # noqa: E402
from kd_pipeline.core.extraction.config import ExtractionConfig  # noqa: E402
from kd_pipeline.core.extraction.encode import PrecomputedCodec  # noqa: E402
from kd_pipeline.core.extraction.head import TopKHead, bare_forward, teacher_rows  # noqa: E402
from kd_pipeline.core.extraction.plan import CorpusArrays  # noqa: E402
from kd_pipeline.core.extraction.run import run_batches  # noqa: E402
from kd_pipeline.core.models.configs import SMOLLM2_135M_CONFIG  # noqa: E402
from kd_pipeline.core.models.head import decoder_and_head  # noqa: E402
from kd_pipeline.core.models.head import decoder_and_head as ex_decoder_and_head  # noqa: E402
from kd_pipeline.core.models.loading import random_causal_lm  # noqa: E402


class _NullWriter:
    def add(self, *args, **kwargs) -> None:
        pass


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_teacher(args, device: torch.device, dtype: torch.dtype):
    teacher = Path(args.teacher) if args.teacher else ROOT / "data" / "06_models" / "teacher"
    if (teacher / "config.json").is_file() and any(teacher.glob("*.safetensors")):
        from kd_pipeline.core.models.identity import model_identity
        from kd_pipeline.core.models.loading import load_causal_lm

        model = load_causal_lm(teacher, dtype=dtype, device=device)
        identity = model_identity(teacher)
        return model, f"{teacher} (real weights)", identity
    if args.teacher:
        raise SystemExit(f"--teacher {teacher}: no config.json / *.safetensors there")
    model = random_causal_lm(SMOLLM2_135M_CONFIG, seed=0, dtype=dtype, device=device)
    return model, "SmolLM2-135M architecture, random weights", {"config_sha256": "random", "weights_sha256": "random"}


def load_samples(args, vocab_size: int, quick: bool) -> tuple[CorpusArrays, str, str]:
    corpus_dir = Path(args.corpus) if args.corpus else ROOT / "data" / "03_primary" / "tokenized_corpus"
    if (corpus_dir / "corpus_meta.json").is_file():
        from kd_pipeline.core.corpus import TokenizedCorpus

        corpus = TokenizedCorpus.load(corpus_dir)
        if corpus.meta.get("vocab_size", 0) <= vocab_size:
            return CorpusArrays.from_table(corpus.samples), f"{corpus_dir}", corpus.fingerprint
        print(f"note: {corpus_dir} has vocab {corpus.meta.get('vocab_size')} > teacher {vocab_size}; using synthetic samples")
    elif args.corpus:
        raise SystemExit(f"--corpus {corpus_dir}: no tokenized corpus there")
    rng = np.random.default_rng(0)
    count = 48 if quick else 160
    ids, masks = [], []
    for _ in range(count):
        length = int(rng.integers(96, 321))
        ids.append(rng.integers(3, vocab_size, size=length))
        mask = np.zeros(length, dtype=np.int8)
        mask[int(length * rng.uniform(0.15, 0.35)):] = 1  # a masked prompt, then the response
        masks.append(mask)
    names = [f"{i:032x}" for i in range(count)]
    return CorpusArrays.from_lists(names, ids, masks), "synthetic chat-like (prompt 15-35% masked)", "synthetic"


def logz_payload_bytes(model, head, samples, batches, device, trained: int) -> dict:
    """Encoded bytes per trained token with and without the log-normalizer columns, per codec."""
    from kd_pipeline.core.topk_store import LogQuantZstdCodec, RawCodec, TopKArrays

    sizes: dict[str, list[int]] = {}
    with torch.inference_mode():
        for batch in batches:
            inputs = samples.batch(batch)
            rows = teacher_rows(model, head, inputs, device)
            ids, lp, tgt, logz = (t.cpu().numpy() for t in (rows.topk_ids, rows.topk_logprobs, rows.target_logprobs,
                                                             rows.logz))
            start = 0
            for positions in inputs.positions:
                stop = start + len(positions)
                with_logz = TopKArrays.from_any(positions, ids[start:stop], lp[start:stop], tgt[start:stop],
                                                logz[start:stop], head.logz_scales)
                without = TopKArrays.from_any(positions, ids[start:stop], lp[start:stop], tgt[start:stop])
                for codec in (RawCodec(), LogQuantZstdCodec()):
                    for label, arrays in (("with", with_logz), ("without", without)):
                        payload = sum(len(v) for v in codec.encode(arrays).values())
                        sizes.setdefault(f"{codec.name} {label}", []).append(payload)
                start = stop
    per_token = {name: sum(values) / trained for name, values in sizes.items()}
    return {codec: {"with_logz": round(per_token[f"{codec} with"], 2),
                    "without_logz": round(per_token[f"{codec} without"], 2),
                    "logz_bytes": round(per_token[f"{codec} with"] - per_token[f"{codec} without"], 2)}
            for codec in ("raw", "logquant_zstd")}


def head_logz_seconds(model, head, plain_head, samples, batches, device, repeats: int) -> dict:
    """The head alone on each batch's trained hidden rows, with and without the log-normalizers,
    alternated `repeats` times: the logz cost isolated from the decoder's (noisier) time.
    Returns summed per-batch minima (wall and process CPU seconds)."""
    decoder, _ = ex_decoder_and_head(model)
    rows = []
    with torch.inference_mode():
        for batch in batches:
            inputs = samples.batch(batch)
            hidden = decoder(input_ids=inputs.input_ids.to(device), use_cache=False).last_hidden_state
            rows.append((hidden.reshape(-1, hidden.shape[-1]).index_select(0, inputs.flat_positions.to(device)),
                         inputs.labels.to(device)))
    best = {key: [float("inf")] * len(rows) for key in ("with", "without", "with_cpu", "without_cpu")}
    with torch.inference_mode():
        for rep in range(repeats):
            for index, (hidden, labels) in enumerate(rows):
                order = (("with", head), ("without", plain_head)) if rep % 2 == 0 else (("without", plain_head), ("with", head))
                for key, which in order:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    which(hidden, labels)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    best[key][index] = min(best[key][index], time.perf_counter() - t0)
                    best[f"{key}_cpu"][index] = min(best[f"{key}_cpu"][index], time.process_time() - c0)
    return {key: round(sum(values), 4) for key, values in best.items()}


def pick_batches(plan: list, count: int) -> list:
    """`count` batches spread over the length-sorted plan (short to long)."""
    if len(plan) <= count:
        return list(plan)
    return [plan[round(i * (len(plan) - 1) / (count - 1))] for i in range(count)] if count > 1 else [plan[len(plan) // 2]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few small batches (< 1 min on 2 CPU cores)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--teacher")
    parser.add_argument("--corpus")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--codec", default="logquant_zstd")
    parser.add_argument("--batch-tokens", type=int, default=None)
    parser.add_argument("--batches", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--encode-workers", type=int, default=-1)
    parser.add_argument("--no-naive", action="store_true", help="skip the naive full-logits pass")
    parser.add_argument("--logz-temperatures", type=float, nargs="*", default=[0.5, 1.0, 2.0],
                        help="teacher_logits.logz_temperatures of the extract passes")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    cuda_default = torch.cuda.is_available()
    batch_tokens = args.batch_tokens or ((8192 if args.quick else 32768) if cuda_default and args.device != "cpu"
                                         else (512 if args.quick else 2048))
    config = ExtractionConfig(k=args.k, codec=args.codec, batch_tokens=batch_tokens, max_batch_size=64,
                                 dtype=args.dtype, device=args.device, encode_workers=args.encode_workers,
                                 logz_temperatures=args.logz_temperatures, progress=False)
    device = config.resolved_device()
    dtype = config.resolved_dtype(device)
    num_batches = args.batches or (2 if args.quick else 4)
    repeats = args.repeats or (2 if args.quick else 3)

    model, teacher_desc, identity = load_teacher(args, device, dtype)
    head = TopKHead(model, config.k, config.temperature, config.resolved_head_chunk_rows(device),
                    logz_scales=config.logz_scales)
    plain_head = TopKHead(model, config.k, config.temperature, config.resolved_head_chunk_rows(device))
    samples, samples_desc, fingerprint = load_samples(args, head.vocab_size, args.quick)
    batches = pick_batches(samples.plan(config), num_batches)
    inputs = [samples.batch(b) for b in batches]
    tokens = sum(i.tokens for i in inputs)
    trained = sum(len(p) for i in inputs for p in i.positions)
    padded = sum(i.input_ids.numel() for i in inputs)

    from kd_pipeline.core.topk_store import ArtifactSource, TopKShardWriter

    source = ArtifactSource(teacher_path="bench", teacher_config_sha256=identity["config_sha256"],
                            teacher_weights_sha256=identity["weights_sha256"], tokenizer_sha256="bench",
                            vocab_size=head.vocab_size, k=config.k, capture_dtype=dtype_name(dtype),
                            capture_temperature=1.0, corpus_fingerprint=fingerprint,
                            logz_temperatures=config.logz_temperatures)
    workers = config.resolved_encode_workers(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def bare_pass(sel):
        with torch.inference_mode():
            for batch in (inputs[i] for i in sel):
                bare_forward(model, batch, device)

    def decoder_pass(sel):
        decoder, _ = decoder_and_head(model)
        with torch.inference_mode():
            for batch in (inputs[i] for i in sel):
                _ = decoder(input_ids=batch.input_ids.to(device), use_cache=False).last_hidden_state

    def naive_pass(sel):
        with torch.inference_mode():
            for batch in (inputs[i] for i in sel):
                logits = bare_forward(model, batch, device).float()
                logprobs = torch.log_softmax(logits, dim=-1)
                values, ids = logprobs.topk(config.k, dim=-1)
                target = logprobs[:, :-1].gather(-1, batch.input_ids[:, 1:, None].to(device))
                values.cpu(), ids.cpu(), target.cpu()

    def plain_extract_pass(sel):
        run_batches(model, plain_head, samples, [batches[i] for i in sel], _NullWriter(), device)

    def extract_pass(sel, write: bool):
        encoder = PrecomputedCodec(config.codec_object(), workers) if (write and workers) else None
        with tempfile.TemporaryDirectory() as tmp:
            writer = (TopKShardWriter(Path(tmp), source, encoder or config.codec_object(), resume=False,
                                      shard_tokens=config.shard_trained_tokens) if write else _NullWriter())
            run_batches(model, head, samples, [batches[i] for i in sel], writer, device, encoder=encoder)
            if write:
                writer.close()
        if encoder is not None:
            encoder.shutdown()

    passes = {"bare": bare_pass, "extract (no write)": lambda sel: extract_pass(sel, False),
              "extract (no write, no logz)": plain_extract_pass, "extract": lambda sel: extract_pass(sel, True)}
    if not args.quick:  # context passes: the floor and the naive approach
        passes["decoder"] = decoder_pass
        if not args.no_naive:
            passes["naive"] = naive_pass
    # Warm-up on the first batch (allocator, kernels, lazy imports).
    for run in passes.values():
        run([0])
        sync()
    # Timed: batch by batch, every pass on the same batch back to back (pass order rotated per
    # repeat), so each extract/bare pair sees the same background load.
    names = list(passes)
    times = {name: [[0.0] * len(inputs) for _ in range(repeats)] for name in names}
    cpu_times = {name: [[0.0] * len(inputs) for _ in range(repeats)] for name in names}
    for rep in range(repeats):
        for i in range(len(inputs)):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                passes[name]([i])
                sync()
                times[name][rep][i] = time.perf_counter() - t0
                cpu_times[name][rep][i] = time.process_time() - c0

    def best_total(table):  # per batch the fastest repeat, summed over batches
        return sum(min(table[rep][i] for rep in range(repeats)) for i in range(len(inputs)))

    best = {name: best_total(times[name]) for name in names}
    best_cpu = {name: best_total(cpu_times[name]) for name in names}

    def paired_median(name, table=times):
        return statistics.median(table[name][rep][i] / table["bare"][rep][i]
                                 for rep in range(repeats) for i in range(len(inputs)))

    paired = {name: round(paired_median(name), 4) for name in names}
    logz_ratio = statistics.median(times["extract (no write)"][rep][i] / times["extract (no write, no logz)"][rep][i]
                                   for rep in range(repeats) for i in range(len(inputs)))
    logz_bytes = logz_payload_bytes(model, head, samples, batches, device, trained)
    head_seconds = head_logz_seconds(model, head, plain_head, samples, batches, device, max(5, repeats))
    # The head's extra seconds against the whole (no-write) extraction of the same batches.
    logz_head_overhead = (head_seconds["with"] - head_seconds["without"]) / best["extract (no write, no logz)"]
    logz_head_overhead_cpu = ((head_seconds["with_cpu"] - head_seconds["without_cpu"])
                              / best_cpu["extract (no write, no logz)"])
    paired_cpu = {name: round(paired_median(name, cpu_times), 4) for name in names}
    results = {
        "benchmark": "bench_extraction",
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(device),
        "device": str(device),
        "dtype": dtype_name(dtype),
        "teacher": teacher_desc,
        "samples": samples_desc,
        "k": config.k,
        "codec": config.codec,
        "encode_workers": workers,
        "batch_tokens": batch_tokens,
        "batches": len(batches),
        "repeats": repeats,
        "tokens": tokens,
        "trained_tokens": trained,
        "padded_tokens": padded,
        "seconds_min": {name: round(value, 4) for name, value in best.items()},
        "seconds_all": {name: [[round(v, 4) for v in row] for row in table] for name, table in times.items()},
        "tokens_per_second": {name: round(tokens / value, 1) for name, value in best.items()},
        "ratio_to_bare": {name: round(value / best["bare"], 4) for name, value in best.items()},
        "paired_median_ratio_to_bare": paired,
        "paired_median_cpu_ratio_to_bare": paired_cpu,
        # Process CPU seconds (all threads): steadier than wall time on a loaded shared CPU box.
        "cpu_seconds_min": {name: round(value, 4) for name, value in best_cpu.items()},
        "load_average": list(os.getloadavg()),
        "logz_temperatures": list(config.logz_temperatures),
        "logz_overhead": round(logz_ratio - 1.0, 4),
        "logz_head_seconds": head_seconds,
        "logz_overhead_from_head": round(logz_head_overhead, 4),
        "logz_overhead_from_head_cpu": round(logz_head_overhead_cpu, 4),
        "logz_bytes_per_trained_token": logz_bytes,
        "logz_goal_overhead": 0.02,
        "goal_ratio": 1.10,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print(f"\nTeacher extraction vs bare forward — {results['machine'].get('gpu') or results['machine'].get('cpu_model', '')}"
          f" ({device}, {results['dtype']}), {results['date']}")
    print(f"teacher: {teacher_desc}; samples: {samples_desc}")
    print(f"{len(batches)} batches, {tokens} tokens ({trained} trained, {padded} padded), k={config.k}, "
          f"codec={config.codec}, encode_workers={workers}, {repeats} repeats\n")
    print(f"| {'pass':<20} | {'seconds':>8} | {'tokens/s':>10} | {'÷ bare':>7} | {'paired ÷ bare':>13} | {'CPU paired':>10} |")
    print(f"|{'-' * 22}|{'-' * 10}|{'-' * 12}|{'-' * 9}|{'-' * 15}|{'-' * 12}|")
    for name in names:
        print(f"| {name:<20} | {best[name]:8.3f} | {tokens / best[name]:10.1f} | {best[name] / best['bare']:7.3f} | "
              f"{paired[name]:13.3f} | {paired_cpu[name]:10.3f} |")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"\nextract ÷ bare: {paired['extract']:.3f} (median of back-to-back pairs), "
          f"{best['extract'] / best['bare']:.3f} (fastest repeat per batch); goal <= 1.10")
    print(f"log-normalizers at {list(config.logz_temperatures)}: +{100 * (logz_ratio - 1):.2f}% extraction time "
          f"(paired median, goal <= 2%); head alone: {head_seconds['without']:.3f} -> {head_seconds['with']:.3f} s = "
          f"+{100 * logz_head_overhead:.2f}% of the extraction (CPU time +{100 * logz_head_overhead_cpu:.2f}%); "
          f"bytes per trained token "
          + ", ".join(f"{codec} +{v['logz_bytes']:.2f} ({v['without_logz']:.1f} -> {v['with_logz']:.1f})"
                      for codec, v in logz_bytes.items()))
    if args.out:
        write_report(args.out, results)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
