"""Run folders that a crash, a second process or a failed ``--overwrite`` cannot corrupt.

- One writer at a time: :class:`RunLock` holds an exclusive ``flock`` on ``RUN/.lock`` (released by the
  kernel when the holder dies, so a lock is never stale) and refuses a second writer by its process id.
- ``metrics.jsonl`` follows the checkpoint: :func:`truncate_metrics` keeps the records of the epochs the
  resumed checkpoint holds (none for a new run) and drops torn lines; :func:`append_metrics` never follows
  a symbolic link and never glues a record onto a torn line.
- Temporaries of writes killed half-way (``.last.pt.*.tmp``) are removed when a writer takes the folder.
- ``--overwrite`` moves the old run aside (:func:`set_aside`) and :func:`settle` brings it back unless the
  new run has written its first checkpoint; a process killed in between is settled by the next writer.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from pyrovae.train.checkpoint import CheckpointError, atomic_write

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the folder is not protected against a second writer
    fcntl = None

LOCK = ".lock"
READERS = ".readers"
REPLACED = ".replaced"
KEPT = ".kept.json"  # in REPLACED: the entries of the folder that --overwrite left in place
#: what a run writes into its folder under fixed names (--overwrite moves every entry of a run folder aside)
RUN_FILES = ("config.json", "metrics.jsonl", "evaluation.json", "samples.png", "reconstructions.png", "latent.png", "manifold.png", "vocab.json", "checkpoints")

PathLike = Union[str, Path]


class RunFolderError(ValueError):
    """A run folder that cannot be used: taken by another process, not writable, or holding another run."""


# --- one writer at a time ---------------------------------------------------------------------------
_HELD: dict = {}  # real path -> [file descriptor, count]: the lock is re-entrant within a process


def make_run_dir(run_dir: PathLike) -> Path:
    """Create ``run_dir`` (and its parents), with a message naming the problem when it cannot be one."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} is an existing file, not a folder; pass another run folder (--run-dir; the run_dir argument in Python)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"cannot create the run folder {run_dir}: {e.strerror or e}; pass a writable run folder (--run-dir; the run_dir argument in Python)") from e
    return run_dir


def check_writable(folder: PathLike, what: str = "the run folder") -> None:
    """Raise :class:`RunFolderError` unless a file can be created in ``folder`` (checked by creating one)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RunFolderError(f"{what} {folder} does not exist or is not a folder")
    try:
        fd = os.open(folder / f".write-test.{os.getpid()}.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(folder / f".write-test.{os.getpid()}.tmp")
    except OSError as e:
        raise RunFolderError(f"{what} {folder} is not writable ({e.strerror or e}); make it writable or pass another folder") from e


class RunLock:
    """Exclusive lock on a run folder: ``with RunLock(run_dir): ...`` or :meth:`acquire` / :meth:`release`.

    The first acquisition in a process creates the folder, removes temporaries left by killed writes and
    settles an interrupted ``--overwrite``; a second process gets :class:`RunFolderError` naming the holder."""

    def __init__(self, run_dir: PathLike):
        self.run_dir = Path(run_dir)
        self.held = False

    def acquire(self) -> "RunLock":
        if self.held:
            return self
        make_run_dir(self.run_dir)
        key = os.path.realpath(self.run_dir)
        if key in _HELD:
            _HELD[key][1] += 1
            self.held = True
            return self
        try:
            fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise RunFolderError(f"cannot lock the run folder {self.run_dir} ({e.strerror or e}): it must be a writable folder; pass another run folder (--run-dir; the run_dir argument in Python)") from e
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 64).decode(errors="replace").strip()
                os.close(fd)
                who = f"process {holder}" if holder.isdigit() else "another process"
                raise RunFolderError(
                    f"run folder {self.run_dir} is in use by {who} (pyrovae writes one run folder from one process at a time); "
                    "wait for it to finish, stop it, or pass another run folder (--run-dir; the run_dir argument in Python)"
                ) from e
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = [fd, 1]
        self.held = True
        try:
            settle(self.run_dir)
            if _no_readers(self.run_dir):  # an evaluate or sample writing beside the run: its temporaries are alive
                remove_temporaries(self.run_dir)
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        key = os.path.realpath(self.run_dir)
        entry = _HELD.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[key]
            os.close(entry[0])  # drops the flock; the file stays (unlinking it would race with a waiting process)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --- readers: evaluate and sample beside the run, never while --overwrite replaces it -----------------
def _open_readers(run_dir: PathLike) -> Optional[int]:
    """A descriptor of ``RUN/.readers`` (created if missing), or None in a folder where it cannot be opened."""
    path = Path(run_dir) / READERS
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    for flags in (os.O_RDWR | os.O_CREAT | nofollow, os.O_RDONLY | nofollow):
        try:
            return os.open(path, flags, 0o644)
        except OSError:
            continue
    return None


def _no_readers(run_dir: PathLike) -> bool:
    """True when no process holds a :class:`ReadLock` on ``run_dir`` (nor a :class:`ReplaceLock`)."""
    if fcntl is None:
        return True
    fd = _open_readers(run_dir)
    if fd is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # drops the trial lock


class _ReadersLock:
    shared = True

    def __init__(self, run_dir: PathLike, what: str = "pyrovae evaluate"):
        self.run_dir, self.what, self.fd = Path(run_dir), what, None

    def acquire(self):
        if self.fd is not None or fcntl is None:
            return self
        fd = _open_readers(self.run_dir)
        if fd is None:  # a folder no one can write in: no one can replace the run in it either
            return self
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 64).decode(errors="replace").strip()
            os.close(fd)
            raise RunFolderError(self._refusal(holder)) from e
        if not self.shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            if not self.shared:
                os.ftruncate(self.fd, 0)  # no stale process id
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class ReadLock(_ReadersLock):
    """Shared lock of a command that reads a run and writes its outputs beside it (``pyrovae evaluate``, ``sample``):
    any number of them at once, and beside training, but not while ``train --overwrite`` replaces the run
    (:class:`ReplaceLock`), whose folder would get the old run's outputs."""

    def _refusal(self, holder: str) -> str:
        who = f"process {holder}" if holder.isdigit() else "another process"
        return (
            f"the run in {self.run_dir} is being replaced by 'pyrovae train --overwrite' ({who}); {self.what} would read the old run "
            "and write its outputs into the new one's folder: wait until that training has finished, or pass another run folder"
        )


