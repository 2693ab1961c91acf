"""Stage preprocess: seeded stratified validation split, optional subset, normalisation stats."""

from pathlib import Path

import typer

from fashionbench.cli import user_errors
from fashionbench.data import load_raw, prepare, save_prepared
from fashionbench.params import PARAMS_FILE, load_params


def main(params: Path = PARAMS_FILE, raw: Path = Path("data/raw"),
         out: Path = Path("data/prepared")) -> None:
    """Write data/prepared/: uint8 arrays and the training part's mean and std."""
    with user_errors():
        config = load_params(params)
        sizes = config.sizes()
        train, test = load_raw(raw, config.dataset)
        prepared = prepare(train, test, sizes)
        save_prepared(prepared, out)  # a full disk keeps the previous files: one error line
    val = len(prepared.val) if prepared.val is not None else 0
    typer.echo(f"train {len(prepared.train)}, validation {val}, test {len(prepared.test)}; "
               f"mean {prepared.mean:.4f}, std {prepared.std:.4f}")


if __name__ == "__main__":
    typer.run(main)
