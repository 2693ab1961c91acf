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
split into parts of at most `--split-mib` MiB for a transfer with a size limit, with a
manifest.json: every file's and part's size and SHA-256, and the run's row and seed.

`time` trains a few hundred steps of the row's recipe on this machine and prints its seconds
per epoch and how many epochs fit in `--minutes`: the number to write into the row's
`epochs` when a recipe is shortened to a budget (the table states it).

`place` checks such a folder whole (the manifest; every part present, of its size and SHA-256;
the JSON files parse; the run record and the model are the manifest's run; the joined model
loads) and only then puts its files (parts joined) where the stage writes them, each by a
rename; a bad export changes nothing. Then `dvc commit train_<row>@<seed>` records them and
`dvc status` is clean for that stage.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from fashionbench import distributed
from fashionbench.augment import enlarge
from fashionbench.cli import user_errors
from fashionbench.data import Prepared, load_prepared
from fashionbench.errors import UserError
from fashionbench.io import atomic_files, atomic_path, sha256_file, write_json, write_text
from fashionbench.params import PARAMS_FILE, Params, load_params
from fashionbench.train import (_load_checkpoint, checkpoint_root, fingerprint, make_optimizer,
                                make_runtime, make_scheduler, model_for, steps_per_epoch,
                                to_device, train_and_save, train_one_epoch)
from stages.train import CURVES

NOT_DONE_EXIT = 3   # a piece ended before the last epoch: run the same command again
PART = ".part"      # model.pt.part000, ...: pieces of a file split for transfer
MAX_PARTS = 1000    # .part000 to .part999
MANIFEST = "manifest.json"  # an export's list of files, sizes, SHA-256 digests and its run
MANIFEST_FORMAT = 1
MAX_SEED = 2**32 - 1  # NumPy's seeds are 32-bit

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


def _positive(value: float) -> float:
    if value <= 0:
        raise typer.BadParameter(f"{value:g} is not above 0")
    return value


def _split_size(value: float) -> float:
    if value < 0 or 0 < value * 2**20 < 1:
        raise typer.BadParameter(f"{value:g}: use 0 (no split) or a size of at least one byte "
                                 f"({2**-20:.2g} MiB)")
    return value


@app.command()
def train(row: Annotated[str, typer.Argument(help="a deep row of params.yaml: cnn, wrn, se_wrn, ...")],
          seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="training seed")] = 0,
          minutes: Annotated[float, typer.Option(callback=_positive,
                                                 help="wall-clock budget of this piece (> 0)")] = 9.0,
          epochs: Annotated[int, typer.Option(min=0, help="also stop after this many new epochs "
                                                          "(0: no limit)")] = 0,
          out: Annotated[Optional[Path], typer.Option(help="also copy the finished outputs here, "
                                                           "with a manifest `place` checks")] = None,
          split_mib: Annotated[float, typer.Option(callback=_split_size,
                                                   help="with --out: split files larger than this "
                                                        "many MiB (0: no split)")] = 0.0,
          root: Annotated[Path, typer.Option(help="the repository root (params.yaml, data/)")] = Path(".")) -> None:
    """Train (or resume) one run for at most --minutes; exit 3 while epochs remain."""
    with user_errors():
        if split_mib and out is None:
            raise UserError("--split-mib splits the files --out copies: give --out too")
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
            export(root, outputs(row, seed), out, int(split_mib * 2**20), row=row, seed=seed)
    typer.echo(f"{row}-seed{seed}: done, {recipe.epochs} epochs, train accuracy "
               f"{summary['train_acc']:.4f}; "
               + (f"`python -m fashionbench.runner place {out}` where the DVC workspace is, then "
                  if out is not None else "")
               + f"`dvc commit train_{row}@{seed}`")


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
def time_row(row: Annotated[str, typer.Argument(help="a deep row of params.yaml")],
             minutes: Annotated[float, typer.Option(min=0, help="a training budget: print the epochs "
                                                                "that fit (0: none)")] = 0.0,
             images: Annotated[int, typer.Option(min=1, help="training images timed")] = 8192,
             as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
             root: Annotated[Path, typer.Option(help="the repository root (params.yaml, data/)")] = Path(".")) -> None:
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


class ExportError(UserError):
    """An exported run that cannot be placed: the message names what is missing or wrong."""


def _run_record(files: list[Path]) -> Path | None:
    # metrics/train/<row>-seed<N>.json, as outputs() lists it
    return next((rel for rel in files if rel.parent == Path("metrics/train") and rel.suffix == ".json"), None)


