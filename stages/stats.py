"""Stage stats: class balance, pixel statistics and exploratory figures."""

from pathlib import Path

import typer

from fashionbench.cli import user_errors
from fashionbench.data import load_raw
from fashionbench.io import write_json
from fashionbench.params import PARAMS_FILE, load_params
from fashionbench.stats import description, summary, write_figures


def main(params: Path = PARAMS_FILE, raw: Path = Path("data/raw"),
         metrics: Path = Path("metrics/stats.json"), report: Path = Path("reports/dataset.json"),
         plots: Path = Path("plots/stats")) -> None:
    """Write metrics/stats.json, reports/dataset.json and the figures under plots/stats/."""
    with user_errors():
        config = load_params(params)
        sizes = config.stats_sizes()
        train, test = load_raw(raw, config.dataset)
        write_json(metrics, summary(train, test))
        write_json(report, description(train, test, config.dataset.classes))
        write_figures(train, sizes, config.seed, plots, config.dataset)


if __name__ == "__main__":
    typer.run(main)
