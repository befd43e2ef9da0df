"""Publishing a checkpoint directory atomically: `checkpoint-N` exists whole or not at all, and a checkpoint
that is saved again (the same step, e.g. after resuming from an earlier one) is replaced in one step, so a
process killed at any point leaves a complete `checkpoint-N` (the old one or the new one) for resume.

A checkpoint is written under `.staging-N/checkpoint-N` (see `Distiller._save_checkpoint`), its files are
fsynced, then `publish` moves it to `checkpoint-N`:

* no `checkpoint-N` yet: one rename, then the parent directory is fsynced;
* `checkpoint-N` exists: the two directories are exchanged with one `renameat2(RENAME_EXCHANGE)` (Linux),
  so the old checkpoint ends up in the staging directory, which is removed after the parent directories are
  fsynced. Where the exchange is not available (other systems, file systems without it) the old checkpoint
  is first renamed to `.staging-N/previous` and the new one renamed into place; a process killed between
  the two renames leaves no `checkpoint-N` but a complete `.staging-N/previous`, which `recover` (run
  before every save and before resume) renames back.

Nothing here depends on torch or transformers.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil

STAGING_PREFIX = ".staging-"  # checkpoints are written under this name, then published
PREVIOUS = "previous"  # the replaced checkpoint inside the staging directory, in the two-rename fallback

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _crash_point(name: str) -> None:
    """Called between the steps of `publish` and `recover`; the kill tests replace it."""


def fsync_tree(path: str) -> None:
    """Flushes every file of a directory tree, then every directory of it, to disk."""
    for root, _dirs, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
    for root, _dirs, _files in os.walk(path, topdown=False):
        fsync_dir(root)


def fsync_dir(path: str) -> None:
    """Makes a directory's entries (renames into or out of it) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a platform that cannot open directories (Windows): nothing to flush
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Swaps two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False when the system
    or the file system does not support it (nothing has changed then)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, f"cannot exchange {a!r} and {b!r}: {os.strerror(err)}")


def publish(written: str, final: str, *, staging: str, exchange: bool = True) -> None:
    """Makes the complete directory `written` (inside `staging`) the directory `final`, atomically, and
    removes `staging`. `exchange=False` forces the two-rename fallback (tests)."""
    parent = os.path.dirname(os.path.abspath(final))
    fsync_tree(written)
    _crash_point("written")
    if not os.path.isdir(final):
        os.rename(written, final)
        _crash_point("renamed")
        fsync_dir(parent)
    elif exchange and _exchange(written, final):
        _crash_point("exchanged")  # final: the new checkpoint; written: the old one
        fsync_dir(parent)
        fsync_dir(os.path.dirname(os.path.abspath(written)))
    else:
        previous = os.path.join(staging, PREVIOUS)
        if os.path.lexists(previous):
            shutil.rmtree(previous)
        os.rename(final, previous)
        _crash_point("moved_old")  # no final: `recover` puts `previous` back
        fsync_dir(staging)
        fsync_dir(parent)
        os.rename(written, final)
        _crash_point("renamed")
        fsync_dir(parent)
    _crash_point("published")
    shutil.rmtree(staging, ignore_errors=True)


def recover(run_dir: str) -> list[str]:
    """Puts back every checkpoint the fallback of `publish` had moved aside when its process was killed
    (`.staging-N/previous` while no `checkpoint-N` exists); returns the restored paths. Other leftovers of a
    killed save are left for the next save of that step to remove."""
    restored = []
    if not os.path.isdir(run_dir):
        return restored
    for name in sorted(os.listdir(run_dir)):
        if not name.startswith(STAGING_PREFIX):
            continue
        step = name[len(STAGING_PREFIX):]
        previous = os.path.join(run_dir, name, PREVIOUS)
        final = os.path.join(run_dir, f"checkpoint-{step}")
        if os.path.isdir(previous) and not os.path.lexists(final):
            os.rename(previous, final)
            _crash_point("restored")
            fsync_dir(run_dir)
            restored.append(final)
    return restored


__all__ = ["STAGING_PREFIX", "fsync_tree", "publish", "recover"]
