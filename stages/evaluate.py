"""Stage evaluate: test-set metrics, confusion data, mistakes and Grad-CAM for one run."""

from pathlib import Path

import typer

from fashionbench.cli import user_errors
from fashionbench.evaluate import evaluate_run
from fashionbench.params import PARAMS_FILE, load_params


def main(run_id: str = typer.Argument(..., help="cnn-seed0, wrn-seed0, svm-rbf, ..."),
         params: Path = PARAMS_FILE) -> None:
    """Write metrics/eval/<id>.json, plots/eval/<id>/ and predictions/<id>.npz."""
    with user_errors():
        result = evaluate_run(run_id, load_params(params))
    typer.echo(f"{run_id}: test accuracy {result['accuracy']:.4f}, macro F1 {result['macro_f1']:.4f}")


if __name__ == "__main__":
    typer.run(main)
