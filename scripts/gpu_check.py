"""One GPU check for one H100/H200, in under 8 minutes, one JSON: the three prepared sections run
back to back, each in its own subprocess under its own time budget, and their reports are merged.

Sections (each also runs alone; see its docstring):
  extraction  scripts/gpu_check_extraction.py: teacher top-k extraction tokens/s vs a bare
              forward and vs the decoder alone (forward-only floor), bf16, encode threads.
  train       scripts/gpu_check_train.py: `DistillationTrainer` steps in bf16, KD+SFT and
              SFT-only, Liger kernels on and off (one subprocess per configuration: Liger
              patches process-wide), tokens/s and peak memory.
  losses      scripts/gpu_check_losses.py: Liger on the student (numerics, step time); the fused
              top-k KD loss vs the float64 reference (bf16, fp32), and in bf16 its time against
              the GEMM floor (the three lm_head GEMMs alone), the naive full-logits loss and
              Liger's chunked fused-linear JSD, with peak memory growth.

Budgets (seconds, wall, start-up included): extraction 100, train 200 (4 configurations x
`--train-steps` steps), losses 150; a section that overruns is killed and reported as such, and
the others still run. Only torch + transformers (+ triton, liger-kernel if present, or a wheel
from `--wheels`) are needed; src/ is put on sys.path, no kedro, no downloads.

    python scripts/gpu_check.py [--teacher DIR] [--wheels DIR] [--out FILE] [--dry-run]

Writes `gpu_check.json` under $OUT (or `--out`): {"sections": {name: report | error}, ...}.
`--dry-run`: every section on CPU with tiny shapes (a self-check of the script, ~1-2 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS.parent / "src"))

from kd_pipeline.core.atomic import write_json_atomic  # noqa: E402

BUDGETS_S = {"extraction": 100, "train": 200, "losses": 150}


def section_commands(args, tmp: Path) -> dict[str, list[str]]:
    python = sys.executable
    dry = ["--dry-run"] if args.dry_run else []
    wheels = ["--wheels", args.wheels] if args.wheels else []
    teacher = ["--teacher", args.teacher] if args.teacher else []
    return {
        "extraction": [python, str(SCRIPTS / "gpu_check_extraction.py"), *teacher, *dry,
                       "--out", str(tmp / "extraction.json")],
        "train": [python, str(SCRIPTS / "gpu_check_train.py"), "--steps", str(args.train_steps), *wheels, *dry,
                  "--out", str(tmp / "train.json")],
        "losses": [python, str(SCRIPTS / "gpu_check_losses.py"), *wheels, *dry, "--out", str(tmp / "losses.json")],
    }


def run_section(name: str, command: list[str], out_file: Path, budget_s: float) -> dict:
    started = time.perf_counter()
    print(f"[{name}] {' '.join(command[1:])}", file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)  # each section writes to the --out given, not to $OUT
    try:
        completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=budget_s)
        status, stdout, stderr = completed.returncode, completed.stdout, completed.stderr
    except subprocess.TimeoutExpired as expired:
        status = "timeout"
        stdout = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        stderr = (expired.stderr or b"").decode(errors="replace") if isinstance(expired.stderr, bytes) else (expired.stderr or "")
    seconds = time.perf_counter() - started
    print(stdout[-6000:], flush=True)
    result = {"exit_status": status, "seconds": seconds, "budget_s": budget_s}
    if out_file.is_file():
        result["report"] = json.loads(out_file.read_text())
    if status != 0:
        result["stderr_tail"] = stderr[-3000:]
    print(f"[{name}] exit {status} in {seconds:.0f} s (budget {budget_s} s)", file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="local HF teacher folder for the extraction section (default: random SmolLM2-135M)")
    parser.add_argument("--wheels", help="folder with a liger-kernel wheel, installed if liger is absent")
    parser.add_argument("--train-steps", type=int, default=150, help="steps per training configuration")
    parser.add_argument("--sections", default="extraction,train,losses")
    parser.add_argument("--out", type=Path, help="JSON output (default: $OUT/gpu_check.json when $OUT is set)")
    parser.add_argument("--dry-run", action="store_true", help="all sections on CPU, tiny shapes")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.train_steps = min(args.train_steps, 4)

    started = time.perf_counter()
    report = {"check": "gpu_check", "dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d %H:%M"),
              "host": platform.node(), "python": platform.python_version(), "sections": {}}
    try:
        import torch

        report["torch"] = torch.__version__
        report["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        report["torch"] = "absent"
    with tempfile.TemporaryDirectory() as tmp:
        commands = section_commands(args, Path(tmp))
        for name in [s for s in args.sections.split(",") if s]:
            report["sections"][name] = run_section(name, commands[name], Path(tmp) / f"{name}.json", BUDGETS_S[name])
    report["total_seconds"] = time.perf_counter() - started
    out = args.out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, report, default=str)
        print(f"wrote {out}", file=sys.stderr)
    summary = {name: section["exit_status"] for name, section in report["sections"].items()}
    print(f"gpu_check: {summary} in {report['total_seconds']:.0f} s")
    return 0 if all(status == 0 for status in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
