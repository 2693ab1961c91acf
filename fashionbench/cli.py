"""What every stage script and command shares: one-line errors, and a process that ends with
the dvc process that started it."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import typer

from fashionbench.errors import UserError

USER_ERROR_EXIT = 2

# OS errors a user fixes outside the code (space, limits, permissions): one line, the fix.
# Any other OSError is a bug or a surprise and keeps its traceback.
OS_ERROR_FIXES = {
    errno.ENOSPC: "free space on its file system, then run the command again",
    errno.EDQUOT: "free space within your disk quota (or have it raised), then run the command again",
    errno.EFBIG: "the file size limit (`ulimit -f`) is below what it needs: raise it, then run "
                 "the command again",
    errno.EACCES: "make it (and its folder) readable and writable by you (`ls -l` shows who may), "
                  "then run the command again",
    errno.EROFS: "its file system is mounted read-only: run where it is writable",
}


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print a UserError, or an OSError a user fixes (disk full, file size limit, permission
    denied), as one `error:` line on stderr and exit non-zero, no traceback.

    Entering it also readies the process (see guard_process), so every stage, which enters
    it first thing, stops with the dvc process that started it.
    """
    guard_process()
    try:
        yield
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(USER_ERROR_EXIT) from None
    except OSError as err:
        fix = OS_ERROR_FIXES.get(err.errno)
        if fix is None:
            raise
        where = f"{err.filename}: " if err.filename else ""
        typer.echo(f"error: {where}{err.strerror or os.strerror(err.errno)}: {fix}", err=True)
        raise typer.Exit(USER_ERROR_EXIT) from None


_guarded = False  # guard_process has run
_watched = False  # stop_with_dvc has run


def guard_process() -> None:
    """Once per process, from the main thread: ignore SIGXFSZ, so a write past `ulimit -f`
    fails with EFBIG (which user_errors reports) instead of killing the process with no word
    (CPython ignores it at start-up; a stage does not rely on how it was started); and
    stop_with_dvc."""
    global _guarded
    if _guarded or threading.current_thread() is not threading.main_thread():
        return
    _guarded = True
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    stop_with_dvc()


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields from the state on (field 3 first); None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _ancestors() -> list[int]:
    """This process's ancestors, nearest first (Linux /proc; empty elsewhere)."""
    chain, pid = [], os.getppid()
    while pid > 1:
        chain.append(pid)
        fields = _stat(pid)
        if fields is None:
            break
        pid = int(fields[1])  # field 4: ppid
    return chain


def _is_dvc(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(Path(arg.decode(errors="replace")).name in ("dvc", "dvc.exe") for arg in argv[:3]) \
        or b"dvc" in argv[1:3] and b"-m" in argv[:3]


def _alive(pid: int, started: str | None) -> bool:
    """Whether `pid` is still the process that started at `started` (field 22) and not a
    zombie: a killed dvc whose parent has not reaped it yet is gone all the same."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and fields[19] == started


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid`, children first (Linux /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        children = parents.get(queue.pop(0), [])
        found += children
        queue += children
    return found


def stop_with_dvc(poll_s: float = 1.0, grace_s: float = 3.0) -> None:
    """When run by `dvc repro`/`dvc exp run`, end this process if that dvc process dies.

    A killed dvc would otherwise leave its stage running, and a re-run would train the same
    run beside it. A daemon thread polls the dvc ancestor and, when it is gone, sends this
    process SIGTERM, which the main thread turns into SystemExit: locks are released and no
    half-written file is left (DVC starts stages with SIGINT ignored, so an interrupt
    would not reach them). A stage whose dvc died before this call (a stage still importing
    its libraries) has no dvc ancestor left but the DVC_STAGE that dvc set: it stops at
    once. A main thread held in native code that never returns to Python
    (a libsvm fit) cannot take the SystemExit: after `grace_s` seconds the thread ends the
    process's own workers and the process itself. Call from the main thread; a second call
    does nothing.
    """
    global _watched
    if _watched:
        return
    _watched = True
    owner = next((pid for pid in _ancestors() if _is_dvc(pid)), None)
    if owner is None:
        if os.environ.get("DVC_STAGE"):  # dvc names the stage it starts: that dvc is gone already
            typer.echo(f"error: the dvc process that started stage {os.environ['DVC_STAGE']} is gone; "
                       "stopping", err=True)
            raise SystemExit(128 + signal.SIGTERM)
        return
    started = (_stat(owner) or [None] * 20)[19]

    def exit_on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_on_term)

    def watch() -> None:
        while _alive(owner, started):
            time.sleep(poll_s)
        typer.echo(f"error: the dvc process {owner} that started this stage is gone; stopping", err=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)  # the main thread is still in native code: end it the hard way
        for pid in _descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="stop-with-dvc").start()
