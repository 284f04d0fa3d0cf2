"""Kedro startup per stage: seconds from `kedro run --pipelines STAGE` to its first node.

`dvc repro` starts Kedro once per stage, so this is paid four times per pipeline run. For each
stage, a temporary copy of the project (tiny `test` env, its own MLflow store) runs
`kedro run --pipelines STAGE --env test`; the time to the first `Loading data from` log line
(session, hooks, kedro-mlflow run, catalog and pipeline registry all done) is the startup.
The process is then stopped: the nodes themselves are not measured. Also prints the slowest
imports of the stage's startup (`python -X importtime`). Prints a table and writes JSON.

    python benchmarks/bench_startup.py --out /tmp/bench_startup.json
    python benchmarks/bench_startup.py --stages evaluate --repeat 3
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import write_report

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("corpus_prep", "teacher_logits", "distill", "evaluate")
FIRST_NODE = re.compile(r"Loading data from|Running node")
IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def project_copy(root: Path) -> Path:
    project = root / "project"
    project.mkdir()
    for name in ("pyproject.toml", ".telemetry"):
        if (PROJECT_ROOT / name).is_file():
            shutil.copy(PROJECT_ROOT / name, project / name)
    shutil.copytree(PROJECT_ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
    (project / "conf" / "local").mkdir()
    shutil.copytree(PROJECT_ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(PROJECT_ROOT / "tests" / "fixtures", project / "tests" / "fixtures")
    return project


def time_to_first_node(project: Path, stage: str, env: dict, importtime: bool) -> tuple[float, str]:
    """Seconds until the stage's first node loads its inputs; the process is then killed."""
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "kedro", "run",
               "--pipelines", stage, "--env", "test"]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    seen = []
    elapsed = None
    try:
        for line in process.stdout:
            seen.append(line)
            if FIRST_NODE.search(line):
                elapsed = time.perf_counter() - started
                break
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if elapsed is None:
        raise RuntimeError(f"kedro run --pipelines {stage} ended before its first node:\n{''.join(seen)[-3000:]}")
    return elapsed, "".join(seen)


def slowest_imports(output: str, top: int = 8) -> list[dict]:
    """Top-level imports (depth <= 2) by cumulative microseconds."""
    rows = []
    for match in IMPORT_LINE.finditer(output):
        depth = len(match.group(3)) // 2
        if depth <= 1:
            rows.append({"module": match.group(4), "cumulative_s": int(match.group(2)) / 1e6})
    return sorted(rows, key=lambda row: -row["cumulative_s"])[:top]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--repeat", type=int, default=1, help="runs per stage (the fastest is reported)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        project = project_copy(Path(tmp))
        env = dict(os.environ, KEDRO_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   KD_MLFLOW_TRACKING_URI=f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        env.pop("PYTHONPATH", None)  # the copy's src/, as `kedro run` adds it
        time_to_first_node(project, "evaluate", env, importtime=False)  # create the MLflow store once
        for stage in args.stages:
            seconds = min(time_to_first_node(project, stage, env, importtime=False)[0] for _ in range(args.repeat))
            _, traced = time_to_first_node(project, stage, env, importtime=True)
            results.append({"stage": stage, "startup_s": round(seconds, 2), "slowest_imports": slowest_imports(traced)})

    print(f"\n{'stage':<16}{'startup s':>10}   slowest imports (cumulative s, under -X importtime)")
    for row in results:
        imports = ", ".join(f"{item['module']} {item['cumulative_s']:.1f}" for item in row["slowest_imports"][:5])
        print(f"{row['stage']:<16}{row['startup_s']:>10.2f}   {imports}")
    load = os.getloadavg()
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cores": os.cpu_count(), "load_average": load}, "results": results}
    if args.out:
        write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
