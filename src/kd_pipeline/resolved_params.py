"""The active Kedro env's parameters, resolved, for DVC: `python -m kd_pipeline.resolved_params`.

dvc.yaml's first stage (`resolve_params`, always run, ~1 s) writes them to resolved_params.yaml
(git-tracked, like dvc.lock), and the four stages declare their parameter keys from that file.
DVC then sees every way a value can change (conf/base, conf/local, another `KEDRO_ENV`,
`dvc exp run -S conf/...`) and re-runs exactly the stages whose keys changed.

The same step checks that the env's catalog writes where dvc.yaml's outs are (under DVC every
env writes to data/: `${data_dir:...}` in conf/test/catalog.yml), so a mismatch is one clear
error before any stage runs rather than a missing output after it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

from kd_pipeline.core.atomic import write_bytes_atomic
from kd_pipeline.paths import project_root

RESOLVED_PARAMS_FILE = "resolved_params.yaml"
STAGE_KEYS = ("corpus_prep", "teacher_logits", "distill", "evaluate")
_HEADER = """\
# Written by `dvc repro` (stage resolve_params): the parameters of Kedro env `{env}` (conf/base
# overlaid by conf/{env}, key by key), which dvc.yaml's stages track. Do not edit: change
# conf/, or run `dvc exp run -S 'conf/{env}/parameters_distill.yml:distill.loss.kd_loss_weight=0'`.
"""


def active_env() -> str:
    """The env `kedro run` uses: KEDRO_ENV, else the project's default run env (`local`)."""
    from kd_pipeline.settings import CONFIG_LOADER_ARGS

    return os.environ.get("KEDRO_ENV") or CONFIG_LOADER_ARGS["default_run_env"]


def config_loader(project: Path, env: str):
    """The project's OmegaConfigLoader (settings.py) for `env`, as `kedro run --env ENV` builds it."""
    from kd_pipeline.settings import CONFIG_LOADER_ARGS, CONFIG_LOADER_CLASS

    conf = Path(project) / "conf"
    optional = (CONFIG_LOADER_ARGS["base_env"], CONFIG_LOADER_ARGS["default_run_env"])  # local: git-ignored
    if env not in optional and not (conf / env).is_dir():
        raise FileNotFoundError(f"Kedro env {env!r} (KEDRO_ENV) has no folder {conf / env}")
    return CONFIG_LOADER_CLASS(conf_source=str(conf), env=env, **CONFIG_LOADER_ARGS)


def resolved_parameters(project: Path, env: str) -> dict[str, Any]:
    """`corpus_prep`, `teacher_logits`, `distill`, `evaluate` as the env's nodes receive them."""
    params = config_loader(project, env)["parameters"]
    missing = [key for key in STAGE_KEYS if key not in params]
    if missing:
        raise KeyError(f"Kedro env {env!r}: parameters {missing} missing (conf/base/parameters_*.yml)")
    return {key: params[key] for key in STAGE_KEYS}


def write_resolved_params(project: Path, env: str) -> Path:
    params = resolved_parameters(project, env)
    text = _HEADER.format(env=env) + yaml.safe_dump({"kedro_env": env, **params}, sort_keys=False,
                                                    allow_unicode=True)
    path = Path(project) / RESOLVED_PARAMS_FILE
    if not path.is_file() or path.read_text() != text:  # unchanged: keep the file's mtime
        write_bytes_atomic(path, text.encode("utf-8"))
    return path


def check_catalog_matches_dvc_outs(project: Path, env: str) -> None:
    """Every data/ path the env's catalog names must be a dvc.yaml out (or inside one)."""
    spec = yaml.safe_load((Path(project) / "dvc.yaml").read_text()) or {}
    outs = set()
    for stage in (spec.get("stages") or {}).values():
        for section in ("outs", "metrics", "plots"):
            for entry in stage.get(section) or []:
                outs.add(Path(next(iter(entry)) if isinstance(entry, dict) else entry))
    catalog = config_loader(project, env)["catalog"]
    for name, path in _catalog_paths(catalog):
        if not Path(path).is_absolute() and Path(path).parts[:1] == ("data",):
            if not any(Path(path) == out or out in Path(path).parents for out in outs):
                raise ValueError(
                    f"Kedro env {env!r}: catalog entry {name!r} writes {path}, which no dvc.yaml stage "
                    f"declares as an output; under DVC every env must write dvc.yaml's paths "
                    f"(use ${{data_dir:...}} in conf/{env}/catalog.yml or edit dvc.yaml's outs)")


def _catalog_paths(catalog: dict, owner: str | None = None) -> Iterator[tuple[str, str]]:
    for name, entry in catalog.items():
        if not isinstance(entry, dict) or name.startswith("_"):
            continue
        label = owner or name
        for key in ("path", "filepath"):
            if isinstance(entry.get(key), str):
                yield label, entry[key]
        if isinstance(entry.get("dataset"), dict):  # wrappers such as MlflowArtifactDataset
            yield from _catalog_paths({name: entry["dataset"]}, label)


def main() -> int:
    project = project_root()
    env = active_env()
    check_catalog_matches_dvc_outs(project, env)
    path = write_resolved_params(project, env)
    print(f"resolve_params: Kedro env {env!r} -> {path.relative_to(project)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
