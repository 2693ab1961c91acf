"""The quick run: the whole DAG at small scale, as a check that never touches the results.

    python -m fashionbench.quick                    # run it, print its table and the diff
    python -m fashionbench.quick --update-baseline  # and make it the new CI baseline

It is `dvc exp run --temp -S quick=true` under a name, with each deep row's first seed only (a
check needs one run per row, not the record's replicas): DVC runs every stage in a temporary
copy of the workspace, so the committed metrics, dvc.lock and `git status` stay as they were,
and the run stays listed in `dvc exp show`. The quick run's table is then compared with
reports/quick-baseline.json, row by row, and the command fails when a row's accuracy fell
by more than compare.tolerance: the CI gate. A workspace with uncommitted changes is refused
(the experiment would silently include them) unless --allow-dirty says that is the point.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable

import typer

from fashionbench.cli import user_errors
from fashionbench.errors import UserError
from fashionbench.gate import accuracy_drops, diff_table
from fashionbench.io import write_json
from fashionbench.params import PARAMS_FILE, Plan, load_params, load_plan
from fashionbench.report import compact, results_table

BASELINE = Path("reports/quick-baseline.json")
SMOKE_TEST = ("SMOKE TEST at small scale ({train_size:,} training images, deep rows capped at {epochs} epoch(s), "
              "{test_size} test images): it checks that every stage runs; its numbers are not the "
              "benchmark's (the deep rows stay near chance). The committed full-scale figures are "
              "README.md's table; `python -m fashionbench.reproduce` re-trains some of them.")
DROP_EXIT = 1
# DVC commits each experiment; a machine without a git identity still gets one for that.
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "fashionbench", "GIT_AUTHOR_EMAIL": "quick@fashionbench",
                "GIT_COMMITTER_NAME": "fashionbench", "GIT_COMMITTER_EMAIL": "quick@fashionbench"}


def _git(*args: str) -> str:
    result = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise UserError(f"`git {' '.join(args)}` failed: {result.stderr.strip()}")
    return result.stdout


def uncommitted() -> list[str]:
    """Tracked files with uncommitted changes."""
    return [line[3:] for line in _git("status", "--porcelain", "--untracked-files=no").splitlines()]


def run_experiment(name: str, overrides: list[str]) -> dict:
    """`dvc exp run --temp -S quick=true` named `name`; its results table (reports/results.json)."""
    command = ["dvc", "exp", "run", "--temp", "--name", name, "-S", "quick=true"]
    for override in overrides:
        command += ["-S", override]
    typer.echo("$ " + " ".join(command))
    configured = subprocess.run(["git", "config", "user.email"], capture_output=True, check=False)
    env = dict(os.environ) if configured.stdout.strip() else {**GIT_IDENTITY, **os.environ}
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as dvc:
        absent = condense(dvc.stdout, typer.echo)
    if absent:
        typer.echo(f"({absent} outputs of the committed record are not in this machine's DVC cache, as on "
                   "any fresh clone: the quick run builds its own)")
    if dvc.returncode != 0:
        raise UserError(f"the quick run failed (`{' '.join(command)}`): see the stage output above; "
                        "the committed results are untouched")
    refs = [r for r in _git("for-each-ref", "--format=%(refname)", "refs/exps").split()
            if r.rsplit("/", 1)[-1] == name]
    if not refs:
        raise UserError(f"experiment {name} ran but no ref refs/exps/.../{name} was found")
    return json.loads(_git("show", f"{refs[0]}:reports/results.json"))


# DVC warns once per output of dvc.lock that is not in the local cache when it sets up the
# temporary workspace: harmless here, since the quick run rebuilds every output it reads.
NOT_IN_CACHE = re.compile(r"^WARNING: No file hash info found for '.*'\. It won't be created\.$")
DVC_CHATTER = re.compile(r"^(> |Updating lock file|Stage '.*' didn't change, skipping|Use `dvc push`|To track the changes with git|"
                         r"Reproduced experiment|Experiment .* (is|was) |Ran experiment|\s*$)")


def condense(lines: Iterable[str], echo: Callable[[str], None]) -> int:
    """Print DVC's output as one line per stage line of result, prefixed by the stage's name;
    drop the not-in-cache warnings and DVC's own chatter. Returns the warnings dropped."""
    stage, absent = "", 0
    for line in (raw.rstrip("\n") for raw in lines):
        if NOT_IN_CACHE.match(line):
            absent += 1
        elif match := re.match(r"^Running stage '(.+)':$", line):
            stage = match[1]
        elif not DVC_CHATTER.match(line):
            echo(f"{stage}: {line}" if stage and not line.startswith(("ERROR", "WARNING")) else line)
    return absent


def first_seeds(plan: Plan) -> list[str]:
    """-S overrides that keep each deep row with several seeds to its first."""
    return [f"seeds.{row}=[{seeds[0]}]" for row, seeds in plan.seeds.items() if len(seeds) > 1]


def main(update_baseline: bool = typer.Option(False, help="write this run's table to the baseline"),
         allow_dirty: bool = typer.Option(False, help="run with uncommitted changes included"),
         set_: list[str] = typer.Option([], "--set", "-S", help="extra -S override, e.g. model.depth=16"),
         baseline: Path = BASELINE, params: Path = PARAMS_FILE) -> None:
    """Run the quick check, print its table and its diff against the baseline; exit 1 on a drop."""
    with user_errors():
        changed = uncommitted()
        if changed and not allow_dirty:
            raise UserError("uncommitted changes to " + ", ".join(changed) + ": the quick run would "
                            "include them. Commit or stash them, or pass --allow-dirty to check "
                            "them (nothing of yours is touched either way)")
        plan = load_plan(params)
        typer.echo(SMOKE_TEST.format(**vars(load_params(params).quick_scale)))
        start = time.perf_counter()
        # the user's -S come last, so they win (`-S 'seeds.wrn=[0,1]'` brings a seed back)
        results = run_experiment(f"quick-{time.strftime('%Y%m%d-%H%M%S')}", [*first_seeds(plan), *set_])
        minutes = (time.perf_counter() - start) / 60
        typer.echo(f"\nquick run (smoke test, small scale): {minutes:.1f} min\n\n{results_table(results)}")
        table = compact(results)  # what metrics/compare.json holds
        if update_baseline:
            write_json(baseline, table)
            typer.echo(f"wrote {baseline}: commit it to make this the CI baseline")
            return
        if not baseline.is_file():
            raise UserError(f"{baseline} not found: create it with --update-baseline")
        try:
            old = json.loads(baseline.read_text())
        except ValueError as err:
            raise UserError(f"{baseline} is unreadable ({err}): restore it from git or "
                            "re-create it with --update-baseline") from None
    typer.echo(diff_table(old, table))
    problems = accuracy_drops(old, table, plan.tolerance)
    if problems:
        typer.echo(f"error: accuracy dropped by more than {plan.tolerance} against {baseline}:", err=True)
        for line in problems:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(DROP_EXIT)
    typer.echo(f"ok: no row's accuracy dropped by more than {plan.tolerance} against {baseline}")


if __name__ == "__main__":
    typer.run(main)
