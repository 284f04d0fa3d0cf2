"""What several benchmarks share: the kernel's memory counters of this process and the atomic
JSON report (the project's `core.atomic.write_json_atomic`, so a killed run never leaves a torn
report behind)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def status_kib(field: str) -> int:
    """A `/proc/self/status` counter in KiB (`VmRSS`, `VmHWM`: the peak since the last reset
    through /proc/self/clear_refs)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def write_report(path: str | os.PathLike, report: Any) -> None:
    """`report` as indented JSON at `path` (parent folders made), written atomically."""
    if str(REPO_ROOT / "src") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "src"))
    from kd_pipeline.core.atomic import write_json_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report)
