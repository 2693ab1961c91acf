"""The model registry: shapes, pinned parameter counts, registering a model, saved-model round
trips and the errors that name the stage to re-run."""

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from fashionbench.models import (REGISTRY, TrainedModelError, build_model, count_parameters, describe,
                                 load_trained, save_trained)
from fashionbench.models.cnn import CNNArch
from fashionbench.models.mlp import MLPArch
from fashionbench.models.registry import UnknownModelError, register, spec
from fashionbench.models.resnet7 import ResNet7Arch
from fashionbench.models.resnet import ResNet9Arch, ResNetArch
from fashionbench.models.wrn import Block, SqueezeExcite, WRNConfig
from fashionbench.params import ParamsError, load_params, params_from_dict
from tests.conftest import REPO

REPO_RECIPES = load_params(REPO / "params.yaml").recipes  # every deep row of the repository


def test_every_registered_model_has_a_recipe_in_the_repository_params():
    spec("cnn")  # the first look-up imports every module of fashionbench.models
    assert {"cnn", "resnet7", "mlp", "wrn"} <= set(REGISTRY)
    assert set(REGISTRY) <= {recipe.model for recipe in REPO_RECIPES.values()}


@pytest.mark.parametrize("row", list(REPO_RECIPES))
def test_every_recipe_model_maps_a_batch_to_ten_finite_logits(row):
    recipe = REPO_RECIPES[row]
    assert recipe.model in REGISTRY
    assert isinstance(recipe.arch, REGISTRY[recipe.model].arch)
    torch.manual_seed(0)
    model = build_model(recipe.model, recipe.arch)
    x = torch.randn(2, 1, 28, 28)
    for training in (True, False):
        out = model.train(training)(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all(), (row, training)


@pytest.mark.parametrize("name, arch", [
    ("resnet7", ResNet7Arch(width=16)),
    ("mlp", MLPArch(hidden=(32, 16), dropout=0.1)),
    ("wrn", WRNConfig(10, 1, 0.3, "post", 4, 0.2, "sample", "relu")),
    ("wrn", WRNConfig(16, 1, 0.3, "pre", 4, 0.5, "batch", "relu")),
    ("wrn", WRNConfig(10, 1, 0.3, "pre", 4, 0.2, "sample", "mish")),
    ("resnet", ResNetArch(blocks=(1, 1, 1, 1), dropout=0.3)),
    ("resnet9", ResNet9Arch(hidden=16)),
])
def test_small_variants_map_a_batch_to_ten_finite_logits(name, arch):
    torch.manual_seed(0)
    model = build_model(name, arch)
    x = torch.randn(3, 1, 28, 28)
    for training in (True, False):
        out = model.train(training)(x)
        assert out.shape == (3, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name, arch, expected", [
    ("cnn", CNNArch(0.5), 824_458),
    ("cnn", CNNArch(0.3, (32, 64), 1, True, 256), 824_554),       # BN +192, conv biases -96
    ("cnn", CNNArch(0.3, (32, 64, 128), 2, True, 128), 435_754),
    ("resnet7", ResNet7Arch(64), 186_442),
    ("mlp", MLPArch((128,), 0.0), 101_770),
    ("wrn", WRNConfig(28, 2, 0.5, "post", 0, 0.0, "sample", "relu"), 1_467_770),
    ("wrn", WRNConfig(40, 4, 0.5, "post", 0, 0.0, "sample", "relu"), 8_949_818),
    ("wrn", WRNConfig(40, 4, 0.5, "pre", 16, 0.2, "batch", "relu"), 9_016_290),
    ("wrn", WRNConfig(40, 4, 0.5, "pre", 16, 0.2, "batch", "mish"), 9_016_290),  # Mish has no weights
    ("wrn", WRNConfig(64, 8, 0.5, "pre", 16, 0.2, "batch", "relu"), 60_974_570),  # the seed's ~61M
    ("resnet", ResNetArch((2, 2, 2, 2), 0.3), 11_172_810),   # the report's 11.2M
    ("resnet", ResNetArch((3, 4, 6, 3), 0.3), 21_280_970),   # the report says 21.8M
    ("resnet9", ResNet9Arch(128), 6_633_802),                # the lab's ~6.6M
])
def test_parameter_counts_are_pinned(name, arch, expected):
    with torch.device("meta"):  # counting needs shapes only: skip allocating and initialising
        assert count_parameters(build_model(name, arch)) == expected


