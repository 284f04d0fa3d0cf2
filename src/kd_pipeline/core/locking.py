"""Exclusive locks on output folders (top-k artifact, student), so that two runs writing the
same folder fail fast with a message naming the other run, instead of deleting each other's
files.

The lock is `fcntl.flock` on a file *beside* the folder, `<parent>/<name>.lock` (or
`<name>.<part>.lock` for one rank's share of a folder). Beside, not inside: the folder is a DVC
output (a lock file would enter its hash) and a student folder is replaced whole at the end.

- Atomic and stale-safe: the kernel grants the flock to one process and drops it when that
  process exits, however it exits (kill -9 included). A lock left by a dead process is therefore
  free; the next run takes it over and logs the dead holder it found recorded in the file.
- The holder writes its PID, host, start time and purpose into the file; a refused run names
  them. A clean release empties the file (while still holding the lock), so a non-empty file
  found by a new holder means the previous one died.
- The lock file is never deleted: unlinking a lock file that another process has open lets two
  processes each lock a different inode.
- Re-entrant within a process (a pipeline step and the writer it opens may both take it);
  released when the outermost holder releases it. Not shared with forked children: a child that
  asks for it is refused, naming the parent.

flock works on local file systems and on NFS (as a POSIX lock on Linux); it does not protect
against a writer on another host of a file system without lock support.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

__all__ = ["FolderLock", "FolderLockedError", "lock_path_for"]

logger = logging.getLogger(__name__)


class FolderLockedError(RuntimeError):
    """Another live process holds the folder's lock; the message names its PID."""

    def __init__(self, message: str, holder_pid: int | None):
        super().__init__(message)
        self.holder_pid = holder_pid


def lock_path_for(folder: str | os.PathLike, part: str | None = None) -> Path:
    """The lock file of `folder` (or of one `part` of it, e.g. a rank's share)."""
    folder = Path(os.path.abspath(folder))
    suffix = f".{part}.lock" if part else ".lock"
    return folder.with_name(folder.name + suffix)


# (pid, lock path) -> [fd, depth] for the locks this process holds; the pid in the key keeps a
# forked child from believing it holds its parent's lock.
_HELD: dict[tuple[int, str], list[int]] = {}
_HELD_GUARD = threading.Lock()


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 4096):
        raw += chunk
    try:
        holder = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, ValueError):
        holder = {"unparsed": raw[:200].decode("utf-8", "replace")}
    return holder if isinstance(holder, dict) else {"unparsed": str(holder)[:200]}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (it has not recorded its PID yet)"
    if "pid" not in holder:
        return f"another process (lock file content: {holder.get('unparsed')!r})"
    text = f"process {holder['pid']}"
    if holder.get("host") and holder["host"] != socket.gethostname():
        text += f" on host {holder['host']}"
    details = ([holder["purpose"]] if holder.get("purpose") else []) + (
        [f"since {holder['started']}"] if holder.get("started") else [])
    return text + (f" ({', '.join(details)})" if details else "")


class FolderLock:
    """Exclusive, re-entrant, stale-safe lock on a folder (see the module docstring).

    ```
    with FolderLock(out_dir, purpose="teacher_logits"):
        ...  # only this process writes out_dir
    ```

    Args:
        folder: the folder to protect (need not exist yet; its parent is created).
        purpose: what the holder is doing, recorded for the message a refused run gets.
        part: lock only a part of the folder (e.g. "r01" for rank 1's files).

    Raises (on acquire):
        FolderLockedError: a live process holds it; names the PID, host, purpose and start time.
    """

    def __init__(self, folder: str | os.PathLike, purpose: str = "", part: str | None = None):
        self.folder = Path(folder)
        self.purpose = purpose
        self.path = lock_path_for(folder, part)
        self._key = (0, str(self.path))
        self._acquired = False

    def acquire(self) -> "FolderLock":
        if self._acquired:
            raise RuntimeError(f"{self.path}: this FolderLock object is already acquired")
        self._key = (os.getpid(), str(self.path))
        with _HELD_GUARD:
            held = _HELD.get(self._key)
            if held is not None:
                held[1] += 1
                self._acquired = True
                return self
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as error:
                    if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                    raise self._refusal(fd) from None
                previous = _read_holder(fd)
                if previous:
                    logger.warning("%s: taking over the lock of %s, which is no longer running (it did not "
                                   "release the lock: killed or crashed)", self.folder, _describe(previous))
                record = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)  # closing drops the flock if it was taken
                raise
            _HELD[self._key] = [fd, 1]
            self._acquired = True
            logger.debug("locked %s (%s)", self.folder, self.path)
        return self

    def _refusal(self, fd: int) -> FolderLockedError:
        holder: dict = {}
        for _ in range(20):  # the holder writes its record right after taking the lock
            holder = _read_holder(fd)
            if holder and "unparsed" not in holder:
                break
            time.sleep(0.01)
        pid = holder.get("pid") if isinstance(holder.get("pid"), int) else None
        if pid == os.getpid():
            who = f"this process ({pid}, through another open of the lock, e.g. before a fork)"
        else:
            who = _describe(holder)
        return FolderLockedError(
            f"{self.folder} is locked by {who}: another run is writing it. Wait for it to finish or stop it; "
            f"a lock of a process that has exited is taken over automatically (lock file {self.path})", pid)

    def release(self) -> None:
        if not self._acquired:
            return
        self._acquired = False
        with _HELD_GUARD:
            held = _HELD.get(self._key)
            if held is None:
                return
            held[1] -= 1
            if held[1] > 0:
                return
            del _HELD[self._key]
            fd = held[0]
            try:
                os.ftruncate(fd, 0)  # an empty file tells the next holder we left cleanly
            finally:
                os.close(fd)

    def __del__(self) -> None:  # an object dropped without release (e.g. an abandoned writer)
        self.release()

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
