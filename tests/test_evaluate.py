"""Evaluation: metrics on known predictions, flip TTA only for flip-trained models, the
batch-statistics check, Grad-CAM, the stage's outputs and its errors on bad inputs."""

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from fashionbench import corrupt
from fashionbench import evaluate as ev
from fashionbench.data import Split, save_prepared
from fashionbench.dataset import FASHION_MNIST
from fashionbench import augment
from fashionbench.models import build_model, load_trained, save_trained
from fashionbench.models.cnn import CNNArch
from fashionbench.models.mlp import MLPArch
from fashionbench.models.resnet7 import ResidualBlock, ResNet7Arch
from fashionbench.models.wrn import Block, WRNConfig
from fashionbench.params import load_params
from fashionbench.scores import class_accuracy, classification_metrics
from stages.evaluate import main as evaluate_main
from tests.conftest import REPO, invoke, with_train_stats

CPU = torch.device("cpu")
LABELS = np.repeat(np.arange(10), 5)


def run_stage(args):
    return invoke(evaluate_main, args)


@pytest.fixture
def repo(tmp_path, write_params, monkeypatch):
    """A repository root holding params.yaml (evaluation on the CPU) and a tiny prepared test
    set (5 images a class)."""
    write_params(lambda p: p["evaluate"].update(device="cpu"))
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), LABELS.copy())
    save_prepared(with_train_stats(split, None, split), tmp_path / "data/prepared")
    # a tiny corrupted test set: 20 of the images, two corruptions at two severities
    corrupt.save(corrupt.build(split.images, split.labels, 20, 0, ("gaussian_noise", "rotate"), (1, 5)),
                 tmp_path / "data/corrupted")
    monkeypatch.chdir(tmp_path)
    return tmp_path


ARCHS = {"cnn": CNNArch(dropout=0.5), "mlp": MLPArch(hidden=(16,), dropout=0.0),
         "resnet7": ResNet7Arch(width=8)}


def save_train_record(root, run_id, **record):
    """metrics/train/<id>.json and one DVCLive curve, as the train stages write them."""
    path = root / "metrics/train" / f"{run_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run": run_id, "epochs": 1, "wall_time_s": 12.5, "quick": False} | record))
    curve = root / "plots/train" / run_id / "plots/metrics/train/loss.tsv"
    curve.parent.mkdir(parents=True, exist_ok=True)
    curve.write_text("timestamp\tstep\tloss\n1\t0\t2.5\n2\t1\t1.5\n")


def save_model(path, name="cnn", hflip=0.0, **meta):
    """A freshly initialised registered model saved as the train stage saves it, trained with
    flip probability `hflip`; `meta` overrides its record. Its training record beside it."""
    torch.manual_seed(0)
    model = build_model(name, ARCHS[name])
    save_trained(path, model, name, ARCHS[name], mean=0.3, std=0.35, seed=0, epochs=1, hflip=hflip)
    if meta:
        torch.save(torch.load(path, weights_only=True) | meta, path)
    root = path.parents[3]  # <root>/models/<row>/seed<N>/model.pt
    save_train_record(root, f"{path.parts[-3]}-{path.parts[-2]}")


def save_svm_model(path):
    """A fitted SVM pipeline (raw pixels, on the prepared test images) saved as train_svm
    saves it: evaluate scores the corrupted test set with it."""
    import joblib
    from sklearn.pipeline import Pipeline
    from sklearn.svm import SVC

    from fashionbench.classical import FeatureMap

    model = Pipeline([("features", FeatureMap("raw")), ("scale", "passthrough"),
                      ("clf", SVC(gamma=0.01, break_ties=True))])
    path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(model.fit(prepared_test_images(), LABELS), path)


def prepared_test_images():
    return np.load("data/prepared/arrays.npz")["test_x"]


def accuracy_of(probs):
    return float(np.mean(probs.argmax(axis=1) == LABELS))


# ---------------------------------------------------------------- metrics


