"""Stage download: fetch the dataset's official files and verify their content."""

from pathlib import Path

import typer

from fashionbench.cli import user_errors
from fashionbench.data import download
from fashionbench.params import PARAMS_FILE, load_params


def main(params: Path = PARAMS_FILE, out: Path = Path("data/raw")) -> None:
    """Try download.sources, then the dataset's mirrors; write data/raw only if every file
    verifies."""
    with user_errors():
        config = load_params(params)
        download(config.download.sources, out, config.download.timeout, config.dataset)
    typer.echo(f"verified {config.dataset.display_name} files in {out}")


if __name__ == "__main__":
    typer.run(main)
