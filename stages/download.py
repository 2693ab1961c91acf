"""Stage download: fetch the four official files and verify their content."""

from pathlib import Path

import typer

from fashionbench.cli import user_errors
from fashionbench.data import download
from fashionbench.params import PARAMS_FILE, load_params


def main(params: Path = PARAMS_FILE, out: Path = Path("data/raw")) -> None:
    """Try each source in download.sources; write data/raw only if all four files verify."""
    with user_errors():
        cfg = load_params(params).download
        download(cfg.sources, out, cfg.timeout)
    typer.echo(f"verified Fashion-MNIST files in {out}")


if __name__ == "__main__":
    typer.run(main)
