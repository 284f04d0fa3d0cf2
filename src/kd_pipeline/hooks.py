"""Kedro hooks of the project.

`RunTrackingHooks`: the MLflow run's identity when a pipeline starts (name from what varies,
experiment kind, the project's flattened parameters), and a short summary when it ends.
kedro-mlflow opens the run in its own `before_pipeline_run` (plugins are called before project
hooks there) and closes it in `after_pipeline_run`, so the summary hook runs `tryfirst`, while
the run is still active.

`MainProcessTracking`: under `torchrun --nproc-per-node N python -m kd_pipeline ...` every rank
runs the whole Kedro session, and kedro-mlflow's hook would open one MLflow run per rank. On
ranks other than 0 this hook adds the run's pipelines to kedro-mlflow's
`tracking.disable_tracking.pipelines` before kedro-mlflow reads it, so kedro-mlflow opens no run
there and switches the catalog's MLflow datasets to local-only saving (its documented way to
turn tracking off for a pipeline). Rank 0 opens the one run; our step-metrics callback and
the nodes log into it from rank 0 only.

`ReleaseMemoryHooks`: after each node and each saved output, freed memory goes back to the OS
(`core.memory.release_unused_memory`), so that one `kedro run` of all stages peaks at its
largest stage, not at the sum of what earlier stages left in the allocator.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from kd_pipeline import tracking
from kd_pipeline.core.memory import release_unused_memory
from kd_pipeline.core.topk_store import manifest_sha256

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


class ReleaseMemoryHooks:
    """Return freed memory to the OS after every node and every saved output (see the module
    docstring). Both: the heavy stages do their work when their output is saved (the node
    returns the writer of a `DirectoryDataset`, which runs after `after_node_run`)."""

    @hook_impl
    def after_node_run(self, node, catalog, inputs, outputs) -> None:
        release_unused_memory(node.name)

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data, node) -> None:
        release_unused_memory(f"{node.name}: {dataset_name} saved")

    @hook_impl
    def on_node_error(self, error, node, catalog, inputs, is_async) -> None:
        release_unused_memory(node.name)


# Catalog entries the summary names, in pipeline order, with what they are.
_SUMMARY_OUTPUTS = (("teacher_model", "teacher"), ("tokenized_corpus", "corpus"),
                    ("teacher_topk", "teacher top-k artifact"), ("student_model", "student"),
                    ("eval_metrics", "metrics"), ("eval_plots", "plots"))


# Datasets logged as MLflow dataset inputs of the stages that read them, and in what context.
_INPUT_DATASETS = ("tokenized_corpus", "teacher_topk")
_INPUT_CONTEXTS = {"distill": "training", "evaluate": "evaluation"}


class RunTrackingHooks:
    def __init__(self):
        self._catalog = None
        self._params: dict[str, Any] = {}
        self._logged_inputs: set[tuple[str, str]] = set()

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        params = _parameters(catalog)
        self._catalog, self._params, self._logged_inputs = catalog, params, set()
        tracking.start_run_identity(_pipeline_names(run_params), params, runner=_runner_name(run_params.get("runner")))

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str, data: Any, node) -> None:
        context = _INPUT_CONTEXTS.get(node.namespace or "")
        if dataset_name not in _INPUT_DATASETS or context is None or (dataset_name, context) in self._logged_inputs:
            return
        if (dataset_name == "teacher_topk" and context == "training"
                and tracking.run_label(self._params.get("distill") or {}) == tracking.SFT_LABEL):
            return  # loaded, but an SFT-only student never reads it
        self._logged_inputs.add((dataset_name, context))
        path = _dataset_path(self._catalog, dataset_name)
        content = data.fingerprint if dataset_name == "tokenized_corpus" else manifest_sha256(path)
        tracking.log_run_input(dataset_name, path, context, content)

    @hook_impl(tryfirst=True)
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if not tracking.is_main_process():
            return
        outputs = pipeline.all_outputs()
        paths = {label: _dataset_path(catalog, name) for name, label in _SUMMARY_OUTPUTS if name in outputs}
        metrics = catalog.load("eval_metrics") if "eval_metrics" in outputs else None
        summary = catalog.load("distill_summary") if "distill_summary" in outputs else None
        print(tracking.run_summary(_pipeline_names(run_params), run_params.get("env"), paths, metrics, summary),
              flush=True)


def _pipeline_names(run_params: dict[str, Any]) -> list[str]:
    names = run_params.get("pipeline_names") or run_params.get("pipeline_name") or ["__default__"]
    return [names] if isinstance(names, str) else list(names)


def _runner_name(runner: Any) -> str | None:
    """`SequentialRunner` for the runner object or its repr (`<kedro.runner...SequentialRunner object at 0x..>`)."""
    if runner is None:
        return None
    text = runner if isinstance(runner, str) else repr(runner)
    match = re.search(r"(\w+) object at 0x", text)
    return match.group(1) if match else (text if isinstance(runner, str) else type(runner).__name__)


def _parameters(catalog) -> dict[str, Any]:
    try:
        return catalog.load("parameters")
    except Exception:  # noqa: BLE001 - a catalog without `parameters` (tests): no params to log
        return {}


def _dataset_path(catalog, name: str) -> str | None:
    """The file or folder behind a catalog entry (wrappers such as MlflowArtifactDataset unwrapped)."""
    dataset = catalog[name]
    for _ in range(3):
        for attribute in ("_path", "_filepath"):
            value = getattr(dataset, attribute, None)
            if value is not None:
                path = Path(str(value))
                return str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)
        dataset = getattr(dataset, "_dataset", None) or getattr(dataset, "dataset", None)
        if dataset is None:
            break
    return None
