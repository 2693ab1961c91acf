"""Evaluation: metrics on known predictions, flip TTA, the confusion CSV, Grad-CAM, bad inputs."""

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from fashionbench import evaluate as ev
from fashionbench.data import CLASS_NAMES, Prepared, Split, save_prepared
from fashionbench.models import build_model, save_trained
from fashionbench.models.resnet7 import ResidualBlock
from fashionbench.models.wrn import Block, WRNConfig
from fashionbench.params import CNNArch, MLPArch, ResNet7Arch, load_params
from stages.evaluate import main as evaluate_main
from tests.conftest import REPO, invoke


def run_stage(args):
    return invoke(evaluate_main, args)


@pytest.fixture
def repo(tmp_path, write_params, monkeypatch):
    """A repository root holding params.yaml and a tiny prepared test set (5 images a class)."""
    write_params()
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 5)
    split = Split(rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), labels)
    save_prepared(Prepared(split, None, split, 0.3, 0.35), tmp_path / "data/prepared")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def save_cnn(path, **meta):
    """A freshly initialised CNN saved by the registry, with `meta` overriding its record."""
    model = build_model("cnn", CNNArch(dropout=0.5))
    save_trained(path, model, "cnn", CNNArch(dropout=0.5), mean=0.3, std=0.35, seed=0, epochs=1)
    if meta:
        torch.save(torch.load(path, weights_only=True) | meta, path)


# ---------------------------------------------------------------- metrics


