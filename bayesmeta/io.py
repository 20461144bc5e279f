"""Run-folder output: atomic files, all-or-nothing publication, and the folder's exclusive lock."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from filelock import FileLock, Timeout

LOCK, LOCK_OWNER = ".lock", ".lock.owner"
STAGING = ".staging-"
_held: dict[Path, int] = {}  # run folders whose lock this process holds -> nesting depth


class RunFolderError(RuntimeError):
    """A run folder is missing its files or cannot be written now; the message says what to do."""


class RunLockedError(RunFolderError):
    """Another process is writing into the run folder; the message names it."""


def _write_temp(folder: Path, name: str, write: Callable[[BinaryIO], None]) -> Path:
    """write(file) on a new temporary file in `folder`, flushed to disk (removed if write fails)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call write(file) on a temporary file and rename it to `path`: readers never see a partial file."""
    path = Path(path)
    tmp = _write_temp(path.parent, path.name, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _claim(path: Path) -> bool:
    """Create `path` empty unless it exists (atomically, also against other processes)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def write_new(
    path: Callable[[int], Path],
    write: Callable[[BinaryIO], None],
    taken: Callable[[Path], bool] = lambda p: False,
) -> Path:
    """Like atomic_write, to path(n) for the first n = 1, 2, ... that neither exists nor is `taken`:
    never replaces a file, also when another process picks names in the same folder at the same time
    (the name is claimed by exclusive creation once the content is written, then renamed onto)."""
    tmp = _write_temp(path(1).parent, path(1).name, write)
    try:
        n = 1
        while taken(path(n)) or not _claim(path(n)):
            n += 1
        os.replace(tmp, path(n))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path(n)


def copy_file(src: str | Path, dst: str | Path) -> Path:
    """Copy src's bytes to dst atomically (atomic_write): a reader of dst never sees a partial copy."""
    data = Path(src).read_bytes()
    return atomic_write(dst, lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def finite_json(obj: Any) -> Any:
    """`obj` with every NaN or infinite float (Python or NumPy, at any depth) replaced by None: strict
    JSON has no NaN, and a diverged metric must not stop the run's files from being written."""
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Strict JSON (non-finite numbers become null), written atomically."""
    return write_text(path, json.dumps(finite_json(obj), indent=2, allow_nan=False) + "\n")


def publish(folder: str | Path, write: Callable[[Path], Any], last: tuple[str, ...] = ()) -> list[Path]:
    """Call write(staging) on a new staging folder inside `folder`, then move each entry it made into
    `folder` (files and whole subfolders, the names in `last` last, in that order): until every write
    succeeded nothing in `folder` changes, and the staging folder is removed either way."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=STAGING, dir=folder))
    try:
        write(stage)
        names = sorted(os.listdir(stage), key=lambda n: last.index(n) + 1 if n in last else 0)
        for name in names:
            src, dst = stage / name, folder / name
            if src.is_dir() and dst.is_dir():  # a directory cannot replace a non-empty one: swap it out
                dst.rename(stage / f"{name}.replaced")
            os.replace(src, dst)
        return [folder / n for n in names]
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def remove_stale(folder: Path) -> None:
    """Delete what a killed writer leaves behind: `.*.tmp` files of atomic_write in the folder and its
    checkpoint/, and staging folders. Only safe under the folder's lock."""
    for d in (folder, folder / "checkpoint"):
        for p in d.glob(".*.tmp"):
            if p.is_file():
                p.unlink(missing_ok=True)
    for p in folder.glob(f"{STAGING}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _alive(owner: dict) -> bool:
    """The lock owner's process still runs (assumed when it runs on another host)."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def locked_message(folder: Path) -> str:
    """One line: who holds `folder`'s lock (from its owner file, when readable and not stale)."""
    try:
        owner = json.loads((folder / LOCK_OWNER).read_text())
        who = f"pid {int(owner['pid'])} ({owner['command']}, since {owner['since']})"
        if not _alive(owner):
            who = "another process"
    except (OSError, ValueError, KeyError, TypeError):
        who = "another process"
    return f"{folder} is in use by {who}; wait for it or use another --run-dir"


@contextmanager
def run_lock(folder: str | Path, command: str) -> Iterator[Path]:
    """Hold `folder`'s exclusive lock (an OS file lock on folder/.lock, freed by the kernel if the
    process dies) for the block; `command` (e.g. "bayesmeta fit") is recorded for a refused second
    writer, which gets RunLockedError at once. Re-entrant within a process. On acquiring, removes stale
    temporaries (remove_stale); a folder created here and left empty is removed again on exit."""
    folder = Path(folder)
    key = folder.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield folder
        finally:
            _held[key] -= 1
        return
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK, timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise RunLockedError(locked_message(folder)) from None
    _held[key] = 1
    try:
        remove_stale(folder)
        since = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": since}
        write_json(folder / LOCK_OWNER, owner | {"argv": sys.argv})
        yield folder
    finally:
        del _held[key]
        (folder / LOCK_OWNER).unlink(missing_ok=True)
        empty = created and {p.name for p in folder.iterdir()} <= {LOCK}
        if empty:
            (folder / LOCK).unlink(missing_ok=True)
        lock.release()
        if empty:
            try:
                folder.rmdir()
            except OSError:  # another process made something in it meanwhile
                pass
