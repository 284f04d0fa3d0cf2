"""Benchmark: peak resident memory and speed of the default student training, per trainer setting.

Runs `core.training.run.train_student` exactly as the distill stage does (conf/base's
`distill` parameters, the default corpus, teacher and top-k artifact) for a few optimizer
steps, once per variant, each in a fresh subprocess, and reports the process's peak RSS
(`VmHWM`, the number `/usr/bin/time -v` calls "Maximum resident set size") and the training
speed. A variant is a set of `distill.trainer` overrides, e.g.
`ckpt:activation_checkpointing=true` or `b4ga2:per_device_train_batch_size=4,gradient_accumulation_steps=2`.

Worst case, same work for every variant: the run trains on the `--steps` x global-batch
*longest* samples of the train split (the batches of the longest sequences need the most
activation memory; the validation split is not evaluated), so every variant sees the same
tokens and the peak is the one a whole epoch reaches at its longest batch.

Where the memory goes: the worker samples VmRSS at start-up (imports), after the student is
built and the data opened (`on_train_begin`), and the per-step peak (VmHWM reset through
/proc/self/clear_refs at each step's start), plus the analytic sizes of the float32 weights,
gradients and AdamW state.

Usage (from the project root, after `kedro run --pipelines corpus_prep,teacher_logits`):
    python benchmarks/bench_train_memory.py --steps 3 --out bench_train_memory.json \
        current: ckpt:activation_checkpointing=true b4ga2:per_device_train_batch_size=4,gradient_accumulation_steps=2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from _common import status_kib, write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
GIB = 2**30


class _PeakTracker:
    """Process peak RSS across VmHWM resets, and each step's own peak."""

    def __init__(self):
        self.peak_kib = status_kib("VmHWM")
        self.marks: dict[str, float] = {"after_imports_gib": status_kib("VmRSS") / 2**20}
        self.step_peaks_gib: list[float] = []

    def reset(self) -> None:
        self.peak_kib = max(self.peak_kib, status_kib("VmHWM"))
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")

    def step_peak(self) -> None:
        peak = status_kib("VmHWM")
        self.peak_kib = max(self.peak_kib, peak)
        self.step_peaks_gib.append(peak / 2**20)


def _worker(args: argparse.Namespace) -> dict:
    tracker = _PeakTracker()
    import pyarrow as pa
    import pyarrow.compute as pc
    import torch
    from transformers import TrainerCallback

    from kd_pipeline.core.corpus import TokenizedCorpus
    from kd_pipeline.core.losses import KDLossConfig
    from kd_pipeline.core.models.student import StudentInit
    from kd_pipeline.core.training.config import TrainConfig
    from kd_pipeline.core.training.run import train_student

    params = yaml.safe_load((ROOT / "conf/base/parameters_distill.yml").read_text())["distill"]
    trainer = dict(params["trainer"], **args.overrides)
    trainer.update(max_steps=args.steps, eval_steps=0, eval_at_end=False, eval_on_start=False, save_steps=0,
                   disable_tqdm=True, resume=False, logging_steps=1)
    train = TrainConfig.from_dict(trainer)
    global_batch = train.argument("per_device_train_batch_size") * train.argument("gradient_accumulation_steps")
    corpus = TokenizedCorpus.load(args.corpus)
    samples = corpus.split("train")
    longest = pc.sort_indices(samples, sort_keys=[("length", "descending"), ("sample_id", "ascending")])
    samples = samples.take(longest[: args.steps * global_batch])
    # The same meta (fingerprint): the artifact's rows are found by sample id.
    subset = TokenizedCorpus(pa.concat_tables([samples, corpus.split("validation").slice(0, 0)]), corpus.meta)

    class Marks(TrainerCallback):
        def on_train_begin(self, *unused, model=None, **kwargs):
            tracker.marks["student_and_data_gib"] = status_kib("VmRSS") / 2**20

        def on_step_begin(self, *unused, **kwargs):
            tracker.reset()

        def on_step_end(self, *unused, **kwargs):
            tracker.step_peak()

    started = time.perf_counter()
    summary = train_student(teacher_dir=args.teacher, corpus=subset, student_init=StudentInit.from_params(
        params["student_init"]), loss=KDLossConfig.from_dict(params["loss"]), train=train,
        output_dir=Path(args.workdir) / "student", topk_dir=args.artifact, k=params.get("k"),
        callbacks=[Marks()])
    tracker.reset()
    rates = [row["tokens_per_second"] for row in summary["log_history"] if "tokens_per_second" in row]
    return {
        "overrides": args.overrides, "global_batch": global_batch, "steps": summary["global_step"],
        "train_tokens": int(sum(samples["length"].to_pylist())), "threads": torch.get_num_threads(),
        "peak_rss_gib": tracker.peak_kib / 2**20, "step_peaks_gib": tracker.step_peaks_gib,
        "marks": tracker.marks,
        # The first step pays AdamW's state allocation and lazy init: the speed is of the others.
        "tokens_per_second": statistics.median(rates[1:] or rates), "step_rates": rates,
        "final_loss": summary["final_train"].get("loss"), "seconds": time.perf_counter() - started,
        "precision": summary["precision"],
    }


