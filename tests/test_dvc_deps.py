"""dvc.yaml's code deps are exact: for each stage, the Python files under src/kd_pipeline that its
deps cover are exactly the files its run imports (the import closure of the stage's pipeline
package and of the catalog datasets), so that editing any code a stage runs invalidates its cache
and editing code it does not run does not.

The closure is computed from the source (ast): every `import` and `from ... import ...` inside
kd_pipeline, at any level (function-level imports included), plus the `__init__.py` of every
package on the way, since importing a module runs them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SRC = PROJECT_ROOT / "src"
STAGES = ("corpus_prep", "teacher_logits", "distill", "evaluate")
#: Modules every stage runs besides its pipeline package: the catalog's own dataset types.
CATALOG_MODULES = ("kd_pipeline.datasets",)


def _module_file(name: str) -> Path | None:
    path = SRC.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def _imports(file: Path, module: str) -> set[str]:
    """Names of the kd_pipeline modules (or attributes of them) that `file` imports."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in names if name == "kd_pipeline" or name.startswith("kd_pipeline.")}


def import_closure(entries: tuple[str, ...]) -> set[Path]:
    """Every file under src/ that importing `entries` runs."""
    seen: set[Path] = set()
    stack = list(entries)
    while stack:
        name = stack.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # the packages on the way, then the module itself
            prefix = ".".join(parts[:depth])
            file = _module_file(prefix)
            if file is None or file in seen:
                continue
            seen.add(file)
            stack.extend(_imports(file, prefix))
    return seen


def stage_entries(stage: str) -> tuple[str, ...]:
    package = f"kd_pipeline.pipelines.{stage}"
    return (package, f"{package}.nodes", f"{package}.pipeline", *CATALOG_MODULES)


def covered_files(deps: list[str]) -> set[Path]:
    files = set()
    for dep in deps:
        path = PROJECT_ROOT / dep
        if not dep.startswith("src/"):
            continue
        assert path.exists(), f"dvc.yaml dep {dep} does not exist"
        files.update({path} if path.is_file() else {p for p in path.rglob("*.py") if "__pycache__" not in p.parts})
    return files


@pytest.mark.parametrize("stage", STAGES)
def test_stage_code_deps_are_its_import_closure(stage):
    spec = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    deps = spec["stages"][stage]["deps"]
    closure = import_closure(stage_entries(stage))
    covered = covered_files(deps)

    def rel(paths):
        return sorted(str(path.relative_to(PROJECT_ROOT)) for path in paths)

    assert not closure - covered, f"{stage} imports modules dvc.yaml does not list as deps: {rel(closure - covered)}"
    assert not covered - closure, f"{stage} lists deps it never imports: {rel(covered - closure)}"


def test_closure_follows_function_level_and_package_imports(tmp_path):
    # The extraction imports model loading inside functions too; the closure must see it.
    closure = import_closure(("kd_pipeline.pipelines.teacher_logits.nodes",))
    files = {str(path.relative_to(SRC)) for path in closure}
    assert "kd_pipeline/core/models/loading.py" in files
    assert "kd_pipeline/core/models/identity.py" in files
    assert "kd_pipeline/core/extraction/__init__.py" in files and "kd_pipeline/__init__.py" in files
    assert "kd_pipeline/core/training/run.py" not in files