def test_metrics_on_known_predictions():
    labels = np.repeat(np.arange(10), 2)
    pred = labels.copy()
    pred[[0, 1]] = 1  # both T-shirts called Trouser
    probs = np.full((20, 10), 0.05, dtype=np.float32)
    probs[np.arange(20), pred] = 0.55
    m = classification_metrics(labels, pred, 10, probs)
    assert set(m) == {"accuracy", "macro_f1", "log_loss"}  # per-class scores live in the report
    assert m["accuracy"] == pytest.approx(18 / 20)
    # Trouser: precision 0.5, recall 1, F1 2/3; T-shirt: 0; eight perfect classes
    assert m["macro_f1"] == pytest.approx((8 + 2 / 3) / 10)
    expected_loss = -np.mean(np.log(np.where(pred == labels, 0.55, 0.05)))
    assert m["log_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert "log_loss" not in classification_metrics(labels, pred, 10)


def test_class_accuracy_is_each_class_recall():
    labels = np.repeat(np.arange(10), 2)
    pred = labels.copy()
    pred[[0, 3]] = 5  # one T-shirt and one Trouser missed
    recall = class_accuracy(labels, pred, FASHION_MNIST.classes)
    assert list(recall) == list(FASHION_MNIST.classes)
    assert recall["T-shirt/top"] == recall["Trouser"] == 0.5 and recall["Sandal"] == 1.0


def test_log_loss_of_a_certain_miss_is_finite():
    probs = np.array([[1.0, 0.0] + [0.0] * 8], dtype=np.float32)
    m = classification_metrics(np.array([1]), np.array([0]), 10, probs)
    assert np.isfinite(m["log_loss"]) and m["log_loss"] == pytest.approx(-np.log(1e-7), rel=1e-4)


def test_softmax_of_large_scores_is_finite():
    probs = ev.softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, [[1, 0], [0.5, 0.5]])


def test_tta_averages_image_and_flip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    both = ("plain", "hflip")
    plain = ev.predict_proba(model, images, 0.3, 0.35, 2, CPU)
    flipped = ev.predict_proba(model, images[:, :, ::-1].copy(), 0.3, 0.35, 2, CPU)
    tta = ev.predict_proba(model, images, 0.3, 0.35, 2, CPU, views=both)
    assert tta.shape == (5, 10) and tta.dtype == np.float32
    np.testing.assert_allclose(tta, (plain + flipped) / 2, atol=1e-6)
    assert not np.allclose(plain, flipped)
    symmetric = np.concatenate([images[:, :, :14], images[:, :, :14][:, :, ::-1]], axis=2)
    np.testing.assert_allclose(ev.predict_proba(model, symmetric, 0.3, 0.35, 8, CPU, views=both),
                               ev.predict_proba(model, symmetric, 0.3, 0.35, 8, CPU), atol=1e-6)


def test_batch_statistics_use_each_batch_and_keep_the_running_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    bn = model[1]
    bn.running_mean.fill_(3.0)  # stale running statistics
    bn.running_var.fill_(9.0)
    images = np.random.default_rng(1).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    running = ev.predict_proba(model, images, 0.3, 0.35, 3, CPU)
    batch = ev.predict_proba(model, images, 0.3, 0.35, 3, CPU, batch_stats=True)
    assert not np.allclose(running, batch, atol=1e-3)
    # each batch of 3 normalised by its own statistics, as train mode does
    expected = []
    fresh = nn.BatchNorm2d(4, track_running_stats=False)
    fresh.load_state_dict({k: v for k, v in bn.state_dict().items() if k in ("weight", "bias")})
    with torch.no_grad():
        x = ev._inputs(images, 0.3, 0.35, CPU)
        for start in (0, 3):
            out = model[3](model[2](fresh(model[0](x[start:start + 3]))))
            expected.append(out.softmax(dim=1).numpy())
    np.testing.assert_allclose(batch, np.concatenate(expected), atol=1e-5)
    # the running statistics and eval mode survive the diagnostic
    assert not model.training and not bn.training
    assert torch.all(bn.running_mean == 3.0) and torch.all(bn.running_var == 9.0)
    np.testing.assert_allclose(ev.predict_proba(model, images, 0.3, 0.35, 3, CPU), running)


