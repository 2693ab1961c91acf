"""Stage corrupt: the corrupted test set every evaluate stage also scores (data/corrupted/)."""

from pathlib import Path

import typer

from fashionbench import corrupt
from fashionbench.cli import user_errors
from fashionbench.data import load_raw
from fashionbench.params import PARAMS_FILE, load_params


def main(params: Path = PARAMS_FILE, raw: Path = Path("data/raw"),
         out: Path = corrupt.CORRUPTED_DIR, examples: Path = corrupt.EXAMPLES) -> None:
    """Write data/corrupted/ (corrupted.npz, manifest.json) and plots/corrupt/examples.png."""
    with user_errors():
        config = load_params(params)
        cfg = config.corrupt
        _, test = load_raw(raw, config.dataset)
        key = "quick_scale.corrupt_size" if config.quick else "corrupt.subset_size"
        corrupted = corrupt.build(test.images, test.labels, config.corrupt_size(), cfg.seed,
                                  cfg.corruptions, cfg.severities, key)
        manifest = corrupt.save(corrupted, out)
        corrupt.examples_figure(test.images[corrupted.indices[0]], corrupted, 0, examples)
    typer.echo(f"corrupt: {manifest['images']} test images x {len(cfg.corruptions)} corruptions x "
               f"{len(cfg.severities)} severities -> {out / corrupt.CORRUPTED_FILE} "
               f"(sha256 {manifest['sha256'][:12]})")


if __name__ == "__main__":
    typer.run(main)
