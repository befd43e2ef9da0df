"""Files written whole or not at all, and write failures described in the user's terms.

Every file the library writes outside a checkpoint's staging directory goes through `write_file` (a temporary
file beside the target, fsync, one rename), so a process killed or a disk filled while writing leaves the
previous file as it was. `publish_files` moves a directory written elsewhere (the final model's staging
directory) into place file by file the same way. A failed write is turned into a `WriteError` that names the
path and what to do (`write_error`): a full disk says so, whichever library hit it (torch's zip writer reports
ENOSPC as "[enforce fail at inline_container.cc] unexpected pos", safetensors as "StorageFull").

Nothing here depends on torch or transformers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil

from adaswitch.train.checkpoint import fsync_dir

_TMP = ".tmp-"  # temporary files: ".tmp-<pid>-<name>" beside the target
# What torch, safetensors and the OS say when a write hits a full disk (their exceptions carry no errno).
_FULL_DISK_WORDS = ("no space left", "storagefull", "enospc", "disk quota", "file write failed", "unexpected pos")


class WriteError(OSError):
    """A file could not be written: the message names the path, why, and what was kept."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a file created with open() gets (0o666 less the umask), which temporary files do not get."""
    return 0o666 & ~_umask()


def disk_full(exc: BaseException, directory) -> bool:
    """Whether a failed write ran out of space: ENOSPC / EDQUOT, a library's words for it, or no free block
    left under `directory` (checked only for an error that names no other cause)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    if any(word in text for word in _FULL_DISK_WORDS):
        return True
    try:
        return os.statvfs(directory).f_bavail == 0
    except (OSError, AttributeError):
        return False


def write_error(exc: BaseException, path, *, kept: str = "", fix: str = "") -> WriteError:
    """A one-line `WriteError` for a failed write of `path`: a full disk named as such, other causes by their
    first line; `kept` says what is left unchanged, `fix` what to do (default: free space / another path)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path)) or "."
    while not os.path.isdir(directory) and os.path.dirname(directory) != directory:
        directory = os.path.dirname(directory)
    if disk_full(exc, directory):
        code, why = errno.ENOSPC, "no space left on device"
        fix = fix or "free space there or write elsewhere"
    else:
        lines = str(exc).strip().splitlines()
        code = getattr(exc, "errno", None) or errno.EIO
        why = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        fix = fix or "check that the path is writable"
    parts = [f"cannot write {path!r}: {why}"]
    if kept:
        parts.append(kept)
    parts.append(fix)
    return WriteError(code, "; ".join(parts))


def write_file(path, data: str | bytes, *, kept: str = "") -> None:
    """Writes `data` to `path` atomically: a temporary file in the same directory (missing parents are
    created), fsync, rename over `path`, fsync of the directory. On failure the temporary file is removed,
    `path` is left as it was, and a `WriteError` is raised (`kept`: what the message says was kept)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f"{_TMP}{os.getpid()}-{os.path.basename(path)}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(directory)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        kept = kept or ("the previous file is unchanged" if os.path.exists(path) else "")
        raise write_error(exc, path, kept=kept) from exc


def normalize_modes(tree) -> None:
    """Gives every file under `tree` the mode open() would (some writers create theirs 0600 through a
    temporary file), so a saved model is as readable as the files saved beside it."""
    mode = file_mode()
    for root, _dirs, files in os.walk(os.fspath(tree)):
        for name in files:
            os.chmod(os.path.join(root, name), mode)


def publish_files(source, target) -> list[str]:
    """Moves every entry of the directory `source` into `target` (created if missing), each by one rename
    over the entry of the same name, fsyncs `target`, removes `source`; returns the names moved. Files are
    replaced atomically one by one; a directory of the same name is replaced by a rename aside, a rename in
    and the removal of the old one."""
    source, target = os.fspath(source), os.fspath(target)
    os.makedirs(target, exist_ok=True)
    names = sorted(os.listdir(source))
    for name in names:
        src, dst = os.path.join(source, name), os.path.join(target, name)
        if os.path.isdir(src) and os.path.isdir(dst) and not os.path.islink(dst):
            old = os.path.join(source, f"{_TMP}old-{name}")
            os.rename(dst, old)
            os.rename(src, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(src, dst)
    fsync_dir(target)
    shutil.rmtree(source, ignore_errors=True)
    return names


__all__ = ["WriteError", "disk_full", "file_mode", "normalize_modes", "publish_files", "write_error", "write_file"]
