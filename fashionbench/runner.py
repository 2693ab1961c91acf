"""Train one deep row where DVC is not installed (a rented GPU), in pieces that resume.

    python -m fashionbench.runner train wrn --seed 0 --minutes 9      # repeat until it says done
    python -m fashionbench.runner train wrn --minutes 9 --out /tmp/out --split-mib 15
    python -m fashionbench.runner place /tmp/out                     # back in the DVC workspace
    python -m fashionbench.runner time se_wrn --minutes 5            # epochs that fit in 5 minutes

`train` writes exactly what the train stage writes (models/<row>/seed<N>/model.pt,
metrics/train/<row>-seed<N>.json and the curves under plots/train/<row>-seed<N>/, in
DVCLive's layout), from the same params.yaml and data/prepared, with the same checkpoints
(see fashionbench.train.checkpoint_root). A piece stops at the first checkpoint after which
another `checkpoint_every` epochs would overrun `--minutes`; the next call resumes there, and
the call that trains the last epoch writes the outputs. `--out` also copies them to a folder,
split into parts of at most `--split-mib` MiB for a transfer with a size limit.

`time` trains a few hundred steps of the row's recipe on this machine and prints its seconds
per epoch and how many epochs fit in `--minutes`: the number to write into the row's
`epochs` when a recipe is shortened to a budget (the table states it).

`place` puts such a folder's files (parts joined) where the stage writes them; then
`dvc commit train_<row>@<seed>` records them and `dvc status` is clean for that stage.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import typer

from fashionbench import distributed
from fashionbench.augment import enlarge
from fashionbench.cli import user_errors
from fashionbench.data import Prepared, load_prepared
from fashionbench.errors import UserError
from fashionbench.io import atomic_path, write_json, write_text
from fashionbench.params import PARAMS_FILE, Params, load_params
from fashionbench.train import (_load_checkpoint, checkpoint_root, fingerprint, make_optimizer,
                                make_runtime, make_scheduler, model_for, steps_per_epoch,
                                to_device, train_and_save, train_one_epoch)
from stages.train import CURVES

NOT_DONE_EXIT = 3   # a piece ended before the last epoch: run the same command again
PART = ".part"      # model.pt.part000, ...: pieces of a file split for transfer

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


class PieceDone(Exception):
    """The time (or epoch) budget of this piece is spent, right after a checkpoint."""


class Curves:
    """Per-epoch curves written as DVCLive writes them: plots/metrics/<name>.tsv (step, value)
    and metrics.json (latest values, nested by '/'), rebuilt whole on every epoch."""

    def __init__(self, folder: Path):
        self.folder, self.rows = folder, {name: [] for name in CURVES.values()}

    def log(self, epoch_metrics: dict) -> None:
        step = epoch_metrics["epoch"] - 1
        for key, name in CURVES.items():
            if key in epoch_metrics:
                self.rows[name] = [r for r in self.rows[name] if r[0] < step] + [(step, epoch_metrics[key])]
        latest: dict = {}
        for name, rows in self.rows.items():
            if not rows:
                continue
            write_text(self.folder / "plots/metrics" / f"{name}.tsv",
                       f"step\t{name.rsplit('/', 1)[-1]}\n" + "".join(f"{s}\t{v}\n" for s, v in rows))
            *parents, leaf = name.split("/")
            node = latest
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = rows[-1][1]
        write_json(self.folder / "metrics.json", latest | {"step": step})


def completed_epochs(row: str, params: Params, data: Prepared, seed: int) -> int:
    """Epochs the run's checkpoint holds (0 without one): what the next piece resumes from."""
    recipe = params.recipe(row)
    model = model_for(recipe.model, recipe.arch, recipe, params.dataset)
    name = fingerprint(model, recipe.model, recipe.arch, recipe, seed, data.train, data.val,
                       data.mean, data.std, params.epoch_images(row))[:16]
    saved = _load_checkpoint(checkpoint_root() / name / "checkpoint.pt", "cpu")
    return len(saved["history"]) if saved is not None else 0


def outputs(row: str, seed: int) -> list[Path]:
    """What the train stage train_<row>@<seed> writes, relative to the repository root."""
    run_id = f"{row}-seed{seed}"
    return [Path("models") / row / f"seed{seed}" / "model.pt", Path("metrics/train") / f"{run_id}.json",
            Path("plots/train") / run_id]


def _budget(minutes: float, epochs: int, checkpoint_every: int, resumed: int):
    """on_epoch callback: after a checkpointed epoch, stop when the next `checkpoint_every`
    epochs would overrun `minutes` or `epochs` new epochs are done."""
    start = time.monotonic()

    def check(metrics: dict) -> None:
        epoch = metrics["epoch"]
        if epoch <= resumed or epoch % checkpoint_every:
            return  # a replayed epoch, or no checkpoint behind this one
        elapsed, new = time.monotonic() - start, epoch - resumed
        if (epochs and new >= epochs) or elapsed + elapsed / new * checkpoint_every > minutes * 60:
            raise PieceDone(epoch)
    return check


