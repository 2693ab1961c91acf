"""Stage compare: the results table across all runs, the ensemble row, figures, README table."""

from pathlib import Path

import typer

from fashionbench.cli import user_errors
from fashionbench.params import PARAMS_FILE, load_params
from fashionbench.report import compare, results_table


def main(params: Path = PARAMS_FILE) -> None:
    """Write metrics/compare.json, reports/results.md, plots/compare/ and README.md's table."""
    with user_errors():
        table = compare(load_params(params))
    typer.echo(results_table(table))


if __name__ == "__main__":
    typer.run(main)
