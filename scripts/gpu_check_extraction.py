"""GPU check of teacher top-k extraction: throughput and overhead against a bare forward (bf16).

Prepared for one H100 (torch 2.11, transformers 5.17, no kedro; `zstandard` carried as a wheel
if the image lacks it). Imports only `kd_pipeline.core` (src/ is put on sys.path). Finishes well
under 8 minutes. Teacher: `--teacher DIR` (a local HF folder) or the SmolLM2-135M architecture
with random weights; samples: synthetic chat-like ones (lengths 96-512, prompt masked), i.e. the
shape of the default corpus.

Passes over the same length-sorted batches (best of `--repeats`, alternated):
  bare               model(input_ids).logits, every position, bf16
  decoder            base decoder only (hidden states): the floor
  naive              bare + float32 log_softmax + top-k + target gather, every position
  extract (no write) production loop (core.extraction.run_batches): decoder, head on trained
                     rows only, top-k, in-place logsumexp, host copy; samples dropped
  extract wN         the same plus encode + write shards (codec logquant_zstd), N encode threads
  extract raw w0     the same with the raw codec (no compression work)

    python scripts/gpu_check_extraction.py [--teacher DIR] [--dry-run]
Prints a table; writes gpu_check_extraction.json to $OUT (or --out) when set.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

try:
    import zstandard  # noqa: F401,E402
except ImportError:  # the compact codec needs it; the GPU image may lack it
    raise SystemExit("zstandard is missing: carry its wheel (.whl/zstandard-*.whl, see the device README) "
                     "and pip install it with --target, then put that on PYTHONPATH") from None

from kd_pipeline.core.atomic import write_json_atomic  # noqa: E402
from kd_pipeline.core.devices import dtype_name  # noqa: E402
from kd_pipeline.core.extraction.config import ExtractionConfig  # noqa: E402
from kd_pipeline.core.extraction.encode import PrecomputedCodec  # noqa: E402
from kd_pipeline.core.extraction.head import TopKHead, bare_forward, check_head_path  # noqa: E402
from kd_pipeline.core.extraction.plan import CorpusArrays  # noqa: E402
from kd_pipeline.core.extraction.run import run_batches  # noqa: E402
from kd_pipeline.core.models.configs import SMOLLM2_135M_CONFIG  # noqa: E402
from kd_pipeline.core.models.head import decoder_and_head  # noqa: E402
from kd_pipeline.core.models.loading import random_causal_lm  # noqa: E402
from kd_pipeline.core.topk_store import ArtifactSource, TopKShardWriter  # noqa: E402


class _NullWriter:
    def add(self, *args, **kwargs) -> None:
        pass


def synthetic_samples(vocab_size: int, count: int, min_len: int, max_len: int, seed: int = 0) -> CorpusArrays:
    rng = np.random.default_rng(seed)
    ids, masks = [], []
    for _ in range(count):
        length = int(rng.integers(min_len, max_len + 1))
        ids.append(rng.integers(3, vocab_size, size=length))
        mask = np.zeros(length, dtype=np.int8)
        mask[int(length * rng.uniform(0.15, 0.35)):] = 1
        masks.append(mask)
    return CorpusArrays.from_lists([f"{i:032x}" for i in range(count)], ids, masks)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="local HF folder with real weights (default: random SmolLM2-135M)")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU, seconds")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch-tokens", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=None, help="tokens per pass (approx.)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", default=None, help="comma list of encode thread counts")
    parser.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_check_extraction.json)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    if args.dry_run:
        from kd_pipeline.core.tiny import TINY_LLAMA_CONFIG

        device, dtype, model_config = torch.device("cpu"), torch.float32, TINY_LLAMA_CONFIG
        batch_tokens, pass_tokens, lengths = args.batch_tokens or 1024, args.tokens or 4000, (24, 96)
        workers_list = [int(w) for w in (args.workers or "0,2").split(",")]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device (use --dry-run on CPU)")
        device, dtype, model_config = torch.device("cuda"), torch.bfloat16, SMOLLM2_135M_CONFIG
        batch_tokens, pass_tokens, lengths = args.batch_tokens or 32768, args.tokens or 131072, (96, 512)
        workers_list = [int(w) for w in (args.workers or "0,4,8,14").split(",")]

    if args.teacher:
        from kd_pipeline.core.models.loading import load_causal_lm

        model = load_causal_lm(args.teacher, dtype=dtype, device=device)
        teacher_desc = f"{args.teacher} (real weights)"
    else:
        model = random_causal_lm(model_config, seed=0, dtype=dtype, device=device)
        teacher_desc = ("tiny Llama" if args.dry_run else "SmolLM2-135M architecture") + ", random weights"
    config = ExtractionConfig(k=args.k, batch_tokens=batch_tokens, max_batch_size=512, device=str(device.type),
                                 dtype=dtype_name(dtype), progress=False)
    head = TopKHead(model, config.k, 1.0, config.resolved_head_chunk_rows(device))
    mean_len = sum(lengths) / 2
    samples = synthetic_samples(head.vocab_size, max(8, int(pass_tokens / mean_len)), *lengths)
    batches = samples.plan(config)
    inputs = [samples.batch(b) for b in batches]
    tokens = sum(i.tokens for i in inputs)
    trained = sum(len(p) for i in inputs for p in i.positions)
    head_error = check_head_path(model, head, samples.input_ids(0), device)

    source = ArtifactSource(teacher_path="gpu_check", teacher_config_sha256="-", teacher_weights_sha256="-",
                            tokenizer_sha256="-", vocab_size=head.vocab_size, k=config.k,
                            capture_dtype=dtype_name(dtype), capture_temperature=1.0, corpus_fingerprint="synthetic")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def bare():
        with torch.inference_mode():
            for batch in inputs:
                bare_forward(model, batch, device)

    def decoder():
        dec, _ = decoder_and_head(model)
        with torch.inference_mode():
            for batch in inputs:
                dec(input_ids=batch.input_ids.to(device), use_cache=False)

    def naive():
        with torch.inference_mode():
            for batch in inputs:
                logits = bare_forward(model, batch, device).float()
                logprobs = torch.log_softmax(logits, dim=-1)
                values, ids = logprobs.topk(config.k, dim=-1)
                target = logprobs[:, :-1].gather(-1, batch.input_ids[:, 1:, None].to(device))
                values.cpu(), ids.cpu(), target.cpu()

    def extract(codec_name: str | None, workers: int):
        if codec_name is None:
            run_batches(model, head, samples, batches, _NullWriter(), device)
            return
        codec = ExtractionConfig(codec=codec_name).codec_object()
        encoder = PrecomputedCodec(codec, workers) if workers else None
        with tempfile.TemporaryDirectory() as tmp:
            writer = TopKShardWriter(Path(tmp), source, encoder or codec, resume=False)
            run_batches(model, head, samples, batches, writer, device, encoder=encoder)
            writer.close()
        if encoder is not None:
            encoder.shutdown()

    passes = {"bare": bare, "decoder": decoder, "naive": naive, "extract (no write)": lambda: extract(None, 0)}
    for workers in workers_list:
        passes[f"extract w{workers}"] = (lambda w: (lambda: extract("logquant_zstd", w)))(workers)
    passes["extract raw w0"] = lambda: extract("raw", 0)

    peak: dict[str, float] = {}
    for name, run in passes.items():  # warm-up, and peak memory per pass
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run()
        sync()
        if device.type == "cuda":
            peak[name] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(args.repeats):
        for name, run in passes.items():
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - t0)
    best = {name: min(values) for name, values in times.items()}

    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version()}
    try:
        import transformers

        machine["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    result = {
        "check": "gpu_check_extraction", "date": datetime.date.today().isoformat(), "machine": machine,
        "device": str(device), "dtype": dtype_name(dtype), "teacher": teacher_desc, "k": config.k,
        "batch_tokens": batch_tokens, "batches": len(batches), "tokens": tokens, "trained_tokens": trained,
        "head_path_max_abs_error": head_error, "repeats": args.repeats,
        "seconds_min": {k: round(v, 4) for k, v in best.items()},
        "seconds_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "tokens_per_second": {k: round(tokens / v, 1) for k, v in best.items()},
        "ratio_to_bare": {k: round(v / best["bare"], 4) for k, v in best.items()},
        "peak_gib": peak, "wall_seconds": None,
    }
    result["wall_seconds"] = round(time.perf_counter() - started, 1)

    print(f"\nTeacher extraction vs bare forward: {machine.get('gpu', platform.processor())}, {device} "
          f"{result['dtype']}, {result['date']}")
    print(f"teacher: {teacher_desc}; {len(batches)} batches of <= {batch_tokens} padded tokens; {tokens} tokens "
          f"({trained} trained); k={config.k}; head path max |err| vs model logits {head_error:.3g}\n")
    print(f"| {'pass':<20} | {'seconds':>8} | {'tokens/s':>11} | {'÷ bare':>7} | {'peak GiB':>8} |")
    print(f"|{'-' * 22}|{'-' * 10}|{'-' * 13}|{'-' * 9}|{'-' * 10}|")
    for name in passes:
        print(f"| {name:<20} | {best[name]:8.3f} | {tokens / best[name]:11.1f} | {best[name] / best['bare']:7.3f} | "
              f"{peak.get(name, float('nan')):8.2f} |")
    print(f"\nwall {result['wall_seconds']} s")
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_check_extraction.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, result)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
