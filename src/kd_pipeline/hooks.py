"""Kedro hooks of the project.

`MainProcessTracking`: under `torchrun --nproc-per-node N python -m kd_pipeline ...` every rank
runs the whole Kedro session, and kedro-mlflow's hook would open one MLflow run per rank. On
ranks other than 0 this hook adds the run's pipelines to kedro-mlflow's
`tracking.disable_tracking.pipelines` before kedro-mlflow reads it, so kedro-mlflow opens no run
there and switches the catalog's MLflow datasets to local-only saving (its documented way to
turn tracking off for a pipeline). Rank 0 opens the one run; the Trainer's MLflow callback and
the nodes log into it from rank 0 only.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from kedro.framework.hooks import hook_impl

logger = logging.getLogger(__name__)


def process_rank() -> int:
    """This process's global rank under torchrun (`RANK`), 0 outside it."""
    return int(os.environ.get("RANK", "0"))


class MainProcessTracking:
    """Only rank 0 opens a kedro-mlflow run (see the module docstring)."""

    def __init__(self) -> None:
        self._mlflow_config = None

    @hook_impl(trylast=True)  # after kedro-mlflow's hook has put its config on the context
    def after_context_created(self, context) -> None:
        self._mlflow_config = getattr(context, "mlflow", None)

    @hook_impl(tryfirst=True)  # before kedro-mlflow's hook decides whether to start a run
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        rank = process_rank()
        if rank == 0 or self._mlflow_config is None:
            return
        names = run_params.get("pipeline_names") or run_params.get("pipeline_name") or ["__default__"]
        names = [names] if isinstance(names, str) else list(names)
        disabled = self._mlflow_config.tracking.disable_tracking
        disabled.pipelines = sorted({*disabled.pipelines, *names})
        logger.info("rank %d: MLflow tracking off for %s (rank 0 logs the run)", rank, names)