@app.command()
def train(row: str = typer.Argument(..., help="a deep row of params.yaml: cnn, wrn, se_wrn, ..."),
          seed: int = typer.Option(0, help="training seed"),
          minutes: float = typer.Option(9.0, help="wall-clock budget of this piece"),
          epochs: int = typer.Option(0, help="also stop after this many new epochs (0: no limit)"),
          out: Path = typer.Option(None, help="also copy the finished outputs here"),
          split_mib: float = typer.Option(0.0, help="with --out: split files larger than this"),
          root: Path = typer.Option(Path("."), help="the repository root (params.yaml, data/)")) -> None:
    """Train (or resume) one run for at most --minutes; exit 3 while epochs remain."""
    with user_errors():
        params = load_params(root / PARAMS_FILE)
        recipe = params.recipe(row)
        data = load_prepared(root / "data/prepared", params.dataset)
        resumed = completed_epochs(row, params, data, seed)
        model_file, record, curve_dir = (root / rel for rel in outputs(row, seed))
        curves = Curves(curve_dir)
        check = _budget(minutes, epochs, recipe.checkpoint_every, resumed)

        def on_epoch(metrics: dict) -> None:
            curves.log(metrics)
            if metrics["epoch"] < recipe.epochs:
                check(metrics)

        try:
            summary = train_and_save(row, params, data, seed, model_file.parent, record,
                                     on_epoch=on_epoch, progress=False)
        except PieceDone as done:
            if distributed.is_main():
                typer.echo(f"{row}-seed{seed}: stopped after epoch {done.args[0]} of {recipe.epochs} "
                           f"(checkpoint saved); run the same command again to resume")
            raise typer.Exit(NOT_DONE_EXIT) from None
        if not distributed.is_main():
            return  # under torchrun rank 0 writes, exports and reports
        if out is not None:
            export(root, outputs(row, seed), out, int(split_mib * 2**20))
    typer.echo(f"{row}-seed{seed}: done, {recipe.epochs} epochs, train accuracy "
               f"{summary['train_acc']:.4f}; place the outputs and `dvc commit train_{row}@{seed}`")


def epoch_seconds(row: str, params: Params, data: Prepared, images: int) -> tuple[float, str]:
    """Seconds one full epoch of `row` takes here, timed on `images` training images after a
    warm-up of ten steps (allocation, kernel plans); and the device it ran on."""
    recipe = params.recipe(row)
    runtime = make_runtime(recipe)
    model = model_for(recipe.model, recipe.arch, recipe, params.dataset).to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, y = to_device(data.train, runtime.device)
    x = enlarge(x, recipe.input_size)
    optimizer = make_optimizer(model, recipe, runtime.device)
    scheduler = make_scheduler(optimizer, recipe, steps_per_epoch(len(y), recipe.batch_size))
    gen = torch.Generator(device=runtime.device).manual_seed(0)
    args = dict(mean=data.mean, std=data.std, runtime=runtime, num_classes=params.dataset.num_classes)
    train_one_epoch(model, optimizer, scheduler, x, y, recipe, gen, epoch_images=10 * recipe.batch_size, **args)
    timed = train_one_epoch(model, optimizer, scheduler, x, y, recipe, gen, epoch_images=images, **args)
    return len(y) / timed["images_per_s"], runtime.describe()


@app.command("time")
def time_row(row: str = typer.Argument(..., help="a deep row of params.yaml"),
             minutes: float = typer.Option(0.0, help="a training budget: print the epochs that fit"),
             images: int = typer.Option(8192, help="training images timed"),
             as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
             root: Path = typer.Option(Path("."), help="the repository root (params.yaml, data/)")) -> None:
    """Time one epoch of a row's recipe here; with --minutes, the epochs that fit."""
    with user_errors():
        params = load_params(root / PARAMS_FILE)
        seconds, device = epoch_seconds(row, params, load_prepared(root / "data/prepared", params.dataset), images)
    fit = int(minutes * 60 // seconds)
    if as_json:
        typer.echo(json.dumps({"row": row, "s_per_epoch": seconds, "epochs_fit": fit, "device": device}))
        return
    typer.echo(f"{row}: {seconds:.2f} s per epoch on {device}"
               + (f"; {fit} epochs fit in {minutes:g} minutes" if minutes else ""))


def _files(root: Path, paths: list[Path]) -> list[Path]:
    found = []
    for rel in paths:
        path = root / rel
        found += sorted(p.relative_to(root) for p in path.rglob("*") if p.is_file()) if path.is_dir() else [rel]
    return found


def export(root: Path, paths: list[Path], out: Path, part_bytes: int = 0) -> None:
    """Copy `paths` (files or folders under `root`) to `out`, keeping their relative paths;
    files larger than `part_bytes` (when > 0) become <name>.part000, .part001, ..."""
    for rel in _files(root, paths):
        source, target = root / rel, out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        size = source.stat().st_size
        if not part_bytes or size <= part_bytes:
            shutil.copyfile(source, target)
            continue
        with open(source, "rb") as f:
            for index in range(-(-size // part_bytes)):
                Path(f"{target}{PART}{index:03d}").write_bytes(f.read(part_bytes))


@app.command()
def place(folder: Path = typer.Argument(..., help="a folder `train --out` wrote"),
          root: Path = typer.Option(Path("."), help="the repository root to place the files in")) -> None:
    """Put an exported run's files where its train stage writes them, joining split files."""
    with user_errors():
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder of runner outputs")
        placed = []
        for source in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = source.relative_to(folder)
            if PART in rel.name:
                stem, _, index = rel.name.rpartition(PART)
                if index != "000":
                    continue
                rel = rel.with_name(stem)
                parts = sorted(source.parent.glob(f"{stem}{PART}[0-9][0-9][0-9]"))
                content = b"".join(p.read_bytes() for p in parts)
            else:
                content = source.read_bytes()
            with atomic_path(root / rel) as tmp:
                tmp.write_bytes(content)
            placed.append(str(rel))
        if not placed:
            raise UserError(f"{folder} holds no files")
        _check_model(root, placed)
    typer.echo("placed " + ", ".join(placed) + "\nthen: `dvc commit` the train stage, `dvc status`")


def _check_model(root: Path, placed: list[str]) -> None:
    from fashionbench.models import load_trained

    for rel in placed:
        if rel.endswith("model.pt"):
            load_trained(root / rel)  # a missing part fails here, naming the file


def main() -> None:
    app()


if __name__ == "__main__":
    main()
