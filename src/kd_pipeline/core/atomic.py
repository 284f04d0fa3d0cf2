"""Atomic file writes and content hashes: a reader never sees a half-written file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator


def temp_path_for(path: Path) -> Path:
    """The temp name a writer of `path` uses; a crash leaves at most this behind."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write; on success it is fsynced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace variation: equal objects give equal bytes."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def write_json_atomic(path: str | os.PathLike, obj: Any, default=None) -> None:
    """`obj` as indented JSON at `path`, atomically; `default` as in `json.dumps` (e.g. `str`
    for values JSON has no type for)."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=2, default=default) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_update_file(digest, path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> int:
    """Feed a file to `digest` in chunks; returns its size."""
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
            size += len(chunk)
    return size


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    sha256_update_file(digest, path, chunk_bytes)
    return digest.hexdigest()


def replace_dir(new_dir: Path, target: Path) -> None:
    """Put the finished folder `new_dir` at `target`, replacing an existing folder there.

    A directory cannot be swapped atomically over a non-empty one, so the old folder is moved
    aside first: a reader sees the old folder, nothing for an instant, or the new one, never a
    partial one.
    """
    if target.exists():
        old = target.with_name(f"{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new_dir, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new_dir, target)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder beside `target` to fill; on success it replaces `target`
    (`replace_dir`), on failure it is removed and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
