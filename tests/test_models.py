"""The model registry: shapes, pinned parameter counts, saved-model round trips, bad params."""

import pytest
import torch

from fashionbench.models import (TrainedModelError, build_model, count_parameters, load_trained,
                                 save_trained)
from fashionbench.models.wrn import WRNConfig
from fashionbench.params import CNNArch, MLPArch, ParamsError, ResNet7Arch, params_from_dict

MODELS = {
    "cnn": ("cnn", CNNArch(dropout=0.5)),
    "resnet7": ("resnet7", ResNet7Arch(width=16)),
    "mlp": ("mlp", MLPArch(hidden=(32, 16), dropout=0.1)),
    "wrn-post": ("wrn", WRNConfig(10, 1, 0.3, "post", 0, 0.2, "sample")),
    "wrn-pre-se-batch": ("wrn", WRNConfig(16, 1, 0.3, "pre", 4, 0.5, "batch")),
}


@pytest.mark.parametrize("key", MODELS)
def test_every_model_maps_a_batch_to_ten_finite_logits(key):
    torch.manual_seed(0)
    model = build_model(*MODELS[key])
    x = torch.randn(2, 1, 28, 28)
    for training in (True, False):
        out = model.train(training)(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name, arch, expected", [
    ("cnn", CNNArch(0.5), 824_458),
    ("resnet7", ResNet7Arch(64), 186_442),
    ("mlp", MLPArch((128,), 0.0), 101_770),
    ("wrn", WRNConfig(28, 2, 0.5, "post", 0, 0.0, "sample"), 1_467_770),
    ("wrn", WRNConfig(40, 4, 0.5, "post", 0, 0.0, "sample"), 8_949_818),
    ("wrn", WRNConfig(40, 4, 0.5, "pre", 16, 0.2, "batch"), 9_016_290),
])
def test_parameter_counts_are_pinned(name, arch, expected):
    with torch.device("meta"):  # counting needs shapes only: skip allocating and initialising
        assert count_parameters(build_model(name, arch)) == expected


def test_sample_drop_path_is_random_in_training_only():
    model = build_model("wrn", WRNConfig(10, 1, 0.0, "pre", 0, 0.9, "sample"))
    x = torch.randn(4, 1, 28, 28)
    torch.manual_seed(0)
    assert not torch.equal(model.train()(x), model(x))
    assert torch.equal(model.eval()(x), model(x))


def test_load_trained_round_trips(tmp_path):
    model = build_model("mlp", MLPArch((8,), 0.0))
    path = tmp_path / "models" / "mlp" / "seed3" / "model.pt"
    save_trained(path, model, "mlp", MLPArch((8,), 0.0), mean=0.3, std=0.4, seed=3, epochs=2)
    loaded, meta = load_trained(path)
    assert not loaded.training and meta["seed"] == 3 and meta["arch"] == {"hidden": [8], "dropout": 0.0}
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(x), model.eval()(x))
    torch.load(path, weights_only=True)  # loadable without trusting pickled code


def test_load_trained_names_the_stage_to_rerun(tmp_path):
    missing = tmp_path / "models" / "se_wrn" / "seed0" / "model.pt"
    with pytest.raises(TrainedModelError, match=r"model.pt not found.*dvc repro train_se_wrn"):
        load_trained(missing)
    path = tmp_path / "models" / "cnn" / "seed0" / "model.pt"
    save_trained(path, build_model("cnn", CNNArch(0.5)), "cnn", CNNArch(0.5), mean=0, std=1, seed=0, epochs=1)
    saved = torch.load(path, weights_only=True)
    torch.save(saved | {"input_shape": [3, 32, 32]}, path)
    with pytest.raises(TrainedModelError, match=r"\[3, 32, 32\].*dvc repro train_cnn"):
        load_trained(path)


@pytest.mark.parametrize("key, value", [("depth", 41), ("widen", 0), ("dropout", 1.0)])
def test_bad_model_params_name_the_key(params_dict, key, value):
    params_dict["quick"] = False  # else quick_run.model would override the bad value
    params_dict["model"][key] = value
    with pytest.raises(ParamsError, match=rf"model\.{key}"):
        params_from_dict(params_dict)