@pytest.mark.parametrize("row, expected", [
    ("cnn", 824_458), ("speedrun_cpu", 163_728), ("resnet7", 186_442), ("mlp", 101_770), ("wrn", 8_949_818), ("se_wrn", 9_016_290),
    ("resnet9", 6_633_802), ("resnet18", 11_172_810), ("resnet34", 21_280_970),
    ("mlp512", 784 * 512 + 512 + 512 * 128 + 128 + 128 * 10 + 10), ("wrn28", 1_467_770),
])
def test_the_repository_rows_are_the_seed_models(row, expected):
    recipe = REPO_RECIPES[row]
    with torch.device("meta"):
        assert count_parameters(build_model(recipe.model, recipe.arch)) == expected


def test_build_model_accepts_a_dict_and_rejects_a_foreign_arch():
    model = build_model("mlp", {"hidden": [8], "dropout": 0.0})
    assert count_parameters(model) == 784 * 8 + 8 + 8 * 10 + 10
    with pytest.raises(TypeError, match="MLPArch"):
        build_model("mlp", CNNArch(0.5))
    with pytest.raises(UnknownModelError, match=r"unknown model 'vgg'.*registered: cnn"):
        build_model("vgg", {})


def test_the_activation_option_sets_every_activation_but_the_se_gates():
    model = build_model("wrn", WRNConfig(10, 1, 0.0, "pre", 4, 0.0, "sample", "mish"))
    gates = {id(m) for gate in model.modules() if isinstance(gate, SqueezeExcite) for m in gate.modules()}
    kinds = {type(m) for m in model.modules() if id(m) not in gates and isinstance(m, (nn.ReLU, nn.Mish))}
    assert kinds == {nn.Mish}


def test_sample_drop_path_is_random_in_training_only():
    model = build_model("wrn", WRNConfig(10, 1, 0.0, "pre", 0, 0.9, "sample", "relu"))
    x = torch.randn(4, 1, 28, 28)
    torch.manual_seed(0)
    assert not torch.equal(model.train()(x), model(x))
    assert torch.equal(model.eval()(x), model(x))


@pytest.mark.parametrize("block", ["pre", "post"])
@pytest.mark.parametrize("activation", ["relu", "mish"])
def test_batch_drop_path_skips_the_block_alike_compiled_and_eager(monkeypatch, block, activation):
    """Under torch.compile the block skip is a device-side select, not a host branch (which
    would break CUDA graphs): a dropped block still returns its input, a kept one its output."""
    from fashionbench.models import wrn

    cfg = WRNConfig(10, 1, 0.0, block, 4, 0.5, "batch", activation)
    x = torch.randn(8, 16, 7, 7)
    outputs = {}
    for compiling in (False, True):
        monkeypatch.setattr(wrn, "_compiling", lambda c=compiling: c)
        for rate in (1 - 1e-7, 1e-7):   # the coin all but surely drops, then keeps, the block
            torch.manual_seed(0)
            layer = Block(16, 16, 1, cfg, rate).train()
            outputs[compiling, rate] = layer(x)
    assert torch.equal(outputs[False, 1 - 1e-7], x) and torch.equal(outputs[True, 1 - 1e-7], x)
    assert torch.allclose(outputs[False, 1e-7], outputs[True, 1e-7])
    assert not torch.allclose(outputs[True, 1e-7], x)


@pytest.mark.parametrize("block", ["pre", "post"])
def test_a_training_wrn_compiles_to_one_graph(block):
    """A graph break (e.g. a host-side branch on a random draw) splits the compiled step and
    disables CUDA graphs: a WRN with block skip must trace whole."""
    model = build_model("wrn", WRNConfig(16, 1, 0.0, block, 4, 0.5, "batch", "relu")).train()
    explained = torch._dynamo.explain(model)(torch.randn(4, 1, 28, 28))
    assert explained.graph_break_count == 0, explained.break_reasons


# ---------------------------------------------------------------- registering a model


@dataclass(frozen=True)
class TinyArch:
    hidden: int


@pytest.fixture
def tiny_model():
    """A throwaway model registered as `test_tiny_linear`, removed from REGISTRY afterwards."""
    name = "test_tiny_linear"
    spec("cnn")  # load the package's own models first, as any real look-up would
    assert name not in REGISTRY

    @register(name, TinyArch, summary=lambda arch, shape, classes: f"tiny linear, hidden {arch.hidden}")
    class TinyLinear(nn.Module):
        def __init__(self, arch: TinyArch, input_shape=(1, 28, 28), num_classes: int = 10):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), arch.hidden),
                                     nn.ReLU(), nn.Linear(arch.hidden, num_classes))

        def forward(self, x):
            return self.net(x)

    try:
        yield name
    finally:
        REGISTRY.pop(name, None)


