"""Kedro project settings: config loader and the resolvers our conf files use."""

from kedro.config import OmegaConfigLoader

from kd_pipeline.hooks import MainProcessTracking, ReleaseMemoryHooks, RunTrackingHooks
from kd_pipeline.paths import data_dir, mlflow_artifact_location, mlflow_tracking_uri, project_root

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # An env (conf/local, conf/test, ...) overrides base key by key: a one-key file such as
    # `distill: {trainer: {max_steps: 2}}` keeps every other distill key. Lists and scalars are
    # replaced whole; set a base key to null to drop it (e.g. `drop_layers: null` when choosing
    # `keep_layers`). Catalog entries stay replaced whole (an env redefines a dataset).
    "merge_strategy": {"parameters": "soft", "mlflow": "soft"},
    "custom_resolvers": {
        "project_root": lambda: str(project_root()),
        "mlflow_tracking_uri": mlflow_tracking_uri,
        "mlflow_artifact_location": mlflow_artifact_location,
        "data_dir": data_dir,
    },
}

# Under torchrun only rank 0 opens the kedro-mlflow run; RunTrackingHooks names it, logs the
# project's parameters and prints the end-of-run summary.
# ReleaseMemoryHooks hands each node's freed memory back to the OS.
HOOKS = (MainProcessTracking(), RunTrackingHooks(), ReleaseMemoryHooks())