class ReplaceLock(_ReadersLock):
    """Exclusive lock that ``train --overwrite`` holds from moving the old run aside until the new one is settled:
    refused while an ``evaluate`` or ``sample`` (:class:`ReadLock`) reads the old run."""

    shared = False

    def _refusal(self, holder: str) -> str:
        return (
            f"run folder {self.run_dir} is being read by 'pyrovae evaluate' or 'pyrovae sample', which write their outputs "
            "into it; --overwrite would mix them into the new run: wait for them to finish, or pass another --run-dir"
        )


def remove_temporaries(run_dir: PathLike) -> list[Path]:
    """Remove the ``.NAME.*.tmp`` files of writes that were killed half-way (call it holding the lock)."""
    removed = []
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if folder.is_dir():
            for f in folder.glob(".*.tmp"):
                if f.is_file() and not f.is_symlink():
                    f.unlink()
                    removed.append(f)
    return removed


# --- metrics.jsonl follows the checkpoint -----------------------------------------------------------
def read_metrics(path: PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl``; lines torn by a crash mid-write are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
    return records


def truncate_metrics(run_dir: PathLike, epoch: int) -> list[dict]:
    """Keep the records of epochs ``1..epoch`` (those the checkpoint being resumed holds; 0 for a new run) and
    drop torn lines; the file is rewritten atomically, or removed when nothing is left. Returns the records."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_symlink():
        raise RunFolderError(f"{path} is a symbolic link; pyrovae does not follow links in a run folder: remove it")
    if not path.exists():
        return []
    keep = [r for r in read_metrics(path) if r["epoch"] <= epoch]
    text = "".join(json.dumps(r) + "\n" for r in keep)
    if not keep:
        path.unlink()
    elif path.read_text(errors="replace") != text:
        atomic_write(path, lambda f: f.write(text.encode()))
    return keep


def append_metrics(run_dir: PathLike, record: dict) -> None:
    """Append one record to ``run_dir/metrics.jsonl``, refusing to follow a symbolic link, on a line of its own."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        if path.is_symlink():
            raise RunFolderError(f"{path} is a symbolic link; pyrovae does not follow links in a run folder: remove it") from e
        raise
    try:
        line = json.dumps(record) + "\n"
        size = os.fstat(fd).st_size
        if size:
            os.lseek(fd, size - 1, os.SEEK_SET)
            if os.read(fd, 1) != b"\n":  # a torn last line: start a new one
                line = "\n" + line
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def start_fresh(run_dir: PathLike) -> None:
    """Make ``run_dir`` ready for a new run: refuse one that holds a run (its ``checkpoints/last.pt``), and drop
    what a run killed before its first checkpoint left (metrics, a ``best.pt`` without ``last.pt``)."""
    run_dir = Path(run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    if last.exists():
        from pyrovae.train.checkpoint import load_checkpoint

        try:
            what = "a finished run" if load_checkpoint(last).get("finished") else "an unfinished run"
        except CheckpointError:
            what = "a run whose last checkpoint cannot be read"
        raise RunFolderError(
            f"{run_dir} already holds {what}: continue it with Trainer.resume({str(last)!r}, x) before fit (--resume on the "
            "command line), or choose another run_dir (--overwrite replaces it)"
        )
    truncate_metrics(run_dir, 0)
    (run_dir / "checkpoints" / "best.pt").unlink(missing_ok=True)


# --- --overwrite: the old run comes back unless the new one got going -------------------------------
def set_aside(run_dir: PathLike) -> Optional[Path]:
    """Move the run in ``run_dir`` into ``run_dir/.replaced`` (call it holding the lock); :func:`settle` later
    deletes it once the new run has a checkpoint, or restores it."""
    run_dir = Path(run_dir)
    aside = run_dir / REPLACED
    if aside.exists():  # left by an earlier failed attempt and not settled (settle runs when the lock is taken)
        shutil.rmtree(aside)
    names = _run_entries(run_dir)
    if not names:
        return None
    aside.mkdir()
    kept = sorted(set(_run_entries(run_dir, every=True)) - set(names))  # not the run's: left alone by settle too
    atomic_write(aside / KEPT, lambda f: f.write(json.dumps(kept).encode()))
    for name in names:
        os.replace(run_dir / name, aside / name)
    return aside


def settle(run_dir: PathLike) -> Optional[str]:
    """Finish an ``--overwrite``: delete the old run set aside when the new one has ``checkpoints/last.pt``,
    else remove what the new one wrote and put the old run back. Returns ``"replaced"``, ``"restored"`` or None."""
    run_dir = Path(run_dir)
    aside = run_dir / REPLACED
    if not aside.is_dir():
        return None
    if (run_dir / "checkpoints" / "last.pt").exists():
        shutil.rmtree(aside)
        return "replaced"
    try:
        kept = set(json.loads((aside / KEPT).read_text()))
    except (OSError, ValueError, TypeError):  # set aside by an older version: it moved the known names only
        kept = set(_run_entries(run_dir, every=True)) - set(RUN_FILES)
    for name in _run_entries(run_dir, every=True):  # what the new run wrote
        new = run_dir / name
        if name in kept:
            continue
        if new.is_dir() and not new.is_symlink():
            shutil.rmtree(new)
        else:
            new.unlink()
    for old in aside.iterdir():
        if old.name != KEPT:
            os.replace(old, run_dir / old.name)
    (aside / KEPT).unlink(missing_ok=True)
    aside.rmdir()
    return "restored"


def _run_entries(run_dir: Path, every: bool = False) -> list[str]:
    """What ``--overwrite`` moves aside: every entry of a folder that holds a run (config.json, checkpoints/ or
    metrics.jsonl: its evaluations, pictures, text outputs and whatever else it wrote), the known names of
    :data:`RUN_FILES` otherwise (``every``: every entry); never the locks or the folder set aside."""
    names = sorted(n for n in os.listdir(run_dir) if n not in (LOCK, READERS, REPLACED))
    if every or any(n in names for n in ("config.json", "checkpoints", "metrics.jsonl")):
        return names
    return [n for n in names if n in RUN_FILES]


# --- checkpoint contents ----------------------------------------------------------------------------
def check_cursor(perm: Optional[torch.Tensor], pos: int, n: int, num_batches: int, path: str = "the checkpoint") -> None:
    """Raise :class:`CheckpointError` unless a resumed epoch's permutation is one of ``range(n)`` and ``pos`` lies in it."""
    if perm is None:
        return
    if perm.dim() != 1 or perm.numel() != n or torch.is_floating_point(perm) or not torch.equal(perm.sort().values.cpu(), torch.arange(n)):
        raise CheckpointError(
            f"{path} holds an epoch permutation that is not a permutation of the {n} training examples: it was written "
            "for other data, or it is damaged; resume with the run's own data, or start a new run"
        )
    if not 0 <= pos <= num_batches:
        raise CheckpointError(f"{path} is at batch {pos} of an epoch of {num_batches} batches: it was written for other data or batch size")
