"""Atomic writes: every output goes to a temporary file beside it, then is renamed over it,
so a kill or a full disk never leaves a truncated file where a good one stood. Also the
exclusive lock a run holds, and file digests."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    except OSError as err:  # a folder not writable: name the file, not a temporary name
        err.filename = str(path)
        raise
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would otherwise become the file's mode
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as err:  # a full disk names the file the user knows, not its temporary twin
        if err.filename in (None, tmp):
            err.filename = str(path)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_files() -> Iterator[Callable[[Path], Path]]:
    """Yield `stage(path)`, which returns a new temporary file beside `path`. When the block
    ends without an error, each staged file replaces its target (one rename each, in order);
    on an error, every temporary file goes, and so do the folders made for them: a group of
    files that is checked whole before any of them replaces the previous ones."""
    staged: list[tuple[Path, Path]] = []
    made: list[Path] = []

    def stage(path: Path) -> Path:
        path = Path(path)
        made.extend(d for d in [path.parent, *path.parent.parents] if not d.exists())
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        staged.append((Path(tmp), path))
        return Path(tmp)

    try:
        yield stage
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        for folder in sorted(set(made), key=lambda d: len(d.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path | str, data: Any) -> None:
    """Indented JSON with a final newline, written atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def save_figure(fig: Any, path: Path | str, dpi: int = 110) -> None:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)


def sha256_file(path: Path | str, chunk: int = 2**20) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def exclusive_lock(path: Path | str, refuse: Callable[[int | None], Exception]) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if absent) for the duration, with
    this process's PID in it. If another process holds it, raise `refuse(holder_pid)` at once
    (the PID is None when the file does not name one).

    The file is opened without truncating it: only the holder writes it, so a refused process
    never wipes the holder's PID, and the refusal can name it.
    """
    path = Path(path)
    for attempt in range(3):  # a cleanup elsewhere may remove an empty folder in between
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise refuse(_pid_in(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _pid_in(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None
