"""CI gate: fail when a tracked test accuracy dropped by more than params compare.tolerance.

    python -m fashionbench.gate              # workspace against HEAD, via `dvc metrics diff`
    python -m fashionbench.gate --rev main   # against another revision
    python -m fashionbench.gate --diff d.json  # a saved `dvc metrics diff --json` output

Tracked accuracies are the metrics whose last key is `accuracy`: each run's test accuracy in
metrics/eval/<id>.json and each row's mean in metrics/compare.json. Exit 1 lists every drop.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Optional

import typer

from fashionbench.cli import user_errors
from fashionbench.errors import UserError
from fashionbench.params import PARAMS_FILE, load_params

DROP_EXIT = 1


def accuracy_drops(diff: dict, tolerance: float) -> list[str]:
    """One line per tracked accuracy that fell by more than `tolerance` or disappeared."""
    problems = []
    for path, changes in sorted(diff.items()):
        for key, change in sorted(changes.items()):
            if key.rsplit(".", 1)[-1] != "accuracy" or change.get("old") is None:
                continue  # not an accuracy, or a new metric: nothing to drop from
            old, new = change["old"], change.get("new")
            if new is None:
                problems.append(f"{path}: {key} was {old:.4f} and is now missing")
            elif old - new > tolerance:
                problems.append(f"{path}: {key} {old:.4f} -> {new:.4f} ({new - old:+.4f})")
    return problems


def metrics_diff(rev: str) -> dict:
    """`dvc metrics diff --json <rev>`: the workspace's metrics against `rev`."""
    result = subprocess.run(["dvc", "metrics", "diff", "--json", rev],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise UserError(f"`dvc metrics diff --json {rev}` failed: {result.stderr.strip()}")
    return json.loads(result.stdout or "{}")


def main(rev: str = typer.Option("HEAD", help="revision holding the committed metrics"),
         diff: Optional[Path] = typer.Option(None, help="a saved `dvc metrics diff --json` file"),
         params: Path = PARAMS_FILE) -> None:
    """Exit 1 when a tracked accuracy dropped by more than compare.tolerance."""
    with user_errors():
        tolerance = load_params(params).compare.tolerance
        changes = json.loads(diff.read_text()) if diff else metrics_diff(rev)
    problems = accuracy_drops(changes, tolerance)
    if problems:
        typer.echo(f"error: accuracy dropped by more than {tolerance} against {rev}:", err=True)
        for line in problems:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(DROP_EXIT)
    typer.echo(f"ok: no tracked accuracy dropped by more than {tolerance} against {rev}")


if __name__ == "__main__":
    typer.run(main)
