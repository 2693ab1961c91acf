"""Stage check_params: validate all of params.yaml before any other stage runs.

DVC deletes a stage's outputs before running it, so a typo found inside that stage would
cost its previous outputs. Every stage depends on this one's marker file, so a bad key stops
`dvc repro` here, before anything is deleted. The marker's content never changes, so a valid
edit re-runs only the stages that read the edited keys.
"""

from pathlib import Path

import typer

from fashionbench.cli import user_errors
from fashionbench.io import write_text
from fashionbench.params import PARAMS_FILE, load_params

MARKER = Path("data/params-checked")


def main(params: Path = PARAMS_FILE, marker: Path = MARKER) -> None:
    """Load and validate params.yaml; write the marker file the other stages depend on."""
    with user_errors():  # a full disk while writing is one line too
        load_params(params)
        write_text(marker, "params.yaml is valid\n")


if __name__ == "__main__":
    typer.run(main)
