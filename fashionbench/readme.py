"""Copy the results table from reports/results.json into README.md, between its markers.

    python -m fashionbench.readme            # rewrite the block
    python -m fashionbench.readme --check    # exit 1 if README.md is out of date

A separate command, not part of the compare stage, so that no DVC stage writes a file that
git tracks by hand: run it after `dvc repro` and commit both.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fashionbench.cli import user_errors
from fashionbench.errors import UserError
from fashionbench.io import write_text
from fashionbench.report import results_table

START, END = "<!-- results:start -->", "<!-- results:end -->"


def block(table: dict) -> str:
    """What the README holds between its results markers."""
    return (f"{START}\n{results_table(table)}\nGenerated from `reports/results.json` by "
            "`python -m fashionbench.readme` after `dvc repro`; per-class accuracy, the "
            f"batch-norm check and figures are in `reports/results.md`.\n{END}")


def current_block(readme: Path) -> str | None:
    text = readme.read_text() if readme.is_file() else ""
    start, end = text.find(START), text.find(END)
    return text[start:end + len(END)] if 0 <= start < end else None


def update(readme: Path, table: dict) -> bool:
    """Rewrite the block; return whether the file changed."""
    text = readme.read_text()
    old = current_block(readme)
    if old is None:
        raise UserError(f"{readme} has no {START} ... {END} markers: add them where the table goes")
    new_text = text.replace(old, block(table))
    if new_text != text:
        write_text(readme, new_text)
    return new_text != text


def main(readme: Path = Path("README.md"), results: Path = Path("reports/results.json"),
         check: bool = typer.Option(False, help="only check that README.md is up to date")) -> None:
    """Write (or --check) README.md's results table from reports/results.json."""
    with user_errors():
        if not results.is_file():
            raise UserError(f"{results} not found: run `dvc repro compare` first")
        try:
            table = json.loads(results.read_text())
        except ValueError as err:
            raise UserError(f"{results} is unreadable ({err}): run `dvc repro -s -f compare`") from None
        if check:
            if current_block(readme) != block(table):
                typer.echo(f"error: {readme}'s results table differs from {results}: run "
                           "`python -m fashionbench.readme` and commit", err=True)
                raise typer.Exit(1)
            typer.echo(f"{readme} matches {results}")
            return
        changed = update(readme, table)
    typer.echo(f"{readme}: {'table updated' if changed else 'already up to date'}")


if __name__ == "__main__":
    typer.run(main)
