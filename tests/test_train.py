"""The training engine and the train stage, on tiny synthetic data."""

import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

import fashionbench.train as train_module
from fashionbench.augment import normalise
from fashionbench.data import Split, save_prepared
from fashionbench.models import load_trained
from fashionbench.params import params_from_dict
from fashionbench.train import (DivergedError, Runtime, RunLockedError, checkpoint_root, evaluate, fit,
                                precise_bn, run_lock)
from stages.train import main as train_main
from tests.conftest import invoke, with_train_stats

CPU = Runtime(torch.device("cpu"))


@pytest.fixture(autouse=True)
def checkpoints(tmp_path, monkeypatch):
    """Every test's checkpoint root: a fresh folder, never ~/.cache."""
    root = tmp_path / "checkpoints"
    monkeypatch.setenv("FASHIONBENCH_CHECKPOINTS", str(root))
    return root


@pytest.fixture
def epochs_trained(monkeypatch):
    """A list that grows by one epoch number each time fit trains an epoch (not a replay)."""
    trained = []
    original = train_module.train_one_epoch

    def counting(*args, **kwargs):
        trained.append(kwargs.get("epoch"))
        return original(*args, **kwargs)
    monkeypatch.setattr(train_module, "train_one_epoch", counting)
    return trained


def synthetic(n: int, seed: int = 0) -> Split:
    """Learnable images: class k is noise plus a bright band at rows 2k+4..2k+6."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 60, (n, 28, 28))
    for k in range(10):
        images[labels == k, 2 * k + 4:2 * k + 7] += 180
    return Split(images.astype(np.uint8), labels.astype(np.int64))


def recipe_of(params_dict, row, **changes):
    """A tiny CPU recipe of deep row `row` from the repository's params.yaml."""
    params_dict["quick"] = False
    section = params_dict[row]
    section.update({"epochs": 2, "batch_size": 16, "device": "cpu", "checkpoint_every": 1} | changes)
    if row in ("wrn", "se_wrn"):
        params_dict["model"] |= {"depth": 10, "widen": 1}
    return params_from_dict(params_dict).recipe(row)


def run_fit(recipe, train, val=None, **kwargs):
    kwargs = {"mean": 0.3, "std": 0.3, "seed": 5, "progress": False} | kwargs
    return fit(recipe.model, recipe.arch, recipe, train, val, **kwargs)


class Interrupted(Exception):
    """Stands in for a kill after an epoch's checkpoint was written."""


def interrupt_after(epoch: int):
    def on_epoch(metrics):
        if metrics["epoch"] == epoch:
            raise Interrupted
    return on_epoch


