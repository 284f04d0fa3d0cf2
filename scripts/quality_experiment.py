"""KD+SFT vs the SFT-only baseline on the default, over seeds (issue 6's quality result).

Runs the core library directly (no Kedro/MLflow) with the parameters of
conf/base/parameters_distill.yml, so both arms are exactly the default job with
`kd_loss_weight` = its default or 0. The seed sets the data order and, for a `from_config`
student, its random init (the same in both arms of a seed). Needs the outputs of `kedro run --pipelines
corpus_prep,teacher_logits`. Prints a table and writes JSON.

    .venv/bin/python scripts/quality_experiment.py --seeds 0 1 2 --eval-steps 5 \
        --out data/08_reporting/quality.json

Long runs in pieces: `--resume --pause-after 600` checkpoints and exits (status 3) after 10
minutes; the same command again continues from that checkpoint (the run's numbers are those of
an uninterrupted run, as `distill.trainer.resume` guarantees).

Issue 11's capture-mode comparison: one invocation per arm, `--arms kd_sft --artifact DIR --label
NAME [--k 32]`, merged with `--include` and `--baseline NAME`; the final metrics then include
the full-vocabulary KL(teacher || student) and top-1 agreement with the teacher run again on the
validation split, and each arm's artifact bytes per trained token.

With `--cross-tokenizer '{student_tokenizer: DIR}'` (and a `from_config` `--student-init`) both
arms are students with that tokenizer (issue 12): the pair's vocabulary map is built into the
workdir, and the final metrics are `core/cross_tokenizer/evaluation.py`'s (bits per byte and per
character, aligned KL and agreement). The held-out curves are CE per student token; with the same
tokenizer and text in both arms they convert to bits per byte by one factor, tokens / (ln 2 x
bytes) of the validation split (`curve_bits_per_byte`), and the step at which KD+SFT reaches
SFT-only's final value is read on that curve (also linearly interpolated between evaluations).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from kd_pipeline.core.atomic import write_json_atomic  # noqa: E402
from kd_pipeline.core.corpus import TokenizedCorpus  # noqa: E402
from kd_pipeline.core.evaluation.metrics import EvalConfig, evaluate_student  # noqa: E402
from kd_pipeline.core.extraction.report import entries_per_token  # noqa: E402
from kd_pipeline.core.losses import KDLossConfig  # noqa: E402
from kd_pipeline.core.models.loading import load_causal_lm  # noqa: E402
from kd_pipeline.core.models.student import StudentInit  # noqa: E402
from kd_pipeline.core.topk_store import TopKReader  # noqa: E402
from kd_pipeline.core.training.config import TrainConfig  # noqa: E402
from kd_pipeline.core.training.run import train_student  # noqa: E402

HELD_OUT = "eval_sft"  # held-out cross-entropy on the validation split's trained tokens


class PausedRun(Exception):
    """`--pause-after` elapsed: a checkpoint was saved; the same command with `--resume` continues."""


def pause_callback(seconds: float):
    """A Trainer callback that, once `seconds` have passed, saves a checkpoint at the end of the
    current step and then stops the process (PausedRun): long runs in pieces that each fit a
    slot of a shared machine."""
    from transformers import TrainerCallback

    class PauseAfter(TrainerCallback):
        deadline = time.monotonic() + seconds
        pausing = False

        def on_step_end(self, args, state, control, **kwargs):
            if time.monotonic() > self.deadline and state.global_step < state.max_steps:
                control.should_save = self.pausing = True

        def on_save(self, args, state, control, **kwargs):
            if self.pausing:
                raise PausedRun(f"paused after step {state.global_step} of {state.max_steps}")

    return PauseAfter()


def run_arm(name, seed, params, args, corpus, reader, teacher):
    loss = dict(params["loss"], **args.loss_overrides)
    if name == "sft_only":
        loss["kd_loss_weight"] = 0.0
    trainer = dict(params["trainer"], **args.trainer_overrides)
    trainer.update(seed=seed, eval_steps=args.eval_steps, save_steps=args.save_steps if args.resume else 0,
                   disable_tqdm=True, resume=args.resume)
    if args.max_steps:
        trainer["max_steps"] = args.max_steps
    out = Path(args.workdir) / f"{name}-seed{seed}"
    student_init = dict(args.student_init or params["student_init"])
    if student_init.get("method") == "from_config":  # the seed also draws the random init (paired across arms)
        student_init["seed"] = seed
    started = time.time()
    summary = train_student(
        teacher_dir=args.teacher, corpus=corpus, student_init=StudentInit.from_params(student_init),
        loss=KDLossConfig.from_dict(loss), train=TrainConfig.from_dict(trainer), output_dir=out,
        topk_dir=args.artifact if name == "kd_sft" else None, k=args.k if args.k else params.get("k"),
        checkpoint_dir=Path(args.workdir) / f"{name}-seed{seed}_checkpoints",
        cross_tokenizer=args.cross, vocab_map_path=args.vocab_map_path,
        callbacks=[pause_callback(args.pause_after)] if args.pause_after else [],
    )
    curve = [(row["step"], row[HELD_OUT]) for row in summary["log_history"] if HELD_OUT in row]
    model = load_causal_lm(out)
    if args.cross is not None:
        from kd_pipeline.core.cross_tokenizer.evaluation import evaluate_cross_tokenizer_student
        from kd_pipeline.core.cross_tokenizer.vocab_map import VocabMap
        from kd_pipeline.core.models.loading import load_tokenizer

        metrics = evaluate_cross_tokenizer_student(model, load_tokenizer(out), corpus.split("validation"), reader,
                                                   VocabMap.load(args.vocab_map_path).projection(), EvalConfig())
    else:
        metrics = evaluate_student(model, corpus.split("validation"), reader, EvalConfig(), teacher_model=teacher)
    label = args.label if name == "kd_sft" and args.label else name
    artifact = artifact_summary(args.artifact, args.k) if name == "kd_sft" else {}
    run = {"arm": label, "seed": seed, "curve": curve, "metrics": metrics, "seconds": time.time() - started,
           "train_seconds": summary.get("train_seconds_in_steps"), "artifact": artifact}
    if args.cross is not None:  # per student token -> per byte: one factor, the same text and tokenizer
        factor = metrics["num_tokens"] / (math.log(2) * metrics["num_bytes"])
        run["curve_bits_per_byte"] = [(step, value * factor) for step, value in curve]
    return run


def artifact_summary(directory, k=None):
    """Capture mode, parameters and bytes per trained token of the arm's targets; with `k` below
    the artifact's, the bytes of the artifact cut to k (its rows re-encoded, same codec, scaled
    by the artifact's file-to-payload ratio)."""
    reader = TopKReader(directory, verify="lazy")
    manifest = reader.manifest
    summary = {"path": str(directory), "capture_mode": manifest.source.capture_mode,
               "capture_params": dict(manifest.source.capture_params), "k": manifest.source.k,
               "bytes_per_token": manifest.num_bytes / manifest.num_trained_tokens,
               "entries_per_token": entries_per_token(manifest)}
    if k and k < manifest.source.k and manifest.source.capture_mode == "topk":
        from kd_pipeline.core.topk_store import TopKArrays

        scales = manifest.source.logz_scales
        full = cut = 0
        for sample in reader.get_many(reader.sample_ids()):
            arrays = [TopKArrays.from_any(sample.positions, sample.topk_ids[:, :width], sample.topk_logprobs[:, :width],
                                          sample.target_logprobs, sample.logz, scales) for width in (manifest.source.k, k)]
            full += sum(len(v) for v in reader.codec.encode(arrays[0]).values())
            cut += sum(len(v) for v in reader.codec.encode(arrays[1]).values())
        summary.update(k=k, entries_per_token=float(k), bytes_per_token=summary["bytes_per_token"] * cut / full)
    return summary