def test_confusion_csv_uses_class_names(tmp_path):
    path = tmp_path / "confusion.csv"
    ev.write_confusion_csv(np.array([0, 9]), np.array([6, 9]), path, FASHION_MNIST.classes)
    rows = list(csv.reader(path.open()))
    assert rows == [["actual", "predicted"], ["T-shirt/top", "Shirt"], ["Ankle boot", "Ankle boot"]]


# ---------------------------------------------------------------- Grad-CAM


WRN_SE = WRNConfig(depth=16, widen=1, dropout=0.0, block="pre", se_reduction=4,
                   drop_path=0.0, drop_path_mode="sample", activation="relu")


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


def test_first_layer_weights_of_conv_and_dense_models():
    torch.manual_seed(0)
    mlp = build_model("mlp", MLPArch(hidden=(16,), dropout=0.0))
    maps, title = ev.first_layer_weights(mlp, (1, 28, 28))
    first = next(m for m in mlp.modules() if isinstance(m, nn.Linear))
    assert maps.shape == (16, 28, 28) and "16 units" in title
    np.testing.assert_array_equal(maps[3].reshape(-1), first.weight[3].detach().numpy())
    cnn = build_model("cnn", CNNArch(dropout=0.5))
    maps, title = ev.first_layer_weights(cnn, (1, 28, 28))
    conv = next(m for m in cnn.modules() if isinstance(m, nn.Conv2d))
    assert maps.shape == (conv.out_channels, *conv.kernel_size) and "filters" in title


def test_no_gradcam_for_the_mlp():
    assert ev.gradcam_layer(build_model("mlp", MLPArch(hidden=(8,), dropout=0.0))) is None


def test_one_per_class_is_fixed_and_cycles_classes():
    labels = np.repeat(np.arange(10), 3)
    idx = ev.one_per_class(labels, 12, 10)
    assert list(labels[idx]) == list(range(10)) + [0, 1]
    assert list(idx[:2]) == [0, 3] and idx[10] == 1


# ---------------------------------------------------------------- the stage


