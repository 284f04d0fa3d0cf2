"""The core library must import nothing of Kedro, MLflow or DVC (GPU boxes may lack them)."""

import pkgutil
import subprocess
import sys

import kd_pipeline.core


def test_core_imports_no_orchestration_packages():
    modules = sorted(
        info.name for info in pkgutil.walk_packages(kd_pipeline.core.__path__, prefix="kd_pipeline.core.")
    )
    assert "kd_pipeline.core.corpus" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('kedro', 'kedro_mlflow', 'mlflow', 'dvc'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"core imported orchestration packages: {result.stdout} {result.stderr[-2000:]}"
