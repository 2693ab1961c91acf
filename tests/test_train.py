"""The training engine and the train stage, on tiny synthetic data."""

import json

import numpy as np
import pytest
import torch

from fashionbench.data import Prepared, Split, save_prepared
from fashionbench.models import load_trained, model_arch
from fashionbench.params import params_from_dict
from fashionbench.train import DivergedError, fit
from stages.train import main as train_main
from tests.conftest import invoke


def synthetic(n: int, seed: int = 0) -> Split:
    """Learnable images: class k is noise plus a bright band at rows 2k..2k+3."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 60, (n, 28, 28))
    for k in range(10):
        images[labels == k, 2 * k + 4:2 * k + 7] += 180
    return Split(images.astype(np.uint8), labels.astype(np.int64))


def recipe_of(params_dict, run, **changes):
    """A tiny, CPU recipe of section `run` from the repository's params.yaml."""
    params_dict["quick"] = False
    section = params_dict[run]
    section.update({"epochs": 2, "batch_size": 16, "device": "cpu", "checkpoint_every": 1} | changes)
    if run in ("wrn", "se_wrn"):
        params_dict["model"] |= {"depth": 10, "widen": 1}
    params = params_from_dict(params_dict)
    return params.recipe(run), model_arch(params, run)


def test_a_tiny_run_lowers_the_loss(params_dict):
    recipe, arch = recipe_of(params_dict, "mlp", epochs=3, lr=0.01, schedule="constant", warmup_epochs=0.0)
    result = fit("mlp", arch, recipe, synthetic(160), synthetic(40, 1), mean=0.3, std=0.3,
                 seed=0, progress=False)
    first, last = result.history[0], result.history[-1]
    assert last["train_loss"] < first["train_loss"]
    assert last["val_acc"] > 0.5 and not result.model.training


@pytest.mark.parametrize("run, changes", [
    ("cnn", {"augment": {"crop_pad": 2, "translate": 0.1, "hflip": 0.5, "jitter": 0.2, "jitter_p": 0.5,
                         "erase_p": 0.5, "erase_scale": [0.1, 0.2], "cutout": 0, "mixup": 0.0, "cutmix": 0.5}}),
    ("se_wrn", {"ema": 0.9, "grad_clip": 1.0, "optimizer": "sgd", "schedule": "cosine", "warmup_epochs": 1.0}),
])
def test_resume_gives_bit_identical_weights(params_dict, tmp_path, run, changes):
    recipe, arch = recipe_of(params_dict, run, **changes)
    train, kwargs = synthetic(32), {"mean": 0.3, "std": 0.3, "seed": 5, "progress": False}
    whole = fit(recipe.model, arch, recipe, train, None, checkpoint=tmp_path / "whole.pt", **kwargs)

    def stop_after_first_epoch(metrics):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        fit(recipe.model, arch, recipe, train, None, checkpoint=tmp_path / "cut.pt",
            on_epoch=stop_after_first_epoch, **kwargs)
    seen = []
    resumed = fit(recipe.model, arch, recipe, train, None, checkpoint=tmp_path / "cut.pt",
                  on_epoch=lambda m: seen.append(m["epoch"]), **kwargs)
    assert seen == [1, 2]  # the checkpointed epoch is replayed to the logger, then epoch 2 runs
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_checkpoint_of_other_params_is_ignored(params_dict, tmp_path):
    recipe, arch = recipe_of(params_dict, "mlp", epochs=1, warmup_epochs=0.0)
    fit("mlp", arch, recipe, synthetic(32), None, mean=0.3, std=0.3, seed=0, progress=False,
        checkpoint=tmp_path / "c.pt")
    other = fit("mlp", arch, recipe, synthetic(32), None, mean=0.3, std=0.3, seed=1, progress=False,
                checkpoint=tmp_path / "c.pt")
    assert [h["epoch"] for h in other.history] == [1]


def test_non_finite_loss_stops_with_advice(params_dict):
    recipe, arch = recipe_of(params_dict, "mlp")
    with pytest.raises(DivergedError, match=r"epoch 1, step 1 of 2.*lower lr.*grad_clip.*fp32"):
        fit("mlp", arch, recipe, synthetic(32), None, mean=float("nan"), std=0.3, seed=0, progress=False)


# ---------------------------------------------------------------- the stage


def run_stage(args):
    return invoke(train_main, args)


@pytest.fixture
def workdir(tmp_path, write_params, monkeypatch):
    """params.yaml with a one-epoch CNN, and a tiny prepared dir, in a scratch directory."""
    def tiny(raw):
        raw["quick_run"]["cnn"] = {"epochs": 1, "batch_size": 32, "device": "cpu"}
    write_params(tiny)
    save_prepared(Prepared(synthetic(64), synthetic(20, 1), synthetic(20, 2), 0.3, 0.3), tmp_path / "prepared")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_train_stage_writes_model_metrics_and_curves(workdir):
    args = ["cnn", "--seed", 3, "--params", "params.yaml", "--prepared", "prepared", "--models", "models",
            "--metrics", "metrics/train", "--plots", "plots/train", "--no-progress"]
    result = run_stage(args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((workdir / "metrics/train/cnn-seed3.json").read_text())
    assert metrics["parameters"] == 824_458 and metrics["seed"] == 3 and metrics["quick"] is True
    assert {"wall_time_s", "train_images_per_s", "device", "torch_version", "val_acc"} <= set(metrics)
    model, meta = load_trained(workdir / "models/cnn/seed3/model.pt")
    assert meta["epochs"] == 1 and meta["mean"] == 0.3
    assert (workdir / "models/cnn/seed3/checkpoint.pt").is_file()
    curve = workdir / "plots/train/cnn-seed3/plots/metrics/val/acc.tsv"
    assert len(curve.read_text().splitlines()) == 2  # header and one epoch
    assert run_stage(args).exit_code == 0  # a finished checkpoint makes the re-run instant


def test_train_stage_rejects_an_unknown_model(workdir):
    result = run_stage(["vgg", "--params", "params.yaml", "--prepared", "prepared", "--no-progress"])
    assert result.exit_code == 2 and "error:" in result.output and "vgg" in result.output