def _key_values(items):
    return {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in items)}


def first_step_reaching(curve, target):
    return next((step for step, value in curve if value <= target), None)


def interpolated_step_reaching(curve, target):
    """The step at which the piecewise-linear curve first gets down to `target` (None: never)."""
    previous = None
    for step, value in curve:
        if value <= target:
            if previous is None or previous[1] == value:
                return float(step)
            (step0, value0) = previous
            return step0 + (value0 - target) / (value0 - value) * (step - step0)
        previous = (step, value)
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=0, help="0: the default's epochs")
    parser.add_argument("--eval-steps", type=int, default=5)
    parser.add_argument("--resume", action="store_true",
                        help="checkpoint every --save-steps and continue an identical earlier (paused) run")
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--pause-after", type=float, default=0, metavar="SECONDS",
                        help="with --resume: checkpoint and exit (status 3) after this long; rerun to continue")
    parser.add_argument("--teacher", default=str(ROOT / "data/06_models/teacher"))
    parser.add_argument("--corpus", default=str(ROOT / "data/03_primary/tokenized_corpus"))
    parser.add_argument("--artifact", default=str(ROOT / "data/04_feature/teacher_topk"))
    parser.add_argument("--workdir", default=str(ROOT / "data/07_model_output/quality"))
    parser.add_argument("--out", default=str(ROOT / "data/08_reporting/quality.json"))
    parser.add_argument("--arms", nargs="+", default=["sft_only", "kd_sft"], choices=["sft_only", "kd_sft"])
    parser.add_argument("--label", default=None, help="name of the kd_sft arm in the results (e.g. top_p82)")
    parser.add_argument("--k", type=int, default=0, help="distill.k for the kd_sft arm (0: the default's)")
    parser.add_argument("--baseline", default="sft_only", help="arm the others are compared with")
    parser.add_argument("--no-full-kl", action="store_true",
                        help="skip the full-vocabulary KL (the teacher run again on the validation split)")
    parser.add_argument("--loss", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override distill.loss keys for both arms, e.g. topk_normalization=tail_bucket")
    parser.add_argument("--include", nargs="*", default=[], metavar="JSON",
                        help="runs of earlier invocations (their --out files) to summarize with these")
    parser.add_argument("--trainer", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override distill.trainer keys for both arms, e.g. learning_rate=1.0e-3")
    parser.add_argument("--student-init", type=yaml.safe_load, default=None, metavar="YAML",
                        help="replace distill.student_init, e.g. '{method: prune_teacher, num_layers: 15}'")
    parser.add_argument("--cross-tokenizer", type=yaml.safe_load, default=None, metavar="YAML",
                        help="distill.cross_tokenizer for both arms, e.g. '{student_tokenizer: DIR}'")
    args = parser.parse_args(argv)
    args.loss_overrides = _key_values(args.loss)
    args.trainer_overrides = _key_values(args.trainer)
    args.cross, args.vocab_map_path = None, None
    if args.cross_tokenizer:
        from kd_pipeline.core.cross_tokenizer.config import CrossTokenizerConfig
        from kd_pipeline.core.cross_tokenizer.vocab_map import build_vocab_map
        from kd_pipeline.core.models.loading import load_tokenizer

        args.cross = CrossTokenizerConfig.from_params(args.cross_tokenizer)
        args.vocab_map_path = Path(args.workdir) / "vocab_map.safetensors"
        build_vocab_map(load_tokenizer(args.teacher), load_tokenizer(args.cross.student_tokenizer),
                        max_pieces=args.cross.max_pieces).save(args.vocab_map_path)

    params = yaml.safe_load((ROOT / "conf/base/parameters_distill.yml").read_text())["distill"]
    corpus = TokenizedCorpus.load(args.corpus)
    reader = TopKReader(args.artifact)
    teacher = None if args.no_full_kl or args.cross is not None else load_causal_lm(args.teacher)
    runs = [run for path in args.include for run in json.loads(Path(path).read_text())["runs"]]
    for seed in args.seeds:
        for arm in args.arms:
            try:
                runs.append(run_arm(arm, seed, params, args, corpus, reader, teacher))
            except PausedRun as paused:
                print(f"{arm} seed {seed}: {paused}; rerun the same command to continue", file=sys.stderr)
                raise SystemExit(3) from None
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(args.out, {"runs": runs})

    summarize(runs, args)


def summarize(runs, args):
    """Per-arm mean [min, max] over seeds; per arm, whether it beats the baseline beyond the seed
    spread (its worst seed better than the baseline's best); the step at which KD+SFT reaches
    SFT-only's final held-out loss (when both ran)."""
    rows = []
    for seed in sorted({r["seed"] for r in runs}):
        sft = next((r for r in runs if r["seed"] == seed and r["arm"] == "sft_only"), None)
        kd = next((r for r in runs if r["seed"] == seed and r["arm"] == "kd_sft"), None)
        if sft is None or kd is None:
            continue
        curve = "curve_bits_per_byte" if "curve_bits_per_byte" in sft else "curve"
        sft_final_step, sft_final = sft[curve][-1]
        reach = first_step_reaching(kd[curve], sft_final)
        reach_interpolated = interpolated_step_reaching(kd[curve], sft_final)
        rows.append({"seed": seed, "curve": curve, "sft_final_step": sft_final_step, "sft_final": sft_final,
                     "kd_final": kd[curve][-1][1], "kd_step_reaching_sft_final": reach,
                     "step_fraction": None if reach is None else reach / sft_final_step,
                     "kd_step_reaching_sft_final_interpolated": reach_interpolated,
                     "step_fraction_interpolated": (None if reach_interpolated is None
                                                    else reach_interpolated / sft_final_step)})
    summary = {"runs": runs, "per_seed": rows, "aggregate": {}}
    keys = (("student_bits_per_byte", "student_bits_per_char", "student_nll", "aligned_kl_teacher_student",
             "aligned_agreement", "matched_mass", "teacher_bits_per_byte") if args.cross is not None else
            ("kl_teacher_student_full", "student_nll", "top1_agreement_full", "kl_teacher_student_topk",
             "kl_student_teacher_topk", "top1_agreement", "topk_overlap"))
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    for key in keys:
        for arm in arms:
            values = [r["metrics"][key] for r in runs if r["arm"] == arm and key in r["metrics"]]
            if values:
                summary["aggregate"][f"{arm}.{key}"] = {
                    "mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}
    for arm in arms:
        bytes_ = [r["artifact"]["bytes_per_token"] for r in runs if r["arm"] == arm and r.get("artifact")]
        if bytes_:
            summary["aggregate"][f"{arm}.bytes_per_token"] = {"mean": bytes_[0], "min": bytes_[0], "max": bytes_[0],
                                                              "n": len(bytes_)}
    # "Better beyond the seed spread": the arm's worst seed beats the baseline's best seed.
    lower_is_better = {"student_nll": True, "kl_teacher_student_topk": True, "kl_student_teacher_topk": True,
                       "top1_agreement": False, "topk_overlap": False, "student_bits_per_byte": True,
                       "student_bits_per_char": True, "aligned_kl_teacher_student": True, "aligned_agreement": False,
                       "kl_teacher_student_full": True, "top1_agreement_full": False}
    baseline = args.baseline
    for arm in arms:
        for key, lower in lower_is_better.items():
            base, other = summary["aggregate"].get(f"{baseline}.{key}"), summary["aggregate"].get(f"{arm}.{key}")
            if arm != baseline and base and other:
                summary["aggregate"][f"{arm}_better_than_{baseline}_beyond_spread.{key}"] = (
                    other["max"] < base["min"] if lower else other["min"] > base["max"])
    write_json_atomic(args.out, summary)

    print(f"{'metric':26s} " + " ".join(f"{arm + ' mean [min,max]':>30s}" for arm in arms))
    for key in (*keys, "bytes_per_token"):
        cells = []
        for arm in arms:
            stat = summary["aggregate"].get(f"{arm}.{key}")
            cells.append("-" if stat is None else f"{stat['mean']:.4f} [{stat['min']:.4f},{stat['max']:.4f}]")
        print(f"{key:26s} " + " ".join(f"{cell:>30s}" for cell in cells))
    for key in lower_is_better:
        verdicts = {arm: summary["aggregate"].get(f"{arm}_better_than_{baseline}_beyond_spread.{key}") for arm in arms}
        verdicts = {arm: v for arm, v in verdicts.items() if v is not None}
        if verdicts:
            print(f"better than {baseline} beyond the seed spread, {key}: {verdicts}")
    for row in rows:
        print(f"seed {row['seed']}: SFT-only final held-out {row['curve']} {row['sft_final']:.4f} at step "
              f"{row['sft_final_step']} (KD+SFT final {row['kd_final']:.4f}); KD+SFT first reaches it at step "
              f"{row['kd_step_reaching_sft_final']} (fraction {row['step_fraction']}; interpolated "
              f"{row['kd_step_reaching_sft_final_interpolated']}, {row['step_fraction_interpolated']})")
    for run in sorted(runs, key=lambda r: (r["seed"], r["arm"])):
        points = run.get("curve_bits_per_byte", run["curve"])
        print(f"seed {run['seed']} {run['arm']:8s} " + " ".join(f"{step}:{value:.4f}" for step, value in points))


if __name__ == "__main__":
    main()
