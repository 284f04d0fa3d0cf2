"""Folder locks: one writer per folder, the refused run names the holder, dead holders' locks
are taken over, re-entrant within a process."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from kd_pipeline.core.locking import FolderLock, FolderLockedError, lock_path_for

HOLDER = textwrap.dedent("""
    import sys, time
    from kd_pipeline.core.locking import FolderLock
    lock = FolderLock(sys.argv[1], purpose="holder script").acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the lock of tmp_path/'out'; yields (folder, process)."""
    folder = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert process.stdout.readline().strip() == "locked"
        yield folder, process
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.mark.slow
def test_a_second_process_is_refused_naming_the_holder_pid(holder):
    folder, process = holder
    with pytest.raises(FolderLockedError) as caught:
        FolderLock(folder, purpose="second run").acquire()
    message = str(caught.value)
    assert message.startswith(f"{folder} is locked by process {process.pid} (holder script, since ")
    assert "another run is writing it" in message and str(lock_path_for(folder)) in message
    assert caught.value.holder_pid == process.pid


@pytest.mark.slow
def test_the_lock_of_a_killed_process_is_taken_over_and_logged(holder, caplog):
    folder, process = holder
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    with caplog.at_level(logging.WARNING, logger="kd_pipeline.core.locking"):
        with FolderLock(folder, purpose="next run"):
            record = json.loads(lock_path_for(folder).read_text())
            assert record["pid"] == os.getpid() and record["purpose"] == "next run"
    assert re.search(rf"taking over the lock of process {process.pid} \(holder script, since .*\), which is no "
                     r"longer running", caplog.text)


def test_lock_is_beside_the_folder_reentrant_and_released_cleanly(tmp_path, caplog):
    folder = tmp_path / "student"
    assert lock_path_for(folder) == tmp_path / "student.lock"
    assert lock_path_for(folder, "r01") == tmp_path / "student.r01.lock"
    with caplog.at_level(logging.WARNING, logger="kd_pipeline.core.locking"):
        with FolderLock(folder, purpose="outer"):
            with FolderLock(folder, purpose="inner"):  # same process: allowed
                pass
            assert json.loads(lock_path_for(folder).read_text())["purpose"] == "outer"  # still held
        assert lock_path_for(folder).read_text() == ""  # released cleanly: no holder recorded
        with FolderLock(folder):
            pass
    assert "taking over" not in caplog.text  # a clean release is not a stale lock
    assert not folder.exists()  # the lock never creates or enters the folder


def test_a_forked_child_does_not_inherit_the_lock(tmp_path):
    folder = tmp_path / "out"
    with FolderLock(folder, purpose="parent"):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: must be refused, naming the parent
            try:
                FolderLock(folder).acquire()
                os.write(write, b"acquired")
            except FolderLockedError as error:
                os.write(write, str(error).encode())
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        os.close(write)
        message = os.read(read, 4096).decode()
    assert message.startswith(f"{folder} is locked by process {os.getpid()} (parent, since ")