def test_deep_run_writes_every_output(repo):
    save_model(repo / "models/cnn/seed0/model.pt", "cnn", hflip=0.5)
    result = run_stage(["cnn-seed0"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((repo / "metrics/eval/cnn-seed0.json").read_text())
    # numbers a reader compares, nothing else (the CNN has no batch norm: no batchstat_accuracy)
    assert set(metrics) == {"accuracy", "macro_f1", "log_loss", "tta_accuracy", "calibration", "robustness"}
    saved = np.load(repo / "predictions/cnn-seed0.npz")
    assert saved["probs"].shape == (50, 10) and saved["probs"].dtype == np.float16  # compact, in git
    np.testing.assert_array_equal(saved["labels"], LABELS)
    assert str(saved["kind"]) == ev.SOFTMAX
    assert metrics["accuracy"] == pytest.approx(accuracy_of(saved["probs"]))
    confusion = list(csv.reader((repo / "plots/confusion/cnn-seed0.csv").open()))
    assert confusion[0] == ["actual", "predicted"] and len(confusion) == 51
    assert [row[1] for row in confusion[1:]] == [FASHION_MNIST.classes[p] for p in saved["probs"].argmax(1)]
    plots = repo / "plots/eval/cnn-seed0"
    names = {"mistakes.png", "gradcam.png", "first_layer.png"}
    assert {p.name for p in plots.iterdir()} == names
    assert all((plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in names)
    assert "cnn-seed0: test accuracy" in result.output
    record = json.loads((repo / "reports/runs/cnn-seed0.json").read_text())  # the training facts, in git
    assert record["wall_time_s"] == 12.5 and record["curves"] == {"train/loss": [[0.0, 2.5], [1.0, 1.5]]}


def test_the_same_evaluation_gives_the_same_bytes(repo):
    """Predictions and run records are git's record: an unchanged run re-evaluated changes no file."""
    save_model(repo / "models/cnn/seed0/model.pt", "cnn", hflip=0.5)
    files = ("predictions/cnn-seed0.npz", "reports/runs/cnn-seed0.json", "metrics/eval/cnn-seed0.json",
             "plots/confusion/cnn-seed0.csv")
    assert run_stage(["cnn-seed0"]).exit_code == 0
    first = {name: (repo / name).read_bytes() for name in files}
    assert run_stage(["cnn-seed0"]).exit_code == 0
    assert {name: (repo / name).read_bytes() for name in files} == first


def test_a_missing_training_record_names_the_file_and_the_stage(repo):
    save_model(repo / "models/cnn/seed0/model.pt", "cnn")
    (repo / "metrics/train/cnn-seed0.json").unlink()
    result = run_stage(["cnn-seed0"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "metrics/train/cnn-seed0.json" in result.output and "dvc repro train_cnn@0" in result.output


def test_a_model_trained_at_32_px_is_evaluated_on_the_centre_of_the_enlarged_images(repo):
    torch.manual_seed(0)
    model = build_model("resnet7", ARCHS["resnet7"])
    save_trained(repo / "models/resnet7/seed0/model.pt", model, "resnet7", ARCHS["resnet7"], mean=0.3,
                 std=0.35, seed=0, epochs=1, hflip=0.0, input_size=32)
    save_train_record(repo, "resnet7-seed0")
    result = run_stage(["resnet7-seed0"])
    assert result.exit_code == 0, result.output
    images = torch.as_tensor(prepared_test_images()).unsqueeze(1)
    with torch.no_grad():
        expected = torch.softmax(model.eval()((augment.input_view(images, 32).float() / 255 - 0.3) / 0.35), 1)
    saved = np.load(repo / "predictions/resnet7-seed0.npz")["probs"]
    np.testing.assert_allclose(saved, expected.numpy(), atol=1e-3)  # stored as float16


def band_images() -> Split:
    """Class k: a bright two-column band at columns 2k, 2k+1 (mirrored, classes 4-9 swap
    with 9-4: class k's flipped band sits where class 13-k's is; classes 0-3 land on none)."""
    images = np.zeros((50, 28, 28), np.uint8)
    for i, label in enumerate(LABELS):
        images[i, :, 2 * label:2 * label + 2] = 255
    return Split(images, LABELS.copy())


def save_band_reader(path, hflip):
    """An MLP whose hidden unit k sums band k's pixels: right on plain images, fooled by flips."""
    arch = MLPArch(hidden=(10,), dropout=0.0)
    model = build_model("mlp", arch)
    first, second = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        weight = torch.zeros(10, 28, 28)
        for k in range(10):
            weight[k, :, 2 * k:2 * k + 2] = 1.0
        first.weight.copy_(weight.reshape(10, 784))
        first.bias.zero_()
        second.weight.copy_(torch.eye(10))
        second.bias.zero_()
    save_trained(path, model, "mlp", arch, mean=0.3, std=0.35, seed=0, epochs=1, hflip=hflip)


def test_plain_accuracy_is_the_headline_and_tta_is_separate(repo):
    bands = band_images()
    save_prepared(with_train_stats(bands, None, bands), repo / "data/prepared")
    save_band_reader(repo / "models/mlp/seed0/model.pt", hflip=0.5)
    save_train_record(repo, "mlp-seed0")
    metrics = ev.evaluate_run("mlp-seed0", load_params("params.yaml"))
    # plain: every image right; TTA: classes 7-9 tie with their mirror 6-4 and lose the tie
    assert metrics["accuracy"] == 1.0 and metrics["macro_f1"] == 1.0
    assert metrics["tta_accuracy"] == pytest.approx(0.7)
    saved = np.load(repo / "predictions/mlp-seed0.npz")["probs"]
    assert accuracy_of(saved) == 1.0  # the predictions file holds the plain view too
    table = list(csv.reader((repo / "plots/confusion/mlp-seed0.csv").open()))[1:]
    assert all(actual == predicted for actual, predicted in table)


@pytest.mark.parametrize("hflip, tta_on, has_tta", [
    (0.0, True, False),   # never shown a flip: no TTA number
    (0.5, True, True),
    (1.0, True, True),
    (0.5, False, False),  # evaluate.tta off
])
def test_tta_only_for_models_trained_with_flips(repo, write_params, hflip, tta_on, has_tta):
    write_params(lambda p: p["evaluate"].update(device="cpu", tta=tta_on))
    save_model(repo / "models/cnn/seed0/model.pt", "cnn", hflip=hflip)
    result = run_stage(["cnn-seed0"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((repo / "metrics/eval/cnn-seed0.json").read_text())
    if has_tta:
        assert isinstance(metrics["tta_accuracy"], float) and 0 <= metrics["tta_accuracy"] <= 1
    else:
        assert "tta_accuracy" not in metrics


def test_a_model_file_without_a_flip_record_gets_no_tta(repo):
    path = repo / "models/cnn/seed0/model.pt"
    save_model(path, "cnn", hflip=0.5)
    saved = torch.load(path, weights_only=True)
    del saved["hflip"]
    torch.save(saved, path)
    assert ev.evaluate_run("cnn-seed0", load_params("params.yaml")).get("tta_accuracy") is None


def test_batchstat_accuracy_for_batch_norm_models_only(repo):
    save_model(repo / "models/resnet7/seed0/model.pt", "resnet7")
    save_model(repo / "models/mlp/seed0/model.pt", "mlp")
    params = load_params("params.yaml")
    resnet = ev.evaluate_run("resnet7-seed0", params)
    model, _ = load_trained(repo / "models/resnet7/seed0/model.pt")
    batch = ev.predict_proba(model, prepared_test_images(), 0.3, 0.35, params.evaluate.batch_size, CPU,
                             batch_stats=True)
    assert resnet["batchstat_accuracy"] == pytest.approx(accuracy_of(batch))
    assert json.loads((repo / "metrics/eval/resnet7-seed0.json").read_text())["batchstat_accuracy"] \
        == resnet["batchstat_accuracy"]
    mlp = ev.evaluate_run("mlp-seed0", params)
    assert "batchstat_accuracy" not in mlp and "batchstat_accuracy" not in json.loads(
        (repo / "metrics/eval/mlp-seed0.json").read_text())
    # no Grad-CAM without convolutions; the first layer's weights as 28x28 maps
    assert {p.name for p in (repo / "plots/eval/mlp-seed0").iterdir()} == {"mistakes.png", "first_layer.png"}
    assert (repo / "plots/confusion/mlp-seed0.csv").is_file()


def test_svm_run_uses_decision_scores(repo):
    scores = np.random.default_rng(1).normal(size=(50, 10)).astype(np.float32)
    path = repo / "models/svm/rbf/test_scores.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, scores=scores, pred=scores.argmax(1), labels=LABELS)
    save_svm_model(path.parent / "model.joblib")
    save_train_record(repo, "svm-rbf", fit_time_s=3.0)
    result = run_stage(["svm-rbf"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((repo / "metrics/eval/svm-rbf.json").read_text())
    assert "log_loss" not in metrics and "tta_accuracy" not in metrics
    assert metrics["accuracy"] == pytest.approx(np.mean(scores.argmax(1) == LABELS))
    saved = np.load(repo / "predictions/svm-rbf.npz")
    assert str(saved["kind"]) == ev.SVM_SOFTMAX
    np.testing.assert_allclose(saved["probs"], ev.softmax(scores), rtol=1e-3)  # float16
    assert (repo / "plots/confusion/svm-rbf.csv").is_file()
    assert {p.name for p in (repo / "plots/eval/svm-rbf").iterdir()} == {"mistakes.png"}


# ---------------------------------------------------------------- bad inputs


def assert_one_error_line(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.98], ids=["empty", "half", "tail-missing"])
def test_truncated_model_file_is_one_line_naming_it(repo, keep):
    path = repo / "models/cnn/seed0/model.pt"
    save_model(path, "cnn", hflip=0.5)
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))
    result = run_stage(["cnn-seed0"])
    assert_one_error_line(result, "cnn-seed0", "models/cnn/seed0/model.pt", "dvc repro train_cnn")
    assert not (repo / "metrics/eval").exists() and not (repo / "predictions").exists()


@pytest.mark.parametrize("meta, fragment", [
    (None, "models/cnn/seed0/model.pt not found"),
    ({"input_shape": [3, 32, 32]}, "trained for input [3, 32, 32]"),
    ({"num_classes": 5}, "and 5 classes"),
    ({"arch": {"dropout": 0.5, "width": 3}}, "does not fit the current model code"),
])
def test_bad_weights_name_the_model_and_the_stage(repo, meta, fragment):
    if meta is not None:
        save_model(repo / "models/cnn/seed0/model.pt", "cnn", **meta)
    result = run_stage(["cnn-seed0"])
    assert result.exit_code == 2
    assert fragment in result.output
    assert "cnn-seed0" in result.output and "dvc repro train_cnn" in result.output


def test_truncated_svm_scores_name_the_file(repo):
    path = repo / "models/svm/rbf/test_scores.npz"
    path.parent.mkdir(parents=True)
    scores = np.zeros((50, 10), np.float32)
    np.savez(path, scores=scores, pred=scores.argmax(1), labels=LABELS)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ev.EvaluateError) as caught:
        ev.evaluate_run("svm-rbf", load_params("params.yaml"))
    message = str(caught.value)
    assert "models/svm/rbf/test_scores.npz" in message and "unreadable" in message
    assert "dvc repro train_svm@rbf" in message
    assert_one_error_line(run_stage(["svm-rbf"]), "models/svm/rbf/test_scores.npz")
    assert not (repo / "metrics/eval/svm-rbf.json").exists()


@pytest.mark.parametrize("saved, fragment", [
    ({"scores": np.zeros((50, 5)), "labels": LABELS}, "shape (50, 5)"),
    ({"scores": np.zeros((40, 10)), "labels": LABELS[:40]}, "expected (50, 10)"),
    ({"scores": np.zeros((50, 10)), "labels": LABELS[::-1].copy()}, "another test set"),
    ({"labels": LABELS}, "unreadable"),
])
def test_svm_scores_that_do_not_fit_the_test_set(repo, saved, fragment):
    path = repo / "models/svm/hog/test_scores.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, **saved)
    result = run_stage(["svm-hog"])
    assert_one_error_line(result, "svm-hog", fragment, "dvc repro train_svm@hog")


def test_missing_svm_scores_name_the_stage(repo):
    assert_one_error_line(run_stage(["svm-fast"]), "models/svm/fast/test_scores.npz",
                          "are missing", "dvc repro train_svm@fast")


@pytest.mark.parametrize("run_id", ["vgg-seed0", "cnn-seed7", "cnn", "svm-nope", "svm-", "cnn-seedx"])
def test_unknown_run_ids_list_the_valid_ones(repo, run_id):
    params = load_params("params.yaml")
    with pytest.raises(ev.EvaluateError) as caught:
        ev.parse_run_id(run_id, params)
    message = str(caught.value)
    assert repr(run_id) in message and "valid ids" in message
    valid = message.split("valid ids (from params.yaml): ")[1].split(", ")
    assert valid == [f"svm-{name}" for name in params.svm] + \
        [f"{row}-seed{s}" for row in params.recipes for s in params.seeds[row]]
    assert_one_error_line(run_stage([run_id]), "valid ids", "se_wrn-seed0", "svm-hog_seed")


def test_run_ids():
    params = load_params(REPO / "params.yaml")
    assert ev.parse_run_id("se_wrn-seed0", params) == ev.Run("se_wrn-seed0", "se_wrn", seed=0)
    assert ev.parse_run_id("svm-rbf", params) == ev.Run("svm-rbf", "svm", variant="rbf")
    assert ev.Run("wrn-seed2", "wrn", seed=2).artifact.as_posix() == "models/wrn/seed2/model.pt"
    assert ev.Run("svm-hog", "svm", variant="hog").artifact.as_posix() == "models/svm/hog/test_scores.npz"