def _parse_variant(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    overrides = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    return name, overrides


def _param_sizes(teacher: str) -> dict:
    """Analytic float32 training state of the default student (weights, grads, AdamW m and v)."""
    from transformers import AutoConfig

    params = yaml.safe_load((ROOT / "conf/base/parameters_distill.yml").read_text())["distill"]
    config = AutoConfig.from_pretrained(teacher)
    layers = config.num_hidden_layers - len(params["student_init"].get("drop_layers", []))
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = h // config.num_attention_heads * config.num_key_value_heads
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * i + 2 * h
    count = layers * per_layer + v * h + h  # tied embeddings / lm_head, final norm
    return {"parameters": count, "weights_gib": 4 * count / GIB, "grads_gib": 4 * count / GIB,
            "adamw_gib": 8 * count / GIB, "total_gib": 16 * count / GIB}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", default=["current:"], metavar="NAME:KEY=VALUE,...")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--teacher", default=str(ROOT / "data/06_models/teacher"))
    parser.add_argument("--corpus", default=str(ROOT / "data/03_primary/tokenized_corpus"))
    parser.add_argument("--artifact", default=str(ROOT / "data/04_feature/teacher_topk"))
    parser.add_argument("--workdir", default=str(ROOT / "data/07_model_output/bench_train_memory"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        args.overrides = args.worker
        print(json.dumps(_worker(args)))
        return
    rows = {}
    load = [os.getloadavg()[0]]
    for name, overrides in map(_parse_variant, args.variants):
        command = [sys.executable, __file__, "--worker", json.dumps(overrides), "--steps", str(args.steps),
                   "--teacher", args.teacher, "--corpus", args.corpus, "--artifact", args.artifact,
                   "--workdir", str(Path(args.workdir) / name)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"variant {name} failed:\n{done.stderr[-3000:]}")
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
        load.append(os.getloadavg()[0])
        row = rows[name]
        print(f"{name}: peak RSS {row['peak_rss_gib']:.2f} GiB, {row['tokens_per_second']:.0f} tok/s, "
              f"step peaks {[round(p, 2) for p in row['step_peaks_gib']]}", file=sys.stderr, flush=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_1m": load,
              "cores": os.cpu_count(), "steps": args.steps, "state": _param_sizes(args.teacher), "variants": rows}
    print("| variant | overrides | peak RSS GiB | after student+data GiB | step peaks GiB | tok/s |")
    print("|---|---|---:|---:|---|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['overrides']} | {row['peak_rss_gib']:.2f} | "
              f"{row['marks'].get('student_and_data_gib', float('nan')):.2f} | "
              f"{', '.join(f'{p:.2f}' for p in row['step_peaks_gib'])} | {row['tokens_per_second']:.0f} |")
    if args.out:
        write_report(args.out, report)


if __name__ == "__main__":
    main()
