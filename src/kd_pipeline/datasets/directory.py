"""A catalog entry for a directory that a core writer fills in place (model folders, the
top-k artifact, plots): writing is incremental and resumable, so it cannot be a value handed
to `save`. The node returns a writer `write(directory) -> None`; `save` calls it with the
catalog's directory, and whatever the next node needs is read back from that directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from kedro.io import AbstractDataset, DatasetError


class DirectoryDataset(AbstractDataset[Path, Callable[[Path], None]]):
    """`load()` -> the directory's Path (it must hold `marker`); `save(write)` -> `write(path)`.

    Args:
        path: the directory, relative to the project root or absolute.
        marker: a file whose presence means the directory is complete (written last).
    """

    def __init__(self, path: str, marker: str, metadata: dict | None = None):
        self._path = Path(path)
        self._marker = marker
        self.metadata = metadata

    def load(self) -> Path:
        if not (self._path / self._marker).is_file():
            raise DatasetError(
                f"{self._path} is not complete ({self._marker} missing): run the stage that writes it first"
            )
        return self._path

    def save(self, data: Callable[[Path], None]) -> None:
        if not callable(data):
            raise DatasetError(f"DirectoryDataset({self._path}) expects a writer callable, got {type(data).__name__}")
        data(self._path)

    def _exists(self) -> bool:
        return (self._path / self._marker).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "marker": self._marker}
