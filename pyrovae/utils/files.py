"""Files written atomically: a temporary file in the same folder, flushed and fsync'ed, then renamed over the
target (``os.replace`` is atomic on POSIX), so a process killed mid-write leaves the previous file intact."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Union


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Union[str, Path], write) -> Path:
    """Call ``write(file_object)`` on a temporary file next to ``path``, fsync it, then rename it over
    ``path``. On any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def write_json(path: Union[str, Path], obj: Any) -> Path:
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    return atomic_write(path, lambda f: f.write(data))


@contextlib.contextmanager
def file_lock(path: Union[str, Path], timeout: float = 60.0):
    """Hold an exclusive advisory lock (``flock``) on ``path`` (created if missing) for a ``with`` block, waiting at
    most ``timeout`` seconds for another holder. Yields True when held, False where no lock can be had (no
    ``fcntl``, a folder that cannot be written, the wait ran out): callers whose writes are atomic go on without it.
    The kernel drops the lock when its holder dies, so it is never stale."""
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    fd = None
    if fcntl is not None:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError:
            fd = None
    held = False
    try:
        deadline = time.monotonic() + timeout
        while fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except OSError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.02)
        yield held
    finally:
        if fd is not None:
            os.close(fd)  # drops the lock; the file stays (unlinking it would race with a waiting process)