def _run_of(root: Path, files: list[Path], row: str | None, seed: int | None) -> tuple[str, int]:
    """The run (row, seed) the exported files are the outputs of: the arguments, checked
    against the run record among the files, or read from it."""
    rel = _run_record(files)
    if rel is not None:
        try:
            record = json.loads((root / rel).read_text())
            run, recorded = str(record["run"]), int(record["seed"])
        except (ValueError, KeyError, TypeError) as err:
            raise ExportError(f"{root / rel} is not a readable run record ({type(err).__name__}: {err}): "
                              "train the run again before exporting it") from None
        if (row, seed) == (None, None):
            row, seed = run.removesuffix(f"-seed{recorded}"), recorded
        if run != f"{row}-seed{seed}" or recorded != seed:
            raise ExportError(f"{root / rel} records run {run!r} (seed {recorded}), not {row}-seed{seed}")
    if row is None or seed is None:
        raise ExportError("the files hold no run record (metrics/train/<row>-seed<N>.json): "
                          "name the run's row and seed")
    return row, seed


def export(root: Path, paths: list[Path], out: Path, part_bytes: int = 0, *,
           row: str | None = None, seed: int | None = None) -> Path:
    """Copy `paths` (files or folders under `root`) to `out`, keeping their relative paths;
    files larger than `part_bytes` (when > 0) become <name>.part000, .part001, ...; and write
    out/manifest.json, which `place` checks before it changes anything: each file's path,
    size and SHA-256 (and its parts'), and the run (`row`, `seed`; by default read from the
    run record among the files) they are the outputs of. Returns the manifest's path."""
    if part_bytes < 0:
        raise ExportError(f"part size {part_bytes} bytes: use 0 (no split) or a positive size")
    files = _files(root, paths)
    if not files:
        raise ExportError(f"nothing to export: none of {', '.join(map(str, paths))} is under {root}")
    row, seed = _run_of(root, files, row, seed)
    sizes = {rel: (root / rel).stat().st_size for rel in files}
    for rel, size in sizes.items():  # before anything is written
        if part_bytes and -(-size // part_bytes) > MAX_PARTS:
            raise ExportError(f"{rel} ({size} bytes) would be {-(-size // part_bytes)} parts of "
                              f"{part_bytes} bytes, more than {MAX_PARTS}: split into larger parts")
    manifest = out / MANIFEST
    manifest.unlink(missing_ok=True)  # a half-rewritten export has none: place refuses it
    entries = []
    for rel, size in sizes.items():
        source, target = root / rel, out / rel
        entry = {"path": rel.as_posix(), "size": size, "sha256": sha256_file(source)}
        if not part_bytes or size <= part_bytes:
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
        else:
            entry["parts"] = []
            with open(source, "rb") as f:
                for index in range(-(-size // part_bytes)):
                    content, part = f.read(part_bytes), Path(f"{target}{PART}{index:03d}")
                    with atomic_path(part) as tmp:
                        tmp.write_bytes(content)
                    entry["parts"].append({"path": part.relative_to(out).as_posix(), "size": len(content),
                                           "sha256": hashlib.sha256(content).hexdigest()})
        entries.append(entry)
    write_json(manifest, {"format": MANIFEST_FORMAT, "row": row, "seed": seed, "files": entries})
    return manifest


@app.command()
def place(folder: Annotated[Path, typer.Argument(help="a folder `train --out` wrote")],
          root: Annotated[Path, typer.Option(help="the repository root to place the files in")] = Path("."),
          row: Annotated[Optional[str], typer.Option(help="refuse an export of another row")] = None,
          seed: Annotated[Optional[int], typer.Option(min=0, max=MAX_SEED,
                                                      help="refuse an export of another seed")] = None) -> None:
    """Check an exported run whole (manifest, every part's size and SHA-256, the model loads,
    the JSON parses, the run is the one claimed), then put its files where its train stage
    writes them, joining split files. A bad export changes nothing."""
    with user_errors():
        manifest = verify_export(folder, row, seed)
        placed = _install(folder, manifest, root)
    typer.echo(f"placed {len(placed)} files of {manifest['row']}-seed{manifest['seed']}: "
               + ", ".join(placed) + f"\nthen: `dvc commit train_{manifest['row']}@{manifest['seed']}`, "
               "`dvc status`")


def _manifest(folder: Path) -> dict:
    """The export's manifest, its shape checked; every path in it stays inside the folder."""
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder of runner outputs")
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportError(f"{path} is missing: {folder} is not a whole `runner train --out` "
                          "export; export the run again")
    try:
        manifest = json.loads(path.read_text())
        row, seed, files = str(manifest["row"]), int(manifest["seed"]), manifest["files"]
        for entry in files:
            for item in [entry, *entry.get("parts", [])]:
                item["size"], item["sha256"] = int(item["size"]), str(item["sha256"])
                rel = Path(item["path"])
                if rel.is_absolute() or ".." in rel.parts or rel == Path(MANIFEST):
                    raise ValueError(f"path {rel} is outside the export")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ExportError(f"{path} is not a readable manifest ({type(err).__name__}: {err}): "
                          "export the run again") from None
    if not files:
        raise ExportError(f"{path} lists no files: export the run again")
    return manifest | {"row": row, "seed": seed}


def _pieces(entry: dict) -> list[dict]:
    return entry.get("parts") or [entry]


def _read(folder: Path, entry: dict) -> bytes:
    return b"".join((folder / piece["path"]).read_bytes() for piece in _pieces(entry))


def verify_export(folder: Path, row: str | None = None, seed: int | None = None) -> dict:
    """The manifest of the export in `folder`, once every file and part it lists is present
    with its size and SHA-256, every JSON file parses, and the run record is the manifest's
    run (and `row`/`seed`'s, when given); else an ExportError naming what is missing or wrong.
    Reads the folder only; the model's loading is checked where it is placed (_install)."""
    manifest = _manifest(folder)
    run = f"{manifest['row']}-seed{manifest['seed']}"
    if (row is not None and row != manifest["row"]) or (seed is not None and seed != manifest["seed"]):
        raise ExportError(f"{folder} holds run {run}, not {row or manifest['row']}-seed"
                          f"{manifest['seed'] if seed is None else seed}: place the export of that run")
    pieces = [piece for entry in manifest["files"] for piece in _pieces(entry)]
    missing = [p["path"] for p in pieces if not (folder / p["path"]).is_file()]
    if missing:
        raise ExportError(f"{folder} is incomplete: {len(missing)} of {len(pieces)} files missing "
                          f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): copy them "
                          "again from where the run was trained")
    for piece in pieces:
        path = folder / piece["path"]
        size = path.stat().st_size
        if size != piece["size"]:
            raise ExportError(f"{path} has {size} bytes, not the {piece['size']} its manifest "
                              "lists: copy it again from where the run was trained")
        if sha256_file(path) != piece["sha256"]:
            raise ExportError(f"{path} is not the file exported (its SHA-256 differs from the "
                              "manifest's): copy it again from where the run was trained")
    for entry in manifest["files"]:
        if entry.get("parts") and hashlib.sha256(_read(folder, entry)).hexdigest() != entry["sha256"]:
            raise ExportError(f"the parts of {folder / entry['path']} do not join into the file "
                              "exported: export the run again")
    for entry in manifest["files"]:
        if entry["path"].endswith(".json"):
            try:
                json.loads(_read(folder, entry))
            except ValueError as err:
                raise ExportError(f"{folder / entry['path']} is not valid JSON ({err}): the run "
                                  "wrote a broken file; train and export it again") from None
    _check_record(folder, manifest)
    return manifest


def _check_record(folder: Path, manifest: dict) -> None:
    run, seed = f"{manifest['row']}-seed{manifest['seed']}", manifest["seed"]
    expected = [rel.as_posix() for rel in outputs(manifest["row"], seed)][:2]
    listed = {entry["path"]: entry for entry in manifest["files"]}
    absent = [rel for rel in expected if rel not in listed]
    if absent:
        raise ExportError(f"{folder} lacks {', '.join(absent)}, which run {run} writes: export the "
                          "run again")
    record = json.loads(_read(folder, listed[expected[1]]))
    if not isinstance(record, dict) or record.get("run") != run or record.get("seed") != seed:
        found = record.get("run") if isinstance(record, dict) else None
        raise ExportError(f"{folder / expected[1]} is the record of {found!r}, not of {run} as the "
                          "manifest says: export the run again")


def _install(folder: Path, manifest: dict, root: Path) -> list[str]:
    """Write every file to a temporary file beside its target (joining parts), check that the
    model loads, and only then rename each over its target; on any failure the workspace is
    left as it was."""
    from fashionbench.models import load_trained

    with atomic_files() as stage:
        for entry in manifest["files"]:
            target = stage(root / entry["path"])
            with open(target, "wb") as out:
                for piece in _pieces(entry):
                    with open(folder / piece["path"], "rb") as f:
                        shutil.copyfileobj(f, out)
            if Path(entry["path"]).name == "model.pt":
                _check_model(target, folder / entry["path"], len(entry.get("parts", [])),
                             manifest["seed"], load_trained)
    return [entry["path"] for entry in manifest["files"]]


def _check_model(staged: Path, exported: Path, parts: int, seed: int, load_trained) -> None:
    joined = f" (joined from {parts} parts)" if parts else ""
    try:
        _, meta = load_trained(staged)
    except UserError as err:
        reason = err.__cause__ or err
        raise ExportError(f"{exported}{joined} is not a model this code loads ({reason}): train "
                          "and export the run again") from None
    if meta.get("seed") != seed:
        raise ExportError(f"{exported} was trained with seed {meta.get('seed')}, not {seed} as its "
                          "manifest says: export the run again")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
