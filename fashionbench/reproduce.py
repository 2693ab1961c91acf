"""Reproduce rows of the committed table on this machine, in minutes: the README's first command.

    python -m fashionbench.reproduce          # re-train compare.reproduce's runs at full scale
    python -m fashionbench.reproduce --list   # every row: what reproducing it takes here

The runs named by `compare.reproduce` in params.yaml (svm-fast and mlp seed 0: about two
minutes of training on a 2-core CPU) are re-trained on all 60,000 images by the stages' own
commands, in a temporary copy of the repository's tracked files: the committed record, the
DVC cache, dvc.lock and `git status` stay as they were. Each run's test accuracy is printed
beside its committed figure, with the difference and whether it lies within
`compare.reproduce_tolerance` (what another CPU changes: float rounding differs between
instruction sets, so a re-trained deep model lands within seed noise, not bit for bit).
Then every other row of the table, with what it takes on this machine: the recorded time,
scaled by how much faster or slower this machine trained the rows it just reproduced.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import typer

from fashionbench.cli import user_errors
from fashionbench.errors import UserError
from fashionbench.params import PARAMS_FILE, Plan, evaluate_stage, load_plan
from fashionbench.quick import uncommitted

RESULTS = Path("reports/results.json")


@dataclass(frozen=True)
class Reproduced:
    run_id: str
    accuracy: float
    committed: float
    train_s: float          # this machine's training time
    committed_train_s: float | None


def _tracked_copy(destination: Path) -> None:
    """The repository's tracked files (as they are in the working tree) under `destination`."""
    listed = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = Path(name)
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _stage(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Run one stage command in `cwd`; its seconds. A failing stage's own message is the error."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", *command], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        message = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        first = next((k for k, line in enumerate(message) if line.startswith("error:")), None)
        detail = "\n".join(message[first:] if first is not None else message[-15:])
        raise UserError(f"`python -m {' '.join(command)}` failed:\n{detail}\nnothing was written "
                        "outside a temporary folder")
    return time.perf_counter() - start


def _test_accuracy(run_id: str, copy: Path) -> tuple[float, float]:
    """(test accuracy, training seconds) of a run trained in `copy`, from its files there."""
    record = json.loads((copy / "metrics/train" / f"{run_id}.json").read_text())
    if run_id.startswith("svm-"):
        return record["test_accuracy"], record["fit_time_s"]
    import numpy as np
    import torch

    from fashionbench.data import load_prepared
    from fashionbench.evaluate import load_model, parse_run_id, predict_proba
    from fashionbench.params import load_params

    params = load_params(copy / PARAMS_FILE)
    test = load_prepared(copy / "data/prepared", params.dataset).test
    model, meta = load_model(parse_run_id(run_id, params), copy, torch.device("cpu"))
    probs = predict_proba(model, test.images, meta["mean"], meta["std"], batch_size=1000,
                          device=torch.device("cpu"), size=meta["input_shape"][-1])
    return float(np.mean(probs.argmax(axis=1) == test.labels)), record["wall_time_s"]


def _train_command(run_id: str) -> list[str]:
    if run_id.startswith("svm-"):
        return ["stages.train_svm", run_id[4:]]
    row, _, seed = run_id.rpartition("-seed")
    return ["stages.train", row, "--seed", seed]


def reproduce(plan: Plan, results: dict) -> list[Reproduced]:
    """Re-train plan.reproduce in a temporary copy; each run's accuracy beside the record."""
    with tempfile.TemporaryDirectory(prefix="fashionbench-reproduce-") as folder:
        copy = Path(folder)
        _tracked_copy(copy)
        env = {**os.environ, "FASHIONBENCH_CHECKPOINTS": str(copy / ".checkpoints")}
        seconds = sum(_stage(["stages." + s], copy, env) for s in ("check_params", "download", "preprocess"))
        typer.echo(f"data: verified and prepared in {seconds:.0f} s")
        done = []
        for run_id in plan.reproduce:
            typer.echo(f"{run_id}: training on all {plan.train_images:,} images ...")
            _stage(_train_command(run_id), copy, env)
            accuracy, train_s = _test_accuracy(run_id, copy)
            committed = json.loads((Path("metrics/eval") / f"{run_id}.json").read_text())["accuracy"]
            row = results.get(plan.row_of(run_id), {})
            done.append(Reproduced(run_id, accuracy, committed, train_s, row.get("train_s")))
            typer.echo("  " + verdict(done[-1], plan.reproduce_tolerance))
    return done


def verdict(run: Reproduced, tolerance: float) -> str:
    """One line: this machine's figure beside the committed one."""
    diff = run.accuracy - run.committed
    within = "within" if abs(diff) <= tolerance + 1e-12 else "OUTSIDE"
    return (f"test accuracy {run.accuracy:.4f}, committed {run.committed:.4f}, difference {diff:+.4f}: "
            f"{within} the CPU-to-CPU tolerance ±{tolerance:g}; trained in {run.train_s:.0f} s")


def speed_ratio(done: list[Reproduced]) -> float | None:
    """This machine's training time over the record's, for the rows just reproduced."""
    pairs = [(r.train_s, r.committed_train_s) for r in done if r.committed_train_s]
    return sum(a for a, _ in pairs) / sum(b for _, b in pairs) if pairs else None


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 \
        else f"{seconds / 3600:.1f} h"


def row_lines(plan: Plan, results: dict, ratio: float | None) -> list[str]:
    """What reproducing each row of the table takes: its command and time, here where known."""
    lines = [f"  {'row':<15} {'command':<38} time per run"]
    for row in plan.rows():
        entry = results.get(row)
        if not entry:
            continue
        command = "dvc repro " + (evaluate_stage(row) if row.startswith("svm-") else f"evaluate_{row}")
        hardware = entry.get("hardware") or "-"
        if entry.get("not_run"):
            time_text = "not run at full scale yet: " + (entry.get("estimate") or "no estimate")
        elif "cuda" in hardware:
            time_text = f"{_duration(entry['train_s'])} on a GPU ({hardware})"
        elif ratio is not None:
            time_text = f"~{_duration(entry['train_s'] * ratio)} here (recorded: {_duration(entry['train_s'])})"
        else:
            time_text = f"{_duration(entry['train_s'])} on {hardware}"
        runs = len(plan.seeds.get(row, ())) if not row.startswith("svm-") else 1
        lines.append(f"  {row:<15} {command:<38} {time_text}" + (f", {runs} seeds" if runs > 1 else ""))
    return lines


def main(list_rows: bool = typer.Option(False, "--list", help="only list the rows and their times"),
         allow_dirty: bool = typer.Option(False, help="run with uncommitted changes included"),
         params: Path = PARAMS_FILE) -> None:
    """Re-train the runs params.yaml's compare.reproduce names and compare them with the record."""
    # SIGTERM as an exception, so the running stage is killed with this command (subprocess.run
    # kills its child on the way out) and the temporary copy is removed
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    with user_errors():
        plan = load_plan(params)
        runs = [run_id for run_id, _, _ in plan.runs()]
        unknown = [run_id for run_id in plan.reproduce if run_id not in runs]
        if unknown:  # checked here, not in check_params: an experiment may drop a seed it names
            raise UserError(f"params.yaml: compare.reproduce names {', '.join(unknown)}, which params.yaml "
                            f"does not define; its runs: {', '.join(runs)}")
        results = json.loads(RESULTS.read_text())
        done: list[Reproduced] = []
        if not list_rows:
            changed = uncommitted()
            if changed and not allow_dirty:
                raise UserError("uncommitted changes to " + ", ".join(changed) + ": the figures would "
                                "not be the committed code's. Commit or stash them, or pass --allow-dirty")
            typer.echo(f"Re-training {len(plan.reproduce)} runs of the committed table at full scale, "
                       "in a temporary copy (the record is not touched):")
            start = time.perf_counter()
            done = reproduce(plan, results)
            typer.echo(f"done in {_duration(time.perf_counter() - start)}")
        typer.echo("\nEvery row of the table, and what reproducing it takes "
                   "(`dvc repro` re-trains a row's runs and re-evaluates them):")
        typer.echo("\n".join(row_lines(plan, results, speed_ratio(done))))
        typer.echo("  The whole DAG at small scale, as a smoke test (numbers at chance for the deep rows): "
                   "`python -m fashionbench.quick` (9 min on 2 AVX512-BF16 cores, 18 on AVX2 ones)")
    outside = [r.run_id for r in done if abs(r.accuracy - r.committed) > plan.reproduce_tolerance + 1e-12]
    if outside:
        typer.echo(f"error: {', '.join(outside)} outside the tolerance", err=True)
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