def run_folder(checkpoint_dir):
    """The one run folder fit made under `checkpoint_dir`."""
    folders = [p for p in checkpoint_dir.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# ---------------------------------------------------------------- fit


def test_step_schedule_drops_the_lr_after_warmup_every_step_epochs(params_dict):
    recipe = recipe_of(params_dict, "mlp", epochs=7, schedule="step", warmup_epochs=1.0,
                       step_epochs=2.0, step_gamma=0.1, optimizer="sgd", momentum=0.0, lr=1.0)
    optimizer = train_module.make_optimizer(nn.Linear(2, 2), recipe, torch.device("cpu"))
    assert optimizer.defaults["nesterov"] is False  # momentum 0: plain SGD
    scheduler = train_module.make_scheduler(optimizer, recipe, steps_per_epoch=4)
    lrs = []
    for _ in range(7 * 4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    per_epoch = [lrs[4 * e + 3] for e in range(7)]  # the last step of each epoch
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # one epoch of linear warmup
    assert per_epoch == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_a_tiny_run_lowers_the_loss(params_dict):
    recipe = recipe_of(params_dict, "mlp", epochs=3, lr=0.01, schedule="constant", warmup_epochs=0.0)
    result = run_fit(recipe, synthetic(160), synthetic(40, 1), seed=0)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    first, last = result.history[0], result.history[-1]
    assert last["train_loss"] < first["train_loss"]
    assert last["val_acc"] > 0.5 and not result.model.training
    assert result.precise_bn == {}  # an MLP has no batch norm to recompute


@pytest.mark.parametrize("row, stop_after, changes", [
    ("cnn", 1, {"augment": {"crop_pad": 2, "translate": 0.1, "hflip": 0.5, "jitter": 0.2, "jitter_p": 0.5,
                            "erase_p": 0.5, "cutmix": 0.5}}),
    ("se_wrn", 1, {"ema": 0.9, "grad_clip": 1.0, "optimizer": "sgd", "schedule": "cosine",
                   "warmup_epochs": 1.0}),
    ("resnet7", 2, {"epochs": 3, "arch": {"width": 8}, "precise_bn": 24, "augment": {"mixup": 0.4}}),
    ("cnn", 1, {"epochs": 3, "batch_size": 8, "optimizer": "ranger", "momentum": 0.95}),
    ("wrn28", 1, {"epochs": 3, "batch_size": 8,
                  "arch": {"depth": 10, "widen": 1, "dropout": 0.3, "block": "post", "se_reduction": 0,
                           "drop_path": 0.0, "drop_path_mode": "sample", "activation": "mish"}}),
    # the third report's 32-px recipe: resized, random 32-px crops, AutoAugment, CutMix
    ("wrn28", 1, {"epochs": 2, "input_size": 32, "precise_bn": 16,
                  "augment": {"autoaugment": "cifar10", "hflip": 0.5, "erase_p": 0.5, "cutmix": 1.0},
                  "arch": {"depth": 10, "widen": 1, "dropout": 0.0, "block": "pre", "se_reduction": 0,
                           "drop_path": 0.0, "drop_path_mode": "sample", "activation": "relu"}}),
    # 4 steps per epoch, Lookahead syncs every 6: the checkpoint falls between two syncs
    ("wrn28", 1, {"epochs": 3, "batch_size": 8, "optimizer": "ranger", "momentum": 0.95,
                  "arch": {"depth": 10, "widen": 1, "dropout": 0.3, "block": "post", "se_reduction": 0,
                           "drop_path": 0.0, "drop_path_mode": "sample", "activation": "mish"}}),
])
def test_resume_after_an_interruption_gives_bit_identical_weights(params_dict, tmp_path, epochs_trained,
                                                                  row, stop_after, changes):
    recipe = recipe_of(params_dict, row, **changes)
    train = synthetic(32)
    whole = run_fit(recipe, train)
    assert epochs_trained == list(range(1, recipe.epochs + 1))

    checkpoints = tmp_path / "run"
    replayed = []
    with pytest.raises(Interrupted):
        run_fit(recipe, train, checkpoint_dir=checkpoints,
                on_epoch=lambda m: replayed.append(m) or interrupt_after(stop_after)(m))
    folder = run_folder(checkpoints)
    assert (folder / "checkpoint.pt").is_file()

    epochs_trained.clear()
    seen = []
    resumed = run_fit(recipe, train, checkpoint_dir=checkpoints, on_epoch=seen.append)
    assert epochs_trained == list(range(stop_after + 1, recipe.epochs + 1))  # only the missing ones
    assert [m["epoch"] for m in seen] == list(range(1, recipe.epochs + 1))  # checkpointed ones replayed first
    assert seen[:stop_after] == replayed  # with the interrupted run's metrics and timings
    same_weights(whole.model, resumed.model)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in whole.history]
    assert {k: v for k, v in resumed.precise_bn.items() if k != "precise_bn_time_s"} == \
        {k: v for k, v in whole.precise_bn.items() if k != "precise_bn_time_s"}
    assert not (folder / "checkpoint.pt").exists()


def test_a_finished_run_leaves_no_checkpoint_and_a_rerun_trains_from_epoch_0(params_dict, tmp_path,
                                                                             epochs_trained):
    recipe = recipe_of(params_dict, "cnn", epochs=2)
    checkpoints, train = tmp_path / "run", synthetic(32)
    first_metrics, second_metrics = [], []
    first = run_fit(recipe, train, checkpoint_dir=checkpoints, on_epoch=first_metrics.append)
    assert list(checkpoints.iterdir()) == []  # not even the run's folder is left

    epochs_trained.clear()
    second = run_fit(recipe, train, checkpoint_dir=checkpoints, on_epoch=second_metrics.append)
    assert epochs_trained == [1, 2]  # every epoch trained anew, none replayed
    assert [m["epoch"] for m in second_metrics] == [1, 2]
    assert [m["time_s"] for m in second_metrics] != [m["time_s"] for m in first_metrics]  # fresh timings
    same_weights(first.model, second.model)  # the same seed trains the same weights


def test_a_checkpoint_of_another_run_is_not_resumed(params_dict, tmp_path, epochs_trained):
    recipe = recipe_of(params_dict, "mlp", epochs=2, warmup_epochs=0.0)
    checkpoints, train = tmp_path / "run", synthetic(32)
    with pytest.raises(Interrupted):
        run_fit(recipe, train, checkpoint_dir=checkpoints, seed=0, on_epoch=interrupt_after(1))
    epochs_trained.clear()
    other = run_fit(recipe, train, checkpoint_dir=checkpoints, seed=1)  # another seed: another run
    assert epochs_trained == [1, 2] and [h["epoch"] for h in other.history] == [1, 2]
    assert len([p for p in checkpoints.iterdir() if p.is_dir()]) == 1  # the finished run's folder went


def test_an_unreadable_checkpoint_is_set_aside_and_training_completes(params_dict, tmp_path, caplog,
                                                                       epochs_trained):
    recipe = recipe_of(params_dict, "cnn", epochs=2)
    checkpoints, train = tmp_path / "run", synthetic(32)
    whole = run_fit(recipe, train)
    with pytest.raises(Interrupted):
        run_fit(recipe, train, checkpoint_dir=checkpoints, on_epoch=interrupt_after(1))
    checkpoint = run_folder(checkpoints) / "checkpoint.pt"
    content = checkpoint.read_bytes()
    checkpoint.write_bytes(content[:len(content) // 3])  # a truncated write

    epochs_trained.clear()
    with caplog.at_level(logging.WARNING, logger="fashionbench.train"):
        result = run_fit(recipe, train, checkpoint_dir=checkpoints)
    aside = checkpoint.with_name("checkpoint.pt.unreadable")
    assert aside.is_file() and aside.read_bytes() == content[:len(content) // 3]
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert str(checkpoint) in warning and str(aside) in warning and "epoch 0" in warning
    assert epochs_trained == [1, 2] and [h["epoch"] for h in result.history] == [1, 2]
    same_weights(whole.model, result.model)  # trained from scratch, exactly as an uninterrupted run
    assert not checkpoint.exists()


def test_a_second_trainer_of_the_same_run_is_refused(params_dict, tmp_path, epochs_trained):
    recipe = recipe_of(params_dict, "mlp", epochs=2, warmup_epochs=0.0)
    checkpoints, train = tmp_path / "run", synthetic(32)
    with pytest.raises(Interrupted):
        run_fit(recipe, train, checkpoint_dir=checkpoints, on_epoch=interrupt_after(1))
    folder = run_folder(checkpoints)

    epochs_trained.clear()
    with run_lock(folder):  # another trainer holds the run
        with pytest.raises(RunLockedError, match=r"another process is training this run.*lock"):
            run_fit(recipe, train, checkpoint_dir=checkpoints)
        assert epochs_trained == []  # refused before training anything
        assert (folder / "checkpoint.pt").is_file()  # and before touching the checkpoint
        run_fit(recipe, train, checkpoint_dir=checkpoints, seed=6)  # another run is not blocked
    epochs_trained.clear()
    resumed = run_fit(recipe, train, checkpoint_dir=checkpoints)  # once released, it resumes
    assert epochs_trained == [2] and len(resumed.history) == 2


def test_a_run_holds_its_lock_while_training(params_dict, tmp_path):
    recipe = recipe_of(params_dict, "mlp", epochs=2, warmup_epochs=0.0)
    checkpoints, train = tmp_path / "run", synthetic(32)
    refused = []

    def second_trainer(metrics):
        if metrics["epoch"] == 1:
            with pytest.raises(RunLockedError):
                with run_lock(run_folder(checkpoints)):
                    pass
            refused.append(True)
    run_fit(recipe, train, checkpoint_dir=checkpoints, on_epoch=second_trainer)
    assert refused == [True]


def test_fit_reports_precise_bn_on_the_training_images(params_dict):
    recipe = recipe_of(params_dict, "resnet7", epochs=1, arch={"width": 8}, precise_bn=20)
    result = run_fit(recipe, synthetic(48))
    bn = result.precise_bn
    assert bn["precise_bn_images"] == 20
    assert bn["precise_bn_layers"] == sum(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    assert 0 <= bn["precise_bn_train_acc_before"] <= 1 and 0 <= bn["precise_bn_train_acc_after"] <= 1
    off = run_fit(recipe_of(params_dict, "resnet7", epochs=1, arch={"width": 8}, precise_bn=0), synthetic(48))
    assert off.precise_bn == {}


def test_non_finite_loss_stops_with_advice(params_dict, tmp_path):
    recipe = recipe_of(params_dict, "mlp")
    with pytest.raises(DivergedError, match=r"epoch 1, step 1 of 2.*lower lr.*grad_clip.*fp32"):
        run_fit(recipe, synthetic(32), mean=float("nan"), checkpoint_dir=tmp_path / "run")
    with run_lock(run_folder(tmp_path / "run")):  # the failed run released its lock
        pass


# ---------------------------------------------------------------- precise batch norm


def conv_bn_model(dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Dropout(dropout), nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4),
                         nn.ReLU(), nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_precise_bn_gives_the_first_norm_the_exact_statistics_of_its_input(dropout):
    model = conv_bn_model(dropout).train()
    conv, bn, later = model[1], model[2], model[5]
    for norm in (bn, later):  # stale statistics
        norm.running_mean.fill_(7.0)
        norm.running_var.fill_(0.01)
    weights = {k: v.clone() for k, v in model.named_parameters()}
    images = torch.from_numpy(synthetic(50).images).unsqueeze(1)
    mean, std = 0.25, 0.35

    layers = precise_bn(model, images, mean=mean, std=std, batch_size=16, runtime=CPU)  # 16+16+16+2

    assert layers == 2
    with torch.no_grad():
        out = conv(normalise(images, mean, std)).double()
    expected_mean = out.mean(dim=(0, 2, 3))
    expected_var = out.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True)
    torch.testing.assert_close(bn.running_mean.double(), expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), expected_var, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(later.running_mean, torch.full((3,), 7.0))
    assert torch.isfinite(later.running_var).all() and (later.running_var > 0).all()
    assert model.training  # the mode it had
    for name, value in model.named_parameters():
        assert torch.equal(value, weights[name]), name  # statistics only, never weights


def test_precise_bn_without_batch_norm_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.from_numpy(synthetic(8).images).unsqueeze(1)
    assert precise_bn(model, images, mean=0.3, std=0.3, batch_size=4, runtime=CPU) == 0
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_precise_bn_repairs_eval_accuracy_of_stale_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4),
                          nn.Flatten(), nn.Linear(8 * 7 * 7, 10))
    data = synthetic(200)
    images, labels = torch.from_numpy(data.images).unsqueeze(1), torch.from_numpy(data.labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for step in range(40):
        idx = torch.randint(0, 200, (32,))
        loss = nn.functional.cross_entropy(model(normalise(images[idx], 0.3, 0.3)), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model[1].running_mean.fill_(3.0)  # statistics of weights that no longer exist
    model[1].running_var.fill_(0.05)
    kw = {"mean": 0.3, "std": 0.3, "batch_size": 64, "runtime": CPU}
    before = evaluate(model, images, labels, **kw)["acc"]
    precise_bn(model, images, **kw)
    after = evaluate(model, images, labels, **kw)["acc"]
    assert after >= before and after > 0.9, (before, after)


# ---------------------------------------------------------------- the stage


def stage_args(row="cnn", seed=3):
    return [row, "--seed", seed, "--params", "params.yaml", "--prepared", "prepared", "--models", "models",
            "--metrics", "metrics/train", "--plots", "plots/train", "--no-progress"]


@pytest.fixture
def workdir(tmp_path, write_params, monkeypatch):
    """A scratch directory with params.yaml and a tiny prepared dir; returns a setup function."""
    def setup(quick: bool = False, validation: bool = True):
        def tiny(raw):
            raw["quick"] = quick
            raw["preprocess"]["validation_size"] = 20 if validation else 0
            raw["cnn"] |= {"batch_size": 32, "device": "cpu", **({} if quick else {"epochs": 1})}
        write_params(tiny)
        val = synthetic(20, 1) if validation else None
        save_prepared(with_train_stats(synthetic(64), val, synthetic(20, 2)), tmp_path / "prepared")
        monkeypatch.chdir(tmp_path)
        return tmp_path
    return setup


def test_train_stage_writes_model_metrics_and_curves(workdir, checkpoints):
    root = workdir()
    result = invoke(train_main, stage_args())
    assert result.exit_code == 0, result.output
    metrics = json.loads((root / "metrics/train/cnn-seed3.json").read_text())
    assert metrics["run"] == "cnn-seed3" and metrics["model"] == "cnn" and metrics["seed"] == 3
    assert metrics["architecture"] == "2-conv CNN, dropout 0.5"
    assert metrics["recipe"].startswith("adamw onecycle LS 0.1 lr 0.002, batch 32; hflip 0.5; 1 epoch")
    assert metrics["quick"] is False and metrics["trained_with_flips"] is True
    assert metrics["parameters"] == 824_458 and metrics["epochs"] == 1
    assert metrics["train_size"] == 64 and metrics["val_size"] == 20
    assert {"wall_time_s", "train_images_per_s", "device", "hardware", "threads", "torch_version",
            "train_loss", "train_acc", "val_loss", "val_acc"} <= set(metrics)
    model, meta = load_trained(root / "models/cnn/seed3/model.pt")
    prepared_mean = with_train_stats(synthetic(64), None, synthetic(20, 2)).mean
    assert meta["epochs"] == 1 and meta["mean"] == prepared_mean and meta["seed"] == 3 and meta["hflip"] == 0.5
    for curve in ("train/loss", "train/acc", "val/loss", "val/acc", "lr"):
        lines = (root / f"plots/train/cnn-seed3/plots/metrics/{curve}.tsv").read_text().splitlines()
        assert len(lines) == 2, curve  # header and one epoch
    assert checkpoint_root() == checkpoints
    assert list(checkpoints.iterdir()) == []  # checkpoints live outside the workspace; a finished run leaves none
    assert not list(checkpoints.rglob("checkpoint.pt")) and not list(root.rglob("checkpoint.pt"))
    assert invoke(train_main, stage_args()).exit_code == 0  # a forced re-run trains again


def test_train_stage_without_validation_and_quick(workdir):
    root = workdir(quick=True, validation=False)
    result = invoke(train_main, stage_args(seed=0))
    assert result.exit_code == 0, result.output
    metrics = json.loads((root / "metrics/train/cnn-seed0.json").read_text())
    assert metrics["quick"] is True and metrics["epochs"] == 1  # params.yaml's 30, capped by the scale
    assert metrics["val_size"] == 0 and "val_acc" not in metrics and "val_loss" not in metrics
    assert load_trained(root / "models/cnn/seed0/model.pt")[1]["epochs"] == 1
    curves = root / "plots/train/cnn-seed0/plots/metrics"
    assert (curves / "train/acc.tsv").is_file() and not (curves / "val").exists()


def test_train_stage_records_precise_bn(workdir, write_params):
    root = workdir()
    write_params(lambda raw: raw["resnet7"].update(
        epochs=1, batch_size=32, device="cpu", arch={"width": 8}, precise_bn=48))
    result = invoke(train_main, stage_args(row="resnet7", seed=0))
    assert result.exit_code == 0, result.output
    metrics = json.loads((root / "metrics/train/resnet7-seed0.json").read_text())
    assert metrics["architecture"] == "ResNet-7, width 8"
    assert metrics["precise_bn_images"] == 48 and metrics["precise_bn_layers"] == 6
    assert {"precise_bn_train_acc_before", "precise_bn_train_acc_after"} <= set(metrics)
    assert load_trained(root / "models/resnet7/seed0/model.pt")[1]["model"] == "resnet7"


def test_train_stage_rejects_an_unknown_row(workdir):
    root = workdir()
    result = invoke(train_main, stage_args(row="vgg"))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "vgg" in lines[0] and "cnn, speedrun_cpu, resnet7, resnet9, resnet18, resnet34, mlp, mlp512, wrn, wrn28, se_wrn" in lines[0]
    assert not (root / "models").exists() and not (root / "metrics").exists()
