"""Stage compare: the results table of the runs params.yaml defines, the ensemble, figures."""

from pathlib import Path

import typer

from fashionbench.cli import user_errors
from fashionbench.params import PARAMS_FILE, load_plan, read_yaml
from fashionbench.report import compare


def main(params: Path = PARAMS_FILE) -> None:
    """Write metrics/compare.json, reports/results.md and plots/compare/; print the table.
    `python -m fashionbench.readme` then copies the table into README.md."""
    with user_errors():
        seed = read_yaml(params)["evaluate"]["calibration_seed"]  # check_params has validated it
        table = compare(load_plan(params), seed)
    ran = {row: e["accuracy"] for row, e in table.items() if not e.get("not_run")}
    best = max(ran, key=ran.get)
    typer.echo(f"compare: {len(ran)} of {len(table)} rows ran, best {best} {ran[best]:.4f}; "
               "table in reports/results.md")


if __name__ == "__main__":
    typer.run(main)
