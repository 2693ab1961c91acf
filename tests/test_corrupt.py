"""The corrupted test set: each corruption seeded and deterministic, severities that grow,
the set's file and checksum, the params checks, the stage, the fast SVM scores, and the
evaluate stage's calibration and robustness outputs."""

import json

import numpy as np
import pytest
import torch

from fashionbench import classical, corrupt
from fashionbench import evaluate as ev
from fashionbench.data import Split, download, save_prepared
from fashionbench.errors import UserError
from fashionbench.models import build_model, save_trained
from fashionbench.models.cnn import CNNArch
from fashionbench.params import ParamsError, load_params, params_from_dict
from stages.corrupt import main as corrupt_main
from tests.conftest import invoke, with_train_stats

LABELS = np.repeat(np.arange(10), 5)


def garments(n: int = 20, seed: int = 0, colour: bool = False) -> np.ndarray:
    """Fashion-MNIST-like images: a textured bright shape on a black background."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        top, left = rng.integers(2, 8, 2)
        images[i, top:top + 18, left:left + 14] = rng.integers(120, 255, (18, 14))
    return np.repeat(images[..., None], 3, axis=-1) if colour else images


# ---------------------------------------------------------------- the corruptions


@pytest.mark.parametrize("name", corrupt.CORRUPTIONS)
@pytest.mark.parametrize("colour", [False, True])
def test_each_corruption_keeps_shape_and_dtype_and_changes_the_image(name, colour):
    images = garments(colour=colour)
    for severity in (1, 5):
        out = corrupt.corrupt(images, name, severity, seed=0)
        assert out.shape == images.shape and out.dtype == np.uint8
        assert not np.array_equal(out, images)
    assert corrupt.corrupt(images[:0], name, 3, seed=0).shape == images[:0].shape


@pytest.mark.parametrize("name", corrupt.CORRUPTIONS)
def test_each_corruption_is_deterministic_under_its_seed(name):
    images = garments()
    first = corrupt.corrupt(images, name, 3, seed=0)
    assert corrupt.corrupt(images.copy(), name, 3, seed=0).tobytes() == first.tobytes()
    other_seed = corrupt.corrupt(images, name, 3, seed=1)
    if name in corrupt.RANDOM:
        assert other_seed.tobytes() != first.tobytes()
    else:  # blur, contrast, brightness, zoom and JPEG draw nothing
        assert other_seed.tobytes() == first.tobytes()


def test_the_random_ones_draw_from_their_generator():
    images = garments()
    for name in corrupt.CORRUPTIONS:
        rng = np.random.default_rng(0)
        state = rng.bit_generator.state
        corrupt.CORRUPTIONS[name](images, 2, rng)
        assert (rng.bit_generator.state != state) == (name in corrupt.RANDOM), name


def test_a_generator_depends_on_the_name_and_severity_not_a_list_position():
    draws = {(name, s): corrupt.generator(0, name, s).integers(1 << 30) for name in ("rotate", "elastic")
             for s in (1, 2)}
    assert len(set(draws.values())) == 4
    assert corrupt.generator(0, "rotate", 2).integers(1 << 30) == draws[("rotate", 2)]


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "gaussian_blur", "contrast",
                                  "brightness", "zoom", "elastic"])
def test_a_higher_severity_changes_the_images_more(name):
    images = garments(50)
    change = [np.abs(corrupt.corrupt(images, name, s, seed=0).astype(int) - images).mean() for s in range(1, 6)]
    assert all(a < b for a, b in zip(change, change[1:])), change


def test_severities_are_one_to_five():
    with pytest.raises(ValueError, match="outside 1..5"):
        corrupt.corrupt(garments(), "rotate", 6, seed=0)
    assert all(len(values) == corrupt.MAX_SEVERITY for values, _ in corrupt.SEVERITIES.values())
    assert set(corrupt.SEVERITIES) == set(corrupt.CORRUPTIONS)


def test_translate_moves_whole_pixels_and_fills_with_black():
    image = np.zeros((1, 28, 28), np.uint8)
    image[0, 14, 14] = 200
    for severity in range(1, 6):
        out = corrupt.corrupt(image, "translate", severity, seed=severity)
        (row, col), = np.argwhere(out[0])
        assert out[0, row, col] == 200 and out.sum() == 200
        assert abs(np.hypot(row - 14, col - 14) - corrupt.SEVERITIES["translate"][0][severity - 1]) <= 0.75


# ---------------------------------------------------------------- the set


def test_build_save_and_load(tmp_path):
    images, labels = garments(50), LABELS.copy()
    corrupted = corrupt.build(images, labels, 20, 0, ("jpeg", "rotate"), (1, 4))
    assert corrupted.images.shape == (2, 2, 20, 28, 28)
    assert np.bincount(corrupted.labels).tolist() == [2] * 10  # stratified
    np.testing.assert_array_equal(corrupted.labels, labels[corrupted.indices])
    np.testing.assert_array_equal(corrupted.images[1, 1],
                                  corrupt.corrupt(images[corrupted.indices], "rotate", 4, seed=0))
    # a corruption's images do not depend on what else the list holds
    alone = corrupt.build(images, labels, 20, 0, ("rotate",), (4,))
    np.testing.assert_array_equal(alone.images[0, 0], corrupted.images[1, 1])

    manifest = corrupt.save(corrupted, tmp_path)
    assert manifest["shape"] == [2, 2, 20, 28, 28] and manifest["corruptions"] == ["jpeg", "rotate"]
    assert set(manifest["images_sha256"]) == {"jpeg", "rotate"} and "torchvision" in manifest["versions"]
    loaded = corrupt.load(tmp_path, (28, 28))
    np.testing.assert_array_equal(loaded.images, corrupted.images)
    np.testing.assert_array_equal(loaded.indices, corrupted.indices)
    assert loaded.corruptions == ("jpeg", "rotate") and loaded.severities == (1, 4)
    first = (tmp_path / corrupt.CORRUPTED_FILE).read_bytes()
    corrupt.save(corrupt.build(images, labels, 20, 0, ("jpeg", "rotate"), (1, 4)), tmp_path)
    assert (tmp_path / corrupt.CORRUPTED_FILE).read_bytes() == first  # same seed, same bytes


def test_a_damaged_or_foreign_set_is_named(tmp_path):
    with pytest.raises(corrupt.CorruptedSetError, match="dvc repro corrupt"):
        corrupt.load(tmp_path)
    corrupt.save(corrupt.build(garments(50), LABELS.copy(), 10, 0, ("jpeg",), (1,)), tmp_path)
    with pytest.raises(corrupt.CorruptedSetError, match=r"shape \(28, 28\), not the dataset's \(32, 32, 3\)"):
        corrupt.load(tmp_path, (32, 32, 3))
    path = tmp_path / corrupt.CORRUPTED_FILE
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(corrupt.CorruptedSetError, match="does not match the checksum.*dvc repro -f corrupt"):
        corrupt.load(tmp_path)


def test_a_subset_larger_than_the_test_set_is_refused_naming_the_key():
    with pytest.raises(ParamsError, match=r"quick_scale\.corrupt_size: 60 images cannot be drawn from a test "
                                          r"set of 50"):
        corrupt.build(garments(50), LABELS.copy(), 60, 0, ("jpeg",), (1,), key="quick_scale.corrupt_size")


# ---------------------------------------------------------------- params


@pytest.mark.parametrize("edit, key, fragment", [
    (lambda c: c.update(corruptions=["gaussian_noise", "jpg"]), "corrupt.corruptions",
     "unknown corruption 'jpg'; choose from gaussian_noise"),
    (lambda c: c.update(corruptions=["rotate", "rotate"]), "corrupt.corruptions", "once"),
    (lambda c: c.update(corruptions=[]), "corrupt.corruptions", "at least one"),
    (lambda c: c.update(severities=[1, 6]), "corrupt.severities", "severity 6 is out of range: severities are 1..5"),
    (lambda c: c.update(severities=[0]), "corrupt.severities", "out of range"),
    (lambda c: c.update(subset_size=10_001), "corrupt.subset_size", "the 10000 test images of fashion-mnist"),
    (lambda c: c.update(subset_size=5), "corrupt.subset_size", "is impossible"),
])
def test_bad_corrupt_params_name_the_key(params_dict, edit, key, fragment):
    edit(params_dict["corrupt"])
    with pytest.raises(ParamsError) as caught:
        params_from_dict(params_dict)
    assert caught.value.key == key and fragment in str(caught.value), str(caught.value)
    if "jpg" in fragment:
        assert "did you mean 'jpeg'?" in str(caught.value)


def test_the_quick_scale_sets_the_corrupted_set_size(params_dict):
    assert params_from_dict(params_dict).corrupt_size() == params_dict["corrupt"]["subset_size"]
    params_dict["quick"] = True
    assert params_from_dict(params_dict).corrupt_size() == params_dict["quick_scale"]["corrupt_size"]
    params_dict["quick_scale"]["corrupt_size"] = 20_000
    with pytest.raises(ParamsError, match=r"quick_scale\.corrupt_size: must be at least 10 and at most the 10000"):
        params_from_dict(params_dict)


# ---------------------------------------------------------------- the stage


def test_the_stage_writes_a_reproducible_set_and_its_figure(synthetic_source, tmp_path, write_params):
    raw = tmp_path / "raw"
    download((str(synthetic_source),), raw, timeout=1)
    params = write_params(lambda p: p.update(quick=True) or p["quick_scale"].update(corrupt_size=20)
                          or p["corrupt"].update(corruptions=["shot_noise", "zoom"], severities=[2, 5]))
    out, figure = tmp_path / "corrupted", tmp_path / "plots/examples.png"
    args = ["--params", params, "--raw", raw, "--out", out, "--examples", figure]
    result = invoke(corrupt_main, args)
    assert result.exit_code == 0, result.output
    assert "20 test images x 2 corruptions x 2 severities" in result.output
    loaded = corrupt.load(out, (28, 28))
    assert loaded.images.shape == (2, 2, 20, 28, 28) and loaded.corruptions == ("shot_noise", "zoom")
    assert figure.read_bytes()[:4] == b"\x89PNG"
    first = (out / corrupt.CORRUPTED_FILE).read_bytes()
    assert invoke(corrupt_main, args).exit_code == 0
    assert (out / corrupt.CORRUPTED_FILE).read_bytes() == first

    too_many = write_params(lambda p: p.update(quick=True) or p["quick_scale"].update(corrupt_size=60))
    failed = invoke(corrupt_main, ["--params", too_many, "--raw", raw, "--out", out, "--examples", figure])
    assert failed.exit_code == 2 and failed.output.startswith("error: params.yaml: quick_scale.corrupt_size: 60")
    assert len(failed.output.strip().splitlines()) == 1


# ---------------------------------------------------------------- scoring


def test_accuracy_grid_and_its_summary():
    corrupted = corrupt.build(garments(50), LABELS.copy(), 20, 0, ("contrast", "jpeg"), (1, 3, 5))
    contrast_images = corrupted.images[0].reshape(-1, 28, 28)

    def predict(images):  # right everywhere except on every other contrast image
        right = np.tile(corrupted.labels, len(images) // len(corrupted.labels))
        if np.array_equal(images, contrast_images):
            right[::2] = (right[::2] + 1) % 10
        return right

    grid = corrupt.accuracy_grid(predict, corrupted)
    np.testing.assert_allclose(grid, [[0.5, 0.5, 0.5], [1, 1, 1]])
    summary, record = corrupt.robustness(grid, corrupted)
    assert summary == {"mean_accuracy": 0.75, "worst_corruption": "contrast", "worst_accuracy": 0.5,
                       "corruptions": {"contrast": 0.5, "jpeg": 1.0}}
    assert record["accuracy"]["contrast"] == {"1": 0.5, "3": 0.5, "5": 0.5}
    assert record["severity_accuracy"] == {"1": 0.75, "3": 0.75, "5": 0.75} and record["images"] == 20


def fitted_svm(kernel: str, classes: int = 10, features: str = "raw"):
    """A fitted SVM pipeline on 200 synthetic images of `classes` classes, as train_svm
    builds it (FeatureMap, scaler step, SVC with break_ties)."""
    from sklearn.pipeline import Pipeline
    from sklearn.svm import SVC

    rng = np.random.default_rng(0)
    labels = np.arange(200) % classes
    images = (rng.integers(0, 60, (200, 28, 28)) + 15 * labels[:, None, None]).astype(np.uint8)
    model = Pipeline([("features", classical.FeatureMap(features)), ("scale", "passthrough"),
                      ("clf", SVC(C=10.0, kernel=kernel, gamma=0.01, break_ties=True))])
    return model.fit(images, labels), images


@pytest.mark.parametrize("kernel, classes, features", [
    ("rbf", 10, "raw"), ("poly", 10, "raw"), ("linear", 10, "raw"), ("rbf", 2, "raw"), ("rbf", 10, "hog")])
def test_fast_svc_scores_equal_libsvm(kernel, classes, features):
    model, images = fitted_svm(kernel, classes, features)
    expected, pred, _ = classical.score(model, images[:60])
    scores = corrupt.decision_scores(model, images[:60], chunk=25)
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(model.steps[-1][1].classes_[scores.argmax(axis=1)], pred)


# ---------------------------------------------------------------- the evaluate stage


@pytest.fixture
def repo(tmp_path, write_params, monkeypatch):
    """A repository root: params.yaml (CPU), 50 prepared test images, a corrupted set of 20
    of them under two corruptions at two severities, and the runs' training records."""
    write_params(lambda p: p["evaluate"].update(device="cpu"))
    split = Split(garments(50, seed=3), LABELS.copy())
    save_prepared(with_train_stats(split, None, split), tmp_path / "data/prepared")
    corrupt.save(corrupt.build(split.images, split.labels, 20, 0, ("gaussian_blur", "rotate"), (1, 5)),
                 tmp_path / "data/corrupted")
    for run_id in ("cnn-seed0", "svm-rbf"):
        path = tmp_path / "metrics/train" / f"{run_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"run": run_id, "quick": False}))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_deep_run_records_calibration_and_robustness(repo):
    torch.manual_seed(0)
    arch = CNNArch(dropout=0.5)
    model = build_model("cnn", arch)
    save_trained(repo / "models/cnn/seed0/model.pt", model, "cnn", arch, mean=0.3, std=0.35, seed=0,
                 epochs=1, hflip=0.0)
    result = ev.evaluate_run("cnn-seed0", load_params("params.yaml"))
    metrics = json.loads((repo / "metrics/eval/cnn-seed0.json").read_text())
    assert metrics["calibration"] == pytest.approx(result["calibration"])
    assert {"ece", "ece_ts", "brier", "brier_ts", "log_loss", "log_loss_ts", "temperature",
            "temperature_a", "temperature_b"} == set(metrics["calibration"])
    assert metrics["calibration"]["log_loss"] == pytest.approx(metrics["log_loss"])
    corrupted = corrupt.load(repo / "data/corrupted")
    images = corrupted.images.reshape(-1, 28, 28)
    pred = ev.predict_proba(model, images, 0.3, 0.35, 64, torch.device("cpu")).argmax(axis=1)
    expected = (pred.reshape(2, 2, 20) == corrupted.labels).mean(axis=2)
    record = json.loads((repo / "reports/robustness/cnn-seed0.json").read_text())
    assert record["accuracy"]["rotate"]["5"] == pytest.approx(expected[1, 1])
    assert metrics["robustness"]["mean_accuracy"] == pytest.approx(expected.mean())
    lines = (repo / "plots/reliability/cnn-seed0.csv").read_text().splitlines()
    assert lines[0] == "probabilities,bin,confidence,accuracy,count"
    assert {line.split(",")[0] for line in lines[1:]} == {"model", "temperature-scaled"}


