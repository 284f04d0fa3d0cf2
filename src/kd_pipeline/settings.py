"""Kedro project settings: config loader and the resolvers our conf files use."""

from kedro.config import OmegaConfigLoader

from kd_pipeline.hooks import MainProcessTracking
from kd_pipeline.paths import mlflow_artifact_location, mlflow_tracking_uri, project_root

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # conf/test is a full overlay on base: `kedro run --env test`.
    "custom_resolvers": {
        "project_root": lambda: str(project_root()),
        "mlflow_tracking_uri": mlflow_tracking_uri,
        "mlflow_artifact_location": mlflow_artifact_location,
    },
}

# Under torchrun only rank 0 opens the kedro-mlflow run.
HOOKS = (MainProcessTracking(),)
