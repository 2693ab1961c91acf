"""Stage train_svm@<variant>: fit one `svm:` recipe of params.yaml and score the test set.

    python -m stages.train_svm rbf      # variant: a key of params.yaml `svm:` (rbf, hog, fast, ...)

Writes models/svm/<variant>/model.joblib (the fitted pipeline, uint8 images in),
models/svm/<variant>/test_scores.npz and metrics/train/svm-<variant>.json.
"""

from pathlib import Path

import typer

from fashionbench.classical import recipe, save_run, train_variant
from fashionbench.cli import user_errors
from fashionbench.data import load_prepared
from fashionbench.params import PARAMS_FILE, load_params


def main(variant: str = typer.Argument(..., help="a recipe under params.yaml `svm:`"),
         params: Path = PARAMS_FILE, prepared: Path = Path("data/prepared"),
         models: Path = Path("models/svm"), metrics: Path = Path("metrics/train")) -> None:
    """Train svm.<variant> on the prepared training split and write model, scores and metrics."""
    with user_errors():
        config = load_params(params)
        cfg = recipe(config, variant)
        data = load_prepared(prepared, config.dataset)
        run = train_variant(cfg, data.train, data.test, variant, config.seed, config.quick)
        save_run(run, models / variant, metrics / f"svm-{variant}.json")
    m = run.metrics
    typer.echo(f"svm-{variant}: test accuracy {m['test_accuracy']:.4f}, macro F1 "
               f"{m['test_macro_f1']:.4f}; fit {m['fit_time_s']:.1f} s on {m['train_size']} images, "
               f"predict {m['predict_time_s']:.1f} s")


if __name__ == "__main__":
    typer.run(main)
