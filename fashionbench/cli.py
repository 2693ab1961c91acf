"""What every stage script shares: turning user errors into a clean message and exit code."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import typer

from fashionbench.errors import UserError

USER_ERROR_EXIT = 2


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print a UserError as one `error:` message on stderr and exit non-zero, no traceback."""
    try:
        yield
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(USER_ERROR_EXIT) from None


def _ancestors() -> list[int]:
    """This process's ancestors, nearest first (Linux /proc; empty elsewhere)."""
    chain, pid = [], os.getppid()
    while pid > 1:
        chain.append(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4: ppid (after the command name)
    return chain


def _is_dvc(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(Path(arg.decode(errors="replace")).name in ("dvc", "dvc.exe") for arg in argv[:3]) \
        or b"dvc" in argv[1:3] and b"-m" in argv[:3]


def stop_with_dvc(poll_s: float = 2.0) -> None:
    """When run by `dvc repro`/`dvc exp run`, end this process if that dvc process dies.

    A killed dvc would otherwise leave its stage running, and a re-run would train the same
    run beside it. A daemon thread polls the dvc ancestor and, when it is gone, sends this
    process SIGTERM, which the main thread turns into SystemExit: locks are released and no
    half-written file is left (DVC starts stages with SIGINT ignored, so an interrupt
    would not reach them). Call from the main thread.
    """
    owner = next((pid for pid in _ancestors() if _is_dvc(pid)), None)
    if owner is None:
        return

    def exit_on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_on_term)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                typer.echo(f"error: the dvc process {owner} that started this stage is gone; stopping",
                           err=True)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, daemon=True, name="stop-with-dvc").start()