def test_a_registered_model_is_buildable_and_accepted_by_params(tiny_model, params_dict):
    model = build_model(tiny_model, TinyArch(hidden=5))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert count_parameters(model) == 784 * 5 + 5 + 5 * 10 + 10
    assert describe(tiny_model, TinyArch(5), (1, 28, 28), 10) == "tiny linear, hidden 5"

    params_dict["tiny"] = {"model": tiny_model, "arch": {"hidden": 7}, "epochs": 2}

    params_dict["seeds"]["tiny"] = [0]
    params = params_from_dict(params_dict)
    recipe = params.recipe("tiny")
    assert recipe.arch == TinyArch(hidden=7) and recipe.epochs == 2
    assert recipe.lr == params_dict["train_defaults"]["lr"]  # inherits train_defaults
    assert count_parameters(build_model(recipe.model, recipe.arch)) == 784 * 7 + 7 + 7 * 10 + 10

    params_dict["tiny"]["arch"] = {"hiden": 7}
    with pytest.raises(ParamsError, match=r"tiny\.arch\.hiden.*did you mean 'hidden'"):
        params_from_dict(params_dict)


def test_a_registered_model_is_gone_after_its_test(params_dict):
    assert "test_tiny_linear" not in REGISTRY
    params_dict["tiny"] = {"model": "test_tiny_linear", "arch": {"hidden": 7}}
    params_dict["seeds"]["tiny"] = [0]
    with pytest.raises(ParamsError, match="unknown model 'test_tiny_linear'") as caught:
        params_from_dict(params_dict)
    assert caught.value.key == "tiny.model"


def test_registering_a_second_model_under_a_taken_name_is_refused():
    spec("cnn")
    with pytest.raises(ValueError, match="registered twice"):
        register("cnn", CNNArch, summary=str)(type("OtherCNN", (nn.Module,), {}))
    assert REGISTRY["cnn"].arch is CNNArch


# ---------------------------------------------------------------- saved models


def save(path, model, name, arch, **changes):
    kwargs = {"mean": 0.3, "std": 0.4, "seed": 3, "epochs": 2, "hflip": 0.5} | changes
    save_trained(path, model, name, arch, **kwargs)


def test_load_trained_round_trips(tmp_path):
    arch = MLPArch((8,), 0.0)
    model = build_model("mlp", arch)
    path = tmp_path / "models" / "mlp" / "seed3" / "model.pt"
    save(path, model, "mlp", arch)
    loaded, meta = load_trained(path)
    assert not loaded.training and meta["model"] == "mlp"
    assert meta["arch"] == {"hidden": [8], "dropout": 0.0}
    assert (meta["seed"], meta["epochs"], meta["mean"], meta["std"], meta["hflip"]) == (3, 2, 0.3, 0.4, 0.5)
    assert "state_dict" not in meta
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(x), model.eval()(x))
    torch.load(path, weights_only=True)  # loadable without trusting pickled code


def test_load_trained_round_trips_a_wrn_with_batch_norm_statistics(tmp_path):
    arch = WRNConfig(10, 1, 0.3, "pre", 4, 0.2, "batch", "relu")
    model = build_model("wrn", arch)
    model.train()(torch.randn(8, 1, 28, 28))  # move the running statistics off their defaults
    path = tmp_path / "model.pt"
    save(path, model, "wrn", arch)
    loaded, meta = load_trained(path)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(x), model.eval()(x))
    assert meta["arch"]["block"] == "pre"


def test_a_wrn_saved_before_the_activation_option_loads_as_relu(tmp_path):
    arch = WRNConfig(10, 1, 0.0, "post", 0, 0.0, "sample", "relu")
    model = build_model("wrn", arch)
    path = tmp_path / "model.pt"
    save(path, model, "wrn", arch)
    saved = torch.load(path, weights_only=True)
    del saved["arch"]["activation"]
    torch.save(saved, path)
    loaded, _ = load_trained(path)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(x), model.eval()(x))


def test_load_trained_of_a_missing_file_names_the_stage_to_rerun(tmp_path):
    missing = tmp_path / "models" / "se_wrn" / "seed0" / "model.pt"
    with pytest.raises(TrainedModelError, match=r"model.pt not found.*dvc repro train_se_wrn"):
        load_trained(missing)


