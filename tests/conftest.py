"""Shared fixtures: offline environment, project root, the tiny tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests must never reach a model hub or send telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `auto` precisions follow the machine (bf16 on a CPU with AVX512-BF16): tests compare against
# float32 references, so they run float32 everywhere unless a test turns bf16 on itself.
os.environ.setdefault("KD_PIPELINE_NATIVE_BF16", "0")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TINY_TOKENIZER_DIR = PROJECT_ROOT / "tests" / "fixtures" / "tiny_tokenizer"


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)


@pytest.fixture(scope="session")
def copy_project():
    """`copy_project(dest)`: a runnable copy of the project at `dest` (pyproject, conf without
    local overrides, test fixtures, src) for tests that run `kedro`/`torchrun` in a subprocess."""
    import shutil

    def copy(project: Path) -> Path:
        project.mkdir()
        for name in ("pyproject.toml", ".telemetry"):
            shutil.copy(PROJECT_ROOT / name, project / name)
        shutil.copytree(PROJECT_ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
        (project / "conf" / "local").mkdir()
        shutil.copytree(PROJECT_ROOT / "tests" / "fixtures", project / "tests" / "fixtures")
        shutil.copytree(PROJECT_ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        return project

    return copy
