"""Where the project lives, and the MLflow store every run (DVC temp copies included) logs to."""

from __future__ import annotations

import os
from pathlib import Path

# `dvc exp run --temp` / `--queue` runs the pipeline in a copy under
# <project>/.dvc/tmp/exps/<name>/; runs there must log to the project's own store.
_DVC_TEMP_MARKER = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep


def project_root(start: Path | None = None) -> Path:
    """The directory holding pyproject.toml (the Kedro project), searched upward from cwd."""
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "pyproject.toml").is_file() and (candidate / "conf").is_dir():
            return candidate
    return here


def home_project_root(start: Path | None = None) -> Path:
    """The user's project root, also when running inside a DVC temp experiment copy."""
    root = project_root(start)
    text = str(root) + os.sep
    if _DVC_TEMP_MARKER in text:
        return Path(text.split(_DVC_TEMP_MARKER, 1)[0])
    return root


def data_dir(env_default: str = "data") -> str:
    """The data folder of an env's catalog (`${data_dir:data/test}`): the env's own folder for
    `kedro run`, and `data` when DVC runs the stage (it sets DVC_STAGE), so that every Kedro env
    writes the outputs dvc.yaml declares and DVC versions them (`KEDRO_ENV=test dvc repro`)."""
    return "data" if os.environ.get("DVC_STAGE") else env_default


def mlflow_tracking_uri(db_name: str = "mlflow.db") -> str:
    """Absolute sqlite URI of the project's MLflow store; `KD_MLFLOW_TRACKING_URI` overrides."""
    override = os.environ.get("KD_MLFLOW_TRACKING_URI")
    if override:
        return override
    return f"sqlite:///{home_project_root() / db_name}"


def mlflow_artifact_location(folder: str = "mlruns") -> str:
    """Absolute artifact folder for the MLflow experiment, fixed when the experiment is
    created: if the first run happened in a DVC temp copy, a relative one would vanish."""
    return str(home_project_root() / folder)