def test_an_svm_run_is_scored_by_its_pipeline_and_calibrated_after_scaling_only(repo):
    import joblib

    model, _ = fitted_svm("rbf")
    test = np.load(repo / "data/prepared/arrays.npz")["test_x"]
    scores, pred, _ = classical.score(model, test)
    (repo / "models/svm/rbf").mkdir(parents=True)
    np.savez(repo / "models/svm/rbf/test_scores.npz", scores=scores, pred=pred, labels=LABELS)
    # the SVM's pickled pipeline scores the corrupted images: without it, the file and its stage
    with pytest.raises(UserError, match=r"svm-rbf: models/svm/rbf/model\.joblib is missing: "
                                        r"re-run `dvc repro train_svm@rbf`"):
        ev.evaluate_run("svm-rbf", load_params("params.yaml"))
    joblib.dump(model, repo / "models/svm/rbf/model.joblib")
    result = ev.evaluate_run("svm-rbf", load_params("params.yaml"))
    calibrated = result["calibration"]
    assert calibrated["ece"] is None and calibrated["brier"] is None and calibrated["ece_ts"] >= 0
    corrupted = corrupt.load(repo / "data/corrupted")
    expected = (model.predict(corrupted.images.reshape(-1, 28, 28)).reshape(2, 2, 20) == corrupted.labels)
    assert result["robustness"]["mean_accuracy"] == pytest.approx(expected.mean())
    lines = (repo / "plots/reliability/svm-rbf.csv").read_text().splitlines()
    assert {line.split(",")[0] for line in lines[1:]} == {"temperature-scaled"}