def test_a_truncated_model_file_is_named_with_the_stage_to_rerun(tmp_path):
    path = tmp_path / "models" / "cnn" / "seed0" / "model.pt"
    save(path, build_model("cnn", CNNArch(0.5)), "cnn", CNNArch(0.5))
    content = path.read_bytes()
    path.write_bytes(content[:len(content) // 2])
    with pytest.raises(TrainedModelError) as caught:
        load_trained(path)
    message = str(caught.value)
    assert str(path) in message and "not a readable model file" in message
    assert "dvc repro train_cnn" in message


def test_a_cnn_file_saved_before_the_shape_options_loads_as_the_seed_cnn(tmp_path):
    path = tmp_path / "models" / "cnn" / "seed0" / "model.pt"
    torch.manual_seed(0)
    model = build_model("cnn", CNNArch(0.5))
    save(path, model, "cnn", CNNArch(0.5))
    saved = torch.load(path, weights_only=True)
    torch.save(saved | {"arch": {"dropout": 0.5}}, path)  # the record before widths, convs, ...
    loaded = load_trained(path)[0]
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_a_model_for_other_inputs_names_the_stage_to_rerun(tmp_path):
    path = tmp_path / "models" / "cnn" / "seed0" / "model.pt"
    save(path, build_model("cnn", CNNArch(0.5)), "cnn", CNNArch(0.5))
    saved = torch.load(path, weights_only=True)
    torch.save(saved | {"input_shape": [3, 32, 32]}, path)
    with pytest.raises(TrainedModelError, match=r"\[3, 32, 32\].*dvc repro train_cnn"):
        load_trained(path)


def test_a_model_that_no_longer_fits_the_code_names_the_stage_to_rerun(tmp_path):
    path = tmp_path / "models" / "resnet7" / "seed1" / "model.pt"
    save(path, build_model("resnet7", ResNet7Arch(8)), "resnet7", ResNet7Arch(8))
    saved = torch.load(path, weights_only=True)
    torch.save(saved | {"arch": {"width": 16}}, path)  # weights of width 8, arch of width 16
    with pytest.raises(TrainedModelError, match=r"(?s)does not fit the current model code.*dvc repro train_resnet7"):
        load_trained(path)
    torch.save(saved | {"model": "vgg"}, path)
    with pytest.raises(TrainedModelError, match=r"(?s)does not fit.*dvc repro train_resnet7"):
        load_trained(path)


@pytest.mark.parametrize("key, value, problem", [
    ("depth", 41, "6n+4"), ("widen", 0, ">= 1"), ("dropout", 1.0, "[0, 1)"), ("activation", "gelu", "mish")])
def test_bad_shared_model_params_name_the_key(params_dict, key, value, problem):
    params_dict["model"][key] = value
    with pytest.raises(ParamsError) as caught:
        params_from_dict(params_dict)
    assert caught.value.key == f"model.{key}" and problem in str(caught.value)


def test_a_model_registered_alone_runs_through_train_evaluate_and_compare(tiny_model, tmp_path,
                                                                          params_dict, monkeypatch):
    """A new model needs its module (here: the fixture's @register), a params section and its
    DVC stages; nothing in the library names it. Train, evaluate and compare it."""
    import numpy as np
    import yaml

    from fashionbench.data import Split, save_prepared
    from fashionbench.evaluate import evaluate_run
    from fashionbench.params import load_plan
    from fashionbench.report import compare
    from fashionbench.train import train_and_save
    from tests.conftest import with_train_stats

    rng = np.random.default_rng(0)
    labels = np.arange(200) % 10
    images = rng.integers(0, 60, (200, 28, 28))
    for k in range(10):
        images[labels == k, 2 * k + 4:2 * k + 7] += 180  # a learnable band per class
    split = Split(images.astype(np.uint8), labels.astype(np.int64))
    save_prepared(with_train_stats(split, None, split), tmp_path / "data/prepared")
    params_dict["tiny"] = {"model": tiny_model, "arch": {"hidden": 16}, "epochs": 3, "lr": 0.01}
    params_dict["seeds"]["tiny"] = [0]
    params_dict["svm"] = {"rbf": params_dict["svm"]["rbf"]}
    params_dict["evaluate"]["device"] = "cpu"
    params_dict["train_defaults"]["device"] = "cpu"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_dict, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASHIONBENCH_CHECKPOINTS", str(tmp_path / "checkpoints"))
    params = load_params(tmp_path / "params.yaml")

    from fashionbench import corrupt
    from fashionbench.data import load_prepared
    test = load_prepared(tmp_path / "data/prepared").test
    corrupt.save(corrupt.build(test.images, test.labels, 20, 0, ("gaussian_noise",), (1,)),
                 tmp_path / "data/corrupted")  # what the corrupt stage writes
    metrics = train_and_save("tiny", params, load_prepared(tmp_path / "data/prepared"), 0,
                             tmp_path / "models/tiny/seed0", tmp_path / "metrics/train/tiny-seed0.json",
                             progress=False)
    assert metrics["architecture"] == "tiny linear, hidden 16" and metrics["epochs"] == 3
    result = evaluate_run("tiny-seed0", params, tmp_path)
    assert result["accuracy"] > 0.5 and "tta_accuracy" not in result  # trained without flips
    table = compare(load_plan(tmp_path / "params.yaml"), 0, tmp_path)
    assert table["tiny"]["accuracy"] == pytest.approx(result["accuracy"], abs=1e-4)
    assert table["tiny"]["parameters"] == 784 * 16 + 16 + 16 * 10 + 10
    assert table["cnn"].get("not_run") and table["svm-rbf"].get("not_run")
