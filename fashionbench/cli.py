"""What every stage script shares: turning user errors into a clean message and exit code."""

from __future__ import annotations

import contextlib
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
