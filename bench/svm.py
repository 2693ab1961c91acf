"""The seed's SVM recipe against the fast path, on the full 60k training set.

    python -m bench.svm                          # svm.rbf (the seed recipe) and svm.fast, ~5 min
    python -m bench.svm --variant fast           # any recipes of params.yaml `svm:`
    python -m bench.svm --out bench/svm.json     # also save the rows

Each recipe is fitted exactly as the train_svm stage fits it (same pipeline, same seed), but
on all 60,000 official training images (data/raw, no validation split) and scored on the
10,000 test images. The ratio column is each fit time over the first recipe's.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fashionbench.classical import recipe, train_variant
from fashionbench.cli import user_errors
from fashionbench.data import load_raw
from fashionbench.params import PARAMS_FILE, load_params


def main(variant: list[str] = typer.Option(["rbf", "fast"], help="recipes, the baseline first"),
         params: Path = PARAMS_FILE, raw: Path = Path("data/raw"),
         out: Path | None = typer.Option(None, help="write the rows as JSON here")) -> None:
    """Fit each recipe on the full training set and print accuracy, times and fit-time ratio."""
    with user_errors():
        config = load_params(params)
        recipes = {name: recipe(config, name) for name in variant}
        train, test = load_raw(raw)
        rows = []
        for name, cfg in recipes.items():
            typer.echo(f"fitting svm.{name} on {len(train)} images ...", err=True)
            rows.append(train_variant(cfg, train, test, name, config.seed, quick=False).metrics)
    base = rows[0]["fit_time_s"]
    typer.echo(f"\n| recipe | test accuracy | macro F1 | fit time | predict time | fit / {variant[0]} |")
    typer.echo("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        typer.echo(f"| {row['variant']} | {row['test_accuracy']:.4f} | {row['test_macro_f1']:.4f} | "
                   f"{row['fit_time_s']:.1f} s | {row['predict_time_s']:.1f} s | "
                   f"{row['fit_time_s'] / base:.3f} |")
    if out is not None:
        out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    typer.run(main)
