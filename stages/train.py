"""Stage train_<model>: train one deep model for one seed.

    python -m stages.train cnn --seed 0                          # row: a deep section of params.yaml
    torchrun --nproc_per_node 2 -m stages.train wrn --seed 0   # data-parallel, then `dvc commit`

Writes models/<row>/seed<N>/model.pt, metrics/train/<row>-seed<N>.json and DVCLive curves
under plots/train/<row>-seed<N>/. An interrupted run resumes from its checkpoint (kept
outside the workspace, see fashionbench.train.checkpoint_root).
"""

from pathlib import Path

import typer

from fashionbench import distributed
from fashionbench.cli import stop_with_dvc, user_errors
from fashionbench.data import load_prepared
from fashionbench.params import PARAMS_FILE, load_params
from fashionbench.train import train_and_save

# train_one_epoch/evaluate keys -> DVCLive metric names (plots/metrics/<name>.tsv)
CURVES = {"train_loss": "train/loss", "train_acc": "train/acc", "val_loss": "val/loss",
          "val_acc": "val/acc", "lr": "lr", "images_per_s": "images_per_s"}


def main(model: str = typer.Argument(..., help="a deep row of params.yaml: cnn, resnet7, mlp, wrn, ..."),
         seed: int = typer.Option(0, min=0, help="training seed (weights, data order, augmentation)"),
         params: Path = PARAMS_FILE, prepared: Path = Path("data/prepared"),
         models: Path = Path("models"), metrics: Path = Path("metrics/train"),
         plots: Path = Path("plots/train"), progress: bool = True) -> None:
    """Train <model> from params.yaml and write its weights, metrics and curves."""
    from dvclive import Live

    run_id = f"{model}-seed{seed}"
    stop_with_dvc()
    with user_errors():
        config = load_params(params)
        config.recipe(model)  # an unknown model fails before anything is written
        data = load_prepared(prepared, config.dataset)
        if not distributed.is_main():  # torchrun: rank 0 writes the outputs and curves
            train_and_save(model, config, data, seed, models / model / f"seed{seed}",
                           metrics / f"{run_id}.json", progress=False)
            return
        with Live(str(plots / run_id), dvcyaml=False, save_dvc_exp=False) as live:
            def log_epoch(epoch_metrics: dict) -> None:
                for key, name in CURVES.items():
                    if key in epoch_metrics:
                        live.log_metric(name, epoch_metrics[key], plot=True)
                live.next_step()

            summary = train_and_save(model, config, data, seed, models / model / f"seed{seed}",
                                     metrics / f"{run_id}.json", on_epoch=log_epoch, progress=progress)
    val = f", validation accuracy {summary['val_acc']:.4f}" if "val_acc" in summary else ""
    typer.echo(f"{run_id}: trained in {summary['wall_time_s']:.1f} s ({summary['train_images_per_s']:,.0f} "
               f"images/s); final-epoch training accuracy {summary['train_acc']:.4f}{val}")


if __name__ == "__main__":
    typer.run(main)