def test_metrics_on_known_predictions():
    labels = np.repeat(np.arange(10), 2)
    pred = labels.copy()
    pred[[0, 1]] = 1  # both T-shirts called Trouser
    probs = np.full((20, 10), 0.05, dtype=np.float32)
    probs[np.arange(20), pred] = 0.55
    m = ev.classification_metrics(labels, pred, probs)
    assert m["accuracy"] == pytest.approx(18 / 20)
    trouser = m["per_class"]["Trouser"]
    assert (trouser["precision"], trouser["recall"]) == (pytest.approx(0.5), 1.0)
    assert trouser["f1"] == pytest.approx(2 / 3)
    assert m["per_class"]["T-shirt/top"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert m["macro_f1"] == pytest.approx((8 + 2 / 3) / 10)
    expected_loss = -np.mean(np.log(np.where(pred == labels, 0.55, 0.05)))
    assert m["log_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert "log_loss" not in ev.classification_metrics(labels, pred)


def test_softmax_of_large_scores_is_finite():
    probs = ev.softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, [[1, 0], [0.5, 0.5]])


def test_tta_averages_image_and_flip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    device = torch.device("cpu")
    plain = ev.predict_proba(model, images, 0.3, 0.35, 2, False, device)
    flipped = ev.predict_proba(model, images[:, :, ::-1].copy(), 0.3, 0.35, 2, False, device)
    tta = ev.predict_proba(model, images, 0.3, 0.35, 2, True, device)
    assert tta.shape == (5, 10) and tta.dtype == np.float32
    np.testing.assert_allclose(tta, (plain + flipped) / 2, atol=1e-6)
    assert not np.allclose(plain, flipped)
    symmetric = np.concatenate([images[:, :, :14], images[:, :, :14][:, :, ::-1]], axis=2)
    np.testing.assert_allclose(ev.predict_proba(model, symmetric, 0.3, 0.35, 8, True, device),
                               ev.predict_proba(model, symmetric, 0.3, 0.35, 8, False, device),
                               atol=1e-6)


def test_confusion_csv_uses_class_names(tmp_path):
    path = tmp_path / "predictions.csv"
    ev.write_confusion_csv(np.array([0, 9]), np.array([6, 9]), path)
    rows = list(csv.reader(path.open()))
    assert rows == [["actual", "predicted"], ["T-shirt/top", "Shirt"], ["Ankle boot", "Ankle boot"]]


# ---------------------------------------------------------------- Grad-CAM


WRN_SE = WRNConfig(depth=16, widen=1, dropout=0.0, block="pre", se_reduction=4,
                  drop_path=0.0, drop_path_mode="sample")


@pytest.mark.parametrize("name, arch, layer_type", [
    ("cnn", CNNArch(dropout=0.5), nn.MaxPool2d),
    ("resnet7", ResNet7Arch(width=8), ResidualBlock),
    ("wrn", WRN_SE, nn.ReLU),
    ("wrn", dataclasses.replace(WRN_SE, block="post", se_reduction=0), Block),
])
def test_gradcam_on_the_last_conv_stage(name, arch, layer_type):
    torch.manual_seed(0)
    model = build_model(name, arch).eval()
    layer = ev.gradcam_layer(model)
    assert isinstance(layer, layer_type)
    cams = ev.gradcam(model, layer, torch.randn(3, 1, 28, 28), torch.tensor([0, 4, 9]))
    assert cams.shape == (3, 28, 28)
    assert cams.min() >= 0 and cams.max() == pytest.approx(1, abs=1e-5)
    assert not layer._forward_hooks  # the hook is removed


def test_no_gradcam_for_the_mlp():
    assert ev.gradcam_layer(build_model("mlp", MLPArch(hidden=(8,), dropout=0.0))) is None


def test_one_per_class_is_fixed_and_cycles_classes():
    labels = np.repeat(np.arange(10), 3)
    idx = ev.one_per_class(labels, 12)
    assert list(labels[idx]) == list(range(10)) + [0, 1]
    assert list(idx[:2]) == [0, 3] and idx[10] == 1


# ---------------------------------------------------------------- the stage


def test_deep_run_writes_every_output(repo):
    save_cnn(repo / "models/cnn/seed0/model.pt")
    result = run_stage(["cnn-seed0"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((repo / "metrics/eval/cnn-seed0.json").read_text())
    assert {"accuracy", "macro_f1", "log_loss", "images_per_s", "per_class"} <= set(metrics)
    assert set(metrics["per_class"]) == set(CLASS_NAMES)
    saved = np.load(repo / "predictions/cnn-seed0.npz")
    assert saved["probs"].shape == (50, 10) and saved["probs"].dtype == np.float32
    assert str(saved["kind"]) == ev.SOFTMAX
    plots = repo / "plots/eval/cnn-seed0"
    assert {p.name for p in plots.iterdir()} == {"predictions.csv", "mistakes.png", "gradcam.png"}
    assert len((plots / "predictions.csv").read_text().splitlines()) == 51


def test_svm_run_uses_decision_scores(repo):
    scores = np.random.default_rng(1).normal(size=(50, 10)).astype(np.float32)
    labels = np.repeat(np.arange(10), 5)
    path = repo / "models/svm/rbf/test_scores.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, scores=scores, pred=scores.argmax(1), labels=labels)
    result = run_stage(["svm-rbf"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((repo / "metrics/eval/svm-rbf.json").read_text())
    assert "log_loss" not in metrics
    assert metrics["accuracy"] == pytest.approx(np.mean(scores.argmax(1) == labels))
    saved = np.load(repo / "predictions/svm-rbf.npz")
    assert str(saved["kind"]) == ev.SVM_SOFTMAX
    assert not (repo / "plots/eval/svm-rbf/gradcam.png").exists()


@pytest.mark.parametrize("meta, fragment", [
    (None, "models/cnn/seed0/model.pt not found"),
    ({"input_shape": [3, 32, 32]}, "trained for input [3, 32, 32]"),
    ({"num_classes": 5}, "and 5 classes"),
    ({"arch": {"dropout": 0.5, "width": 3}}, "does not fit the current model code"),
])
def test_bad_weights_name_the_model_and_the_stage(repo, meta, fragment):
    if meta is not None:
        save_cnn(repo / "models/cnn/seed0/model.pt", **meta)
    result = run_stage(["cnn-seed0"])
    assert result.exit_code == 2
    assert fragment in result.output
    assert "cnn-seed0" in result.output and "dvc repro train_cnn" in result.output


def test_wrong_svm_scores_and_unknown_ids(repo):
    path = repo / "models/svm/hog/test_scores.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, scores=np.zeros((50, 5)), pred=np.zeros(50), labels=np.zeros(50))
    result = run_stage(["svm-hog"])
    assert result.exit_code == 2 and "dvc repro train_svm@hog" in result.output
    result = run_stage(["vgg-seed0"])
    assert result.exit_code == 2 and "valid ids" in result.output and "se_wrn-seed0" in result.output


def test_run_ids():
    params = load_params(REPO / "params.yaml")
    assert ev.parse_run_id("se_wrn-seed0", params) == ev.Run("se_wrn-seed0", "se_wrn", seed=0)
    assert ev.parse_run_id("svm-rbf", params) == ev.Run("svm-rbf", "svm", variant="rbf")
