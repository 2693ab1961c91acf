"""Stage evaluate: test-set metrics, confusion data, mistakes and Grad-CAM for one run."""

from pathlib import Path

import typer

from fashionbench.cli import user_errors
from fashionbench.evaluate import evaluate_run
from fashionbench.params import PARAMS_FILE, load_params


def main(run_id: str = typer.Argument(..., help="cnn-seed0, wrn-seed0, svm-rbf, ..."),
         params: Path = PARAMS_FILE) -> None:
    """Write metrics/eval/<id>.json, plots/eval/<id>/, plots/reliability/<id>.csv,
    predictions/<id>.npz, reports/runs/<id>.json and reports/robustness/<id>.json."""
    with user_errors():
        result = evaluate_run(run_id, load_params(params))
    robust = result["robustness"]
    typer.echo(f"{run_id}: test accuracy {result['accuracy']:.4f}, macro F1 {result['macro_f1']:.4f}; "
               f"ECE after temperature scaling {result['calibration']['ece_ts']:.4f}; corrupted test set "
               f"{robust['mean_accuracy']:.4f} (worst {robust['worst_corruption']} {robust['worst_accuracy']:.4f})")


if __name__ == "__main__":
    typer.run(main)
