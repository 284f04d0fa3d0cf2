"""Screenshots of the MLflow UI over the project's store, in headless Chromium (Debian `chromium`):
the experiment's runs table and the compare view of the latest three runs with held-out metrics (`evaluate` runs).

    python scripts/mlflow_screenshots.py --out data/08_reporting/screenshots
    python scripts/mlflow_screenshots.py --store sqlite:////path/to/mlflow.db --runs 3

Starts `mlflow server` on a free 127.0.0.1 port (stopped by its PID at the end), finds the runs
through its REST API and points Chromium at the UI's routes; prints the PNG paths.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "src"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rest(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _wait_healthy(base: str, server: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if server.poll() is not None:
            raise RuntimeError("mlflow server exited")
        if time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server did not answer /health in {seconds:.0f} s")
        time.sleep(0.5)


def screenshot(chromium: str, url: str, path: Path, wait_ms: int, size: str) -> Path:
    """One headless Chromium capture of `url` after `wait_ms` of (virtual) page time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size}", f"--virtual-time-budget={wait_ms}", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=180)
    if not path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot for {url}")
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    from kd_pipeline.paths import mlflow_tracking_uri

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=None, help="backend store URI (default: the project's mlflow.db)")
    parser.add_argument("--experiment", default="kd_pipeline")
    parser.add_argument("--runs", type=int, default=3, help="evaluate runs in the compare view")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "data" / "08_reporting" / "screenshots")
    parser.add_argument("--wait-ms", type=int, default=20000, help="page time before each capture")
    parser.add_argument("--size", default="1600,1000")
    args = parser.parse_args(argv)

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", args.store or mlflow_tracking_uri(), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    try:
        _wait_healthy(base, server)
        experiment = _rest(base, "/api/2.0/mlflow/experiments/get-by-name?experiment_name="
                           + urllib.parse.quote(args.experiment))["experiment"]
        experiment_id = experiment["experiment_id"]
        runs = _rest(base, "/api/2.0/mlflow/runs/search", {
            "experiment_ids": [experiment_id], "filter": "metrics.`heldout/student_nll` >= 0",
            "order_by": ["attributes.start_time DESC"], "max_results": args.runs})["runs"]
        if not runs:
            raise SystemExit(f"experiment {args.experiment!r} has no evaluate runs to compare")
        run_ids = [run["info"]["run_id"] for run in runs]
        table = f"{base}/#/experiments/{experiment_id}/runs"
        compare = (f"{base}/#/compare-runs?runs={urllib.parse.quote(json.dumps(run_ids))}"
                   f"&experiments={urllib.parse.quote(json.dumps([experiment_id]))}")
        paths = [screenshot(chromium, table, args.out / "runs_table.png", args.wait_ms, args.size),
                 screenshot(chromium, compare, args.out / "compare_runs.png", args.wait_ms, args.size)]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
