"""Atomic file writes: a temporary file in the target's folder, fsync'ed, then renamed over it.

    write_atomic("run/ckpt.npz", lambda f: np.savez(f, **arrays))   # or: write_atomic(path, b"...")

A reader never sees a half-written file: until the rename the old file (if any) stays intact,
and the rename itself is made durable by fsync'ing the folder. The temporary file is named
`.tmp-<pid>-*<suffix>`, so a later write into the same folder can tell a temporary left by a
killed writer (whose pid is gone) from one a live writer still owns, and removes the former.
The file gets the usual permissions (0666 minus the umask), not mkstemp's private 0600. An OS
error that names no file (a full disk) is re-raised naming the target path.
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import Callable, IO, Union

_TMP = re.compile(r"^\.tmp-(?:(\d+)-)?[A-Za-z0-9_]+(\.[A-Za-z0-9]+)?$")   # mkstemp's names


def fsync_dir(folder: str) -> None:
    """fsync a folder so that a rename inside it survives a crash (where the filesystem can)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:              # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str, suffix: str = "") -> None:
    """Delete `.tmp-<pid>-*<suffix>` files in `folder` whose writer is gone (and, for a suffix
    such as ".npz", the pid-less `.tmp-*.npz` of older tinymoe checkpoints); nothing else."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = _TMP.match(name)
        if not m or (m.group(2) or "") != suffix or not os.path.isfile(os.path.join(folder, name)):
            continue
        pid = m.group(1)
        if pid is None and not suffix:
            continue
        if pid is None or int(pid) == os.getpid() or not _pid_alive(int(pid)):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def write_atomic(path: str, data: Union[bytes, Callable[[IO[bytes]], object]],
                 suffix: str = "") -> str:
    """Write `data` (bytes, or a function that writes into a binary file) to `path` atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(folder, suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix=suffix, dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and not e.filename:     # a full disk: say which file
            raise OSError(e.errno, e.strerror or str(e), path) from None
        raise
    fsync_dir(folder)
    return path
