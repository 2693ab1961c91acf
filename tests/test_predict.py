"""predict on image files written from the test set: the same probabilities as evaluation,
whatever the file's size, colour mode and polarity; SVM rows too; clear errors on bad files."""

import json

import joblib
import numpy as np
import pytest
import torch
from PIL import Image

from fashionbench import classical
from fashionbench import predict as pr
from fashionbench.data import load_raw
from fashionbench.dataset import FASHION_MNIST
from fashionbench.evaluate import predict_proba, softmax
from fashionbench.models import build_model, save_trained
from fashionbench.models.cnn import CNNArch
from fashionbench.params import load_params
from tests.conftest import REPO, invoke

MEAN, STD = 0.286, 0.353


@pytest.fixture(scope="module")
def test_images(real_raw):
    """Twelve real test images (uint8 28x28) and their labels."""
    _, test = load_raw(real_raw)
    return test.images[:12].copy(), test.labels[:12].copy()


@pytest.fixture
def cnn_file(tmp_path):
    torch.manual_seed(0)
    model = build_model("cnn", CNNArch(dropout=0.5))
    path = tmp_path / "models/cnn/seed0/model.pt"
    save_trained(path, model, "cnn", CNNArch(dropout=0.5), mean=MEAN, std=STD, seed=0, epochs=1, hflip=0.5)
    return path, model


def write_pngs(folder, images, transform=lambda a: a, mode="L", suffix=".png"):
    folder.mkdir(exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{i}{suffix}"
        Image.fromarray(transform(image)).convert(mode).save(path)
        paths.append(path)
    return paths


def enlarge(image, factor=3):
    return np.kron(image, np.ones((factor, factor), dtype=np.uint8))


@pytest.mark.parametrize("transform, mode", [
    (lambda a: a, "L"),                        # the dataset's own form
    (lambda a: 255 - a, "L"),                  # dark on light
    (lambda a: 255 - enlarge(a), "RGB"),       # larger, colour, dark on light
    (enlarge, "RGBA"),                         # larger, with an alpha channel
])
def test_probabilities_equal_evaluation(tmp_path, cnn_file, test_images, transform, mode):
    path, model = cnn_file
    images, _ = test_images
    files = write_pngs(tmp_path / "images", images, transform, mode)
    results = pr.predict(files, pr.load_classifier(path))
    expected = predict_proba(model, images, MEAN, STD, 64, torch.device("cpu"))
    for result, probs in zip(results, expected):
        best = np.argsort(-probs, kind="stable")[:3]
        assert [t["index"] for t in result["top"]] == list(best)
        assert [t["probability"] for t in result["top"]] == pytest.approx(probs[best], abs=1e-4)


def test_any_size_and_aspect_becomes_the_input_size(tmp_path):
    wide = np.zeros((40, 90), dtype=np.uint8)
    wide[10:30, 20:70] = 200                   # a bright garment on a dark, wide photo
    Image.fromarray(wide).save(tmp_path / "wide.png")
    fitted = pr.load_image(tmp_path / "wide.png")
    assert fitted.shape == (28, 28) and fitted[0].max() == 0 and fitted[14, 14] == 200


def test_polarity_is_detected_and_can_be_forced(tmp_path, test_images):
    image = test_images[0][0]
    dark_on_light = write_pngs(tmp_path / "inv", [image], lambda a: 255 - a)[0]
    assert np.array_equal(pr.load_image(dark_on_light), image)
    assert np.array_equal(pr.load_image(dark_on_light, polarity="light-on-dark"), 255 - image)


def test_svm_row_ranks_by_its_decision_scores(tmp_path, test_images, real_raw):
    train, _ = load_raw(real_raw)
    cfg = classical.recipe(load_params(REPO / "params.yaml"), "rbf")
    fitted = classical.fit_model(cfg, train.images[:300], train.labels[:300], seed=0)
    path = tmp_path / "models/svm/rbf/model.joblib"
    path.parent.mkdir(parents=True)
    joblib.dump(fitted.model, path)
    images, _ = test_images
    results = pr.predict(write_pngs(tmp_path / "images", images), pr.load_classifier(path))
    scores, pred, _ = classical.score(fitted.model, images)
    assert [r["top"][0]["index"] for r in results] == list(pred)
    assert results[0]["kind"] == "svm-score-softmax"
    assert [t["probability"] for t in results[0]["top"]] == pytest.approx(
        np.sort(softmax(scores)[0])[::-1][:3], abs=1e-4)


def test_command_prints_three_classes_and_json(tmp_path, cnn_file, test_images, monkeypatch):
    path, _ = cnn_file
    files = write_pngs(tmp_path / "images", test_images[0][:2], suffix=".jpg")
    monkeypatch.chdir(tmp_path)
    text = invoke(pr.main, [*files, "--model", "cnn"])
    assert text.exit_code == 0, text.output
    lines = text.output.strip().splitlines()
    assert len(lines) == 2 and all(line.count(".") >= 3 for line in lines)
    assert all(sum(name in line for name in FASHION_MNIST.classes) >= 3 for line in lines)
    machine = invoke(pr.main, [*files, "--model", str(path), "--json", "--top", "2"])
    parsed = json.loads(machine.output)
    assert [len(r["top"]) for r in parsed] == [2, 2] and parsed[0]["kind"] == "probability"


@pytest.mark.parametrize("model, fragment", [
    ("wrn", "models/wrn/seed0/model.pt not found: `dvc pull models/wrn/seed0/model.pt`"),
    ("svm-hog", "`dvc repro train_svm@hog`"),
])
def test_missing_model_names_the_file_and_the_fix(tmp_path, test_images, monkeypatch, model, fragment):
    files = write_pngs(tmp_path / "images", test_images[0][:1])
    monkeypatch.chdir(tmp_path)
    result = invoke(pr.main, [*files, "--model", model])
    assert result.exit_code == 2 and fragment in result.output


@pytest.mark.parametrize("name", ["model.pt", "model.joblib"])
def test_unreadable_model_names_the_file(tmp_path, test_images, name):
    path = tmp_path / "models/x/seed0" / name
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a model")
    files = write_pngs(tmp_path / "images", test_images[0][:1])
    result = invoke(pr.main, [*files, "--model", str(path)])
    assert result.exit_code == 2 and str(path) in result.output and "Traceback" not in result.output


def test_bad_image_stops_before_any_output(tmp_path, cnn_file, test_images):
    path, _ = cnn_file
    good = write_pngs(tmp_path / "images", test_images[0][:1])[0]
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    for bad, fragment in ((text_file, "is not an image"), (tmp_path / "absent.png", "not found")):
        result = invoke(pr.main, [good, bad, "--model", str(path)])
        assert result.exit_code == 2 and str(bad) in result.output and fragment in result.output
        assert str(good) not in result.output


def test_unknown_polarity_is_refused(tmp_path, cnn_file, test_images):
    good = write_pngs(tmp_path / "images", test_images[0][:1])[0]
    result = invoke(pr.main, [good, "--model", str(cnn_file[0]), "--polarity", "inverted"])
    assert result.exit_code == 2 and "auto, light-on-dark, dark-on-light" in result.output
