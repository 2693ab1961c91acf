"""The speed-run recipe's ablation, airbench-style: each trick switched off alone, at equal
epochs, scored on a 55k/5k validation split (the test set chooses nothing).

    python -m bench.speedrun_ablation                       # every probe, seed 0, then the table
    python -m bench.speedrun_ablation --probe recipe --probe "no whitening" --seed 1
    python -m bench.speedrun_ablation --set augment.crop_pad=2 --threads 1   # one core per probe
    python -m bench.speedrun_ablation --table               # the table of the probes run so far

The base is params.yaml's `speedrun_cpu` recipe with `--set` changes (key=value under the
row, as `dvc exp run -S` writes them) at `--epochs` (default 5: probes of about 4 minutes on
2 quiet cores), warmup kept at the same fraction of the steps. Data: data/raw split as
`preprocess.validation_size=5000` splits it, built once into `--prepared` by the library's own
preprocessing (not DVC). Each probe trains in this process from its seed and appends one JSON
line to `--results`: validation accuracy plain, with flip TTA and with flip + translate TTA
(1 px), wall and CPU seconds and the load average. Wall-clock times depend on what else the
CPU runs; the accuracies do not.

The README's table: `--set augment.crop_pad=2` (the recipe as it stood before the ablation
removed its crops) for every probe, `--seed 0`, and `--seed 1` for `recipe` and `no
translation`; the widths rows also `--set batch_size=512 --set lr=0.75`; then the row at full
length: `--probe recipe --epochs 30 --threads 1` beside `--probe "+ 2 px translation"
--epochs 30 --threads 1`, and `--probe recipe --seed 1` beside `--probe "+ random erasing"
--seed 0`, both `--epochs 30 --threads 1`. Each result line records the precision its steps ran in.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import typer

from fashionbench.data import load_prepared, load_raw, prepare, save_prepared
from fashionbench.evaluate import predict_proba, shifted_views
from ruamel.yaml import YAML

from fashionbench.params import Sizes, TrainRecipe, params_from_dict, read_yaml
from fashionbench.train import fit

ROW = "speedrun_cpu"
VALIDATION = 5000


def _arch(**changes) -> Callable[[TrainRecipe], TrainRecipe]:
    return lambda r: dataclasses.replace(r, arch=dataclasses.replace(r.arch, **changes))


def _augment(**changes) -> Callable[[TrainRecipe], TrainRecipe]:
    return lambda r: dataclasses.replace(r, augment=dataclasses.replace(r.augment, **changes))


def _recipe(**changes) -> Callable[[TrainRecipe], TrainRecipe]:
    return lambda r: dataclasses.replace(r, **changes)


# Each probe: the recipe with one change, and its epochs as a multiple of --epochs. The widths
# probes train for the same seconds as the recipe instead (epochs in inverse proportion to
# their training images/s on this CPU, one thread: 418, 666 and 1,302 for 32-64-128, 24-48-96
# and 16-32-64). TTA needs no probe: every probe reports it.
PROBES: dict[str, tuple[Callable[[TrainRecipe], TrainRecipe], float]] = {
    "recipe": (lambda r: r, 1.0),
    "widths 32-64-128 (equal time)": (_arch(widths=(32, 64, 128)), 0.6),
    "widths 16-32-64 (equal time)": (_arch(widths=(16, 32, 64)), 2.0),
    "no whitening": (_arch(whiten=False), 1.0),   # an ordinary trainable 2x2 first conv
    "no identity init": (_arch(dirac=False), 1.0),
    "BN biases at 1x lr": (_recipe(bn_bias_lr=1.0), 1.0),
    "no label smoothing": (_recipe(label_smoothing=0.0), 1.0),
    "random flips": (_augment(alternate_flip=False), 1.0),
    "no translation": (_augment(crop_pad=0), 1.0),
    "+ 2 px translation": (_augment(crop_pad=2), 1.0),
    "+ EMA 0.98 per step": (_recipe(ema=0.98), 1.0),
    # Zhong et al.'s setting for Fashion-MNIST: p 0.5, 2-40 % of the image
    "+ random erasing": (_augment(erase_p=0.5, erase_scale=(0.02, 0.4)), 1.0),
}


def prepared_split(raw: Path, out: Path):
    """The 55k/5k split preprocess makes with validation_size 5000 (seed 0), built once."""
    if not (out / "arrays.npz").is_file():
        train, test = load_raw(raw)
        save_prepared(prepare(train, test, Sizes(VALIDATION, 0, 0, 0)), out)
    return load_prepared(out)


def probe_recipe(params_path: Path, probe: str, epochs: int, settings: list[str] = ()) -> TrainRecipe:
    """The probe's recipe: params.yaml's with `settings` ("key=value", as `dvc exp run -S`
    takes them under the row), its epochs set (warmup kept at the same fraction)."""
    raw = read_yaml(Path(params_path))
    for setting in settings:
        key, _, value = setting.partition("=")
        *path, leaf = key.split(".")
        section = raw[ROW]
        for part in path:
            section = section.setdefault(part, {})
        section[leaf] = YAML(typ="safe", pure=True).load(value)
    base = params_from_dict(raw).recipe(ROW)
    change, factor = PROBES[probe]
    n = max(1, round((epochs or base.epochs) * factor))
    base = dataclasses.replace(base, epochs=n, warmup_epochs=base.warmup_epochs * n / base.epochs,
                               time_budget_s=0.0, device="cpu")
    return change(base)


def run_probe(probe: str, seed: int, recipe: TrainRecipe, data) -> dict:
    """Train one probe from `seed` on the 55k split; its validation accuracies and times."""
    load = os.getloadavg()[0]
    cpu, start = time.process_time(), time.perf_counter()
    result = fit(recipe.model, recipe.arch, recipe, data.train, data.val, mean=data.mean,
                 std=data.std, seed=seed, progress=False)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    kw = {"mean": data.mean, "std": data.std, "batch_size": 1000, "device": torch.device("cpu")}
    plain = predict_proba(result.model, data.val.images, **kw)
    flipped = (plain + predict_proba(result.model, data.val.images, views=("hflip",), **kw)) / 2
    shifted = (flipped + predict_proba(result.model, data.val.images,
                                       views=shifted_views(max(1, recipe.tta_shift)), **kw)) / 2
    acc = {name: float(np.mean(p.argmax(axis=1) == data.val.labels))
           for name, p in (("val_acc", plain), ("val_acc_flip_tta", flipped), ("val_acc_tta", shifted))}
    return {"probe": probe, "seed": seed, "epochs": recipe.epochs, "threads": torch.get_num_threads(),
            "precision": result.precision, **acc,
            "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "s_per_epoch": round(sum(h["epoch_time_s"] for h in result.history) / len(result.history), 1),
            "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}


def table(rows: list[dict]) -> str:
    """Markdown: one line per probe, --set and --epochs, seeds averaged (mean, and the spread
    when several). Δ: against the recipe probe with the same --set, --epochs and seeds (the
    same initial weights and image order), plain and with flip + translate TTA."""
    def cell(values: list[float]) -> str:
        mean = float(np.mean(values))
        return f"{mean:.4f}" + (f" ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else "")

    def key(row: dict) -> tuple:  # the --set and the --epochs the probe ran under
        # lines written before base_epochs was recorded: undo the probe's epoch factor
        base = row.get("base_epochs") or round(row["epochs"] / PROBES[row["probe"]][1])
        return tuple(row.get("settings") or ()), base

    rows = [r for r in rows if r["probe"] in PROBES]  # a probe since removed has no line

    lines = ["| probe | epochs | seeds | val acc | Δ | flip TTA | flip + translate TTA | Δ |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for group in dict.fromkeys(key(r) for r in rows):
        recipe = {r["seed"]: r for r in rows if r["probe"] == "recipe" and key(r) == group}
        settings = group[0]
        for probe in PROBES:
            runs = [r for r in rows if r["probe"] == probe and key(r) == group]
            if not runs:
                continue
            deltas = ["-", "-"]
            base = [recipe[r["seed"]] for r in runs if r["seed"] in recipe]
            if probe != "recipe" and len(base) == len(runs):
                deltas = [f"{np.mean([r[k] for r in runs]) - np.mean([b[k] for b in base]):+.4f}"
                          for k in ("val_acc", "val_acc_tta")]
            name = probe + (f" (--set {' '.join(settings)})" if settings else "")
            lines.append(f"| {name} | {runs[0]['epochs']} | {','.join(str(r['seed']) for r in runs)} | "
                         f"{cell([r['val_acc'] for r in runs])} | {deltas[0]} | "
                         f"{cell([r['val_acc_flip_tta'] for r in runs])} | "
                         f"{cell([r['val_acc_tta'] for r in runs])} | {deltas[1]} |")
    return "\n".join(lines)


def main(probe: list[str] = typer.Option([], help=f"probes to run (default: all): {', '.join(PROBES)}"),
         seed: list[int] = typer.Option([0], help="training seeds (each probe runs once per seed)"),
         epochs: int = typer.Option(5, help="the recipe's epochs in the probes (the widths probes "
                                            "scale it); 0 = params.yaml's"),
         threads: int = typer.Option(0, help="torch threads per probe; 0 = torch's default (every core)"),
         settings: list[str] = typer.Option([], "--set", help="key=value under speedrun_cpu for every "
                                            "probe, e.g. --set batch_size=512 --set arch.widths=[32,64,128]"),
         show_table: bool = typer.Option(False, "--table", help="only print the table of --results"),
         params: Path = typer.Option(Path("params.yaml")),
         raw: Path = typer.Option(Path("data/raw"), help="the four official files (read only)"),
         prepared: Path = typer.Option(Path("/tmp/speedrun-ablation/prepared"),
                                       help="where the 55k/5k split is built once"),
         results: Path = typer.Option(Path("/tmp/speedrun-ablation/results.jsonl"))) -> None:
    """Run the probes, append each result to --results, print the table of all results."""
    unknown = [p for p in probe if p not in PROBES]
    if unknown:
        raise typer.BadParameter(f"unknown probe(s) {unknown}; choose from {', '.join(PROBES)}")
    if threads:
        torch.set_num_threads(threads)
    if not show_table:
        data = prepared_split(raw, prepared)
        results.parent.mkdir(parents=True, exist_ok=True)
        for name in probe or list(PROBES):
            for s in seed:
                row = run_probe(name, s, probe_recipe(params, name, epochs, settings), data)
                row |= {"settings": settings, "base_epochs": epochs}
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                typer.echo(json.dumps(row))
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    typer.echo(table(rows))


if __name__ == "__main__":
    typer.run(main)
