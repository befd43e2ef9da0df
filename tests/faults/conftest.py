"""The fault suite's set-up: saved tiny models and data, the command run in-process, snapshots of what is on
disk, and small full disks (a tmpfs where this process may mount one, else writes that raise ENOSPC).

The fixtures of tests/conftest.py (tiny models, one_thread) apply here too."""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from scripts.tiny_run import write_inputs


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """Saved tiny teacher and student (with the tokenizer), 4 training rows, 3 test rows."""
    return write_inputs(tmp_path_factory.mktemp("fault_inputs"))


def _mount(directory: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                          capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size) -> a directory on a tmpfs of that size, or None where none can be mounted; unmounted
    after the test."""
    mounted = []

    def make(size: str):
        directory = tmp_path / f"disk{len(mounted)}"
        if not _mount(directory, size):
            return None
        mounted.append(directory)
        return directory

    yield make
    for directory in mounted:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)


class _FullFile(io.RawIOBase):
    """A file opened for writing on a simulated disk with `room` bytes left: writes beyond it raise ENOSPC (as
    the kernel does, after the bytes that fit)."""

    def __init__(self, raw, disk):
        self.raw, self.disk = raw, disk

    def writable(self):
        return True

    def write(self, data):
        room = self.disk["room"]
        if len(data) > room:
            if room:
                self.raw.write(bytes(data[:room]))
                self.disk["room"] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.disk["room"] -= len(data)
        return self.raw.write(data)

    def fileno(self):
        return self.raw.fileno()

    def flush(self):
        if not self.raw.closed:
            self.raw.flush()

    def close(self):
        super().close()
        self.raw.close()


@pytest.fixture
def python_disk_full(monkeypatch):
    """python_disk_full(directory, room): from now on, files opened for writing under `directory` through
    Python's open() take `room` more bytes, then raise ENOSPC (for writers that go through open())."""

    def make(directory, room: int):
        disk = {"room": room}
        real = io.open
        directory = os.path.abspath(directory)

        def fake_open(file, mode="r", *args, **kwargs):
            target = os.path.abspath(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else ""
            if target.startswith(directory + os.sep) and any(c in mode for c in "wax+"):
                raw = real(file, mode.replace("t", "") + ("b" if "b" not in mode else ""), buffering=0)
                wrapped = _FullFile(raw, disk)
                return wrapped if "b" in mode else io.TextIOWrapper(io.BufferedWriter(wrapped), write_through=True)
            return real(file, mode, *args, **kwargs)

        monkeypatch.setattr(io, "open", fake_open)
        monkeypatch.setattr(builtins, "open", fake_open)
        return disk

    return make
