"""The classical track: HOG against scikit-image, features, kernels, the fast solver, recipes
from params, the train_svm stage and bad inputs (the DVC queued grid search is in test_pipeline)."""

import dataclasses
import json

import joblib
import numpy as np
import pytest
import torch
from sklearn.metrics.pairwise import polynomial_kernel, rbf_kernel
from sklearn.preprocessing import StandardScaler
from skimage.feature import hog

from fashionbench import classical as cl
from fashionbench.data import Split, load_prepared, save_prepared
from fashionbench.params import SVM, ParamsError, load_params, params_from_dict
from stages.train_svm import main as train_svm_main
from tests.conftest import REPO, invoke, with_train_stats

BASE = SVM(features="raw", hog_input="pixels", scale=False, kernel="rbf", C=10.0, gamma=0.0, degree=3, hog_cells=(4,),
           hog_block=2, pca_components=0, solver="libsvm", nystroem_components=0, cg_iterations=20,
           train_size=0, cv_folds=0, cv_C=(1.0, 10.0), cv_gamma=(0.01, 0.1))


def synthetic(per_class: int, seed: int = 0) -> Split:
    """Easy 10-class images: a fixed random 7x7-block template per class plus pixel noise."""
    templates = np.random.default_rng(1234).random((10, 4, 4)).repeat(7, 1).repeat(7, 2) * 200
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    images = templates[labels] + rng.normal(0, 25, (len(labels), 28, 28))
    return Split(np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64))


@pytest.fixture(scope="module")
def train() -> Split:
    return synthetic(20, seed=0)


@pytest.fixture(scope="module")
def test() -> Split:
    return synthetic(5, seed=1)


def accuracy(cfg: SVM, train: Split, test: Split) -> float:
    fitted = cl.fit_model(cfg, train.images, train.labels, seed=0)
    _, pred, _ = cl.score(fitted.model, test.images)
    return float((pred == test.labels).mean())


# ---------------------------------------------------------------- features


@pytest.mark.parametrize("cell,block", [(4, 2), (7, 2), (5, 2), (3, 3), (14, 1)])
def test_hog_batch_equals_scikit_image(cell, block, train):
    images = np.concatenate([train.images[:20], np.random.default_rng(0).integers(0, 256, (5, 28, 28))]) / 255
    expected = np.stack([hog(im, 9, (cell, cell), (block, block), block_norm="L2-Hys") for im in images])
    np.testing.assert_allclose(cl.hog_batch(images, cell, block), expected, atol=1e-5)


def test_feature_map_dimensions(train):
    def dim(**kw):
        return cl.FeatureMap(**kw).fit_transform(train.images).shape[1]

    assert dim(features="raw") == 784
    assert dim(features="hog", hog_cells=(4,), hog_block=2) == 6 * 6 * 2 * 2 * 9
    assert dim(features="hog", hog_cells=(4, 7), hog_block=2) == 1296 + 3 * 3 * 2 * 2 * 9
    assert dim(features="pca", pca_components=15) == 15
    assert dim(features="pca+hog", pca_components=15, hog_cells=(7,)) == 15 + 324


def test_raw_features_are_pixels_over_255(train):
    features = cl.FeatureMap("raw").fit_transform(train.images)
    np.testing.assert_array_equal(features, train.images.reshape(len(train), -1) / 255.0)


def test_joined_blocks_are_centred_with_unit_mean_squared_norm(train):
    fmap = cl.FeatureMap("pca+hog", hog_cells=(7,), pca_components=10, dtype="float32")
    features = fmap.fit_transform(train.images)
    assert features.dtype == np.float32
    for block in (features[:, :10], features[:, 10:]):
        np.testing.assert_allclose(block.mean(0), 0, atol=1e-5)
        assert (block ** 2).sum(1).mean() == pytest.approx(1, rel=1e-4)
    np.testing.assert_allclose(fmap.transform(train.images), features, atol=1e-6)


def test_hog_of_standardised_images(train, test):
    """hog_input standardised: HOG of the images standardised pixel by pixel with the training
    images' mean and std (the seed's HOG row), not of pixels / 255."""
    on_pixels = cl.FeatureMap("hog", hog_input="pixels").fit(train.images)
    on_standardised = cl.FeatureMap("hog", hog_input="standardised").fit(train.images)
    plain, standardised = on_pixels.transform(test.images), on_standardised.transform(test.images)
    assert plain.shape == standardised.shape == (len(test), 1296)
    assert np.abs(plain - standardised).max() > 0.05
    scaler = StandardScaler().fit(train.images.reshape(len(train), -1) / 255.0)  # training statistics
    images = scaler.transform(test.images.reshape(len(test), -1) / 255.0).reshape(-1, 28, 28)
    np.testing.assert_allclose(standardised, cl.hog_batch(images, 4, 2), atol=1e-5)
    np.testing.assert_allclose(plain, cl.hog_batch(test.images / 255.0, 4, 2), atol=1e-5)


def test_hog_input_is_wired_from_the_recipe(train):
    cfg = dataclasses.replace(BASE, features="hog", hog_input="standardised")
    fmap = cl.make_features(cfg).named_steps["features"]
    assert fmap.hog_input == "standardised"
    fmap.fit(train.images)
    assert fmap.pixel_scaler_ is not None
    assert cl.make_features(dataclasses.replace(cfg, hog_input="pixels")).named_steps["features"] \
        .fit(train.images).pixel_scaler_ is None


def test_the_seed_hog_recipe_learns(params_dict, train, test):
    cfg = params_from_dict(params_dict).svm["hog_seed"]
    assert (cfg.features, cfg.hog_input, cfg.scale) == ("hog", "standardised", False)
    assert accuracy(cfg, train, test) >= 0.9
    assert accuracy(dataclasses.replace(BASE, features="hog", hog_input="standardised"), train, test) >= 0.9


# ---------------------------------------------------------------- kernels and solvers


def test_kernels_match_scikit_learn():
    rng = np.random.default_rng(0)
    a, b = rng.random((6, 5)), rng.random((4, 5))
    ta, tb = torch.as_tensor(a), torch.as_tensor(b)
    rbf, poly = rbf_kernel(a, b, gamma=0.3), polynomial_kernel(a, b, degree=3, gamma=0.3, coef0=0)
    expected = {"linear": a @ b.T, "rbf": rbf, "poly": poly, "rbf+poly": (rbf + poly) / 2}
    for name, value in expected.items():
        np.testing.assert_allclose(cl.kernel_matrix(ta, tb, name, 0.3, 3).numpy(), value, rtol=1e-10)
    np.testing.assert_allclose(cl.PairwiseKernel("rbf+poly", 0.3, 3)(a, b), expected["rbf+poly"])


@pytest.mark.parametrize("features,extra", [
    ("raw", {}), ("hog", {"scale": True}), ("pca", {"pca_components": 20}),
    ("pca+hog", {"pca_components": 20, "hog_cells": (4, 7)})])
def test_each_feature_option_learns(features, extra, train, test):
    assert accuracy(dataclasses.replace(BASE, features=features, **extra), train, test) >= 0.9


@pytest.mark.parametrize("solver", ["libsvm", "nystroem"])
@pytest.mark.parametrize("kernel", ["rbf", "poly", "linear", "rbf+poly"])
def test_each_kernel_learns(kernel, solver, train, test):
    cfg = dataclasses.replace(BASE, kernel=kernel, solver=solver, nystroem_components=100, degree=2)
    assert accuracy(cfg, train, test) >= 0.9


def test_gamma_zero_is_scikit_learns_scale(train):
    fitted = cl.fit_model(BASE, train.images, train.labels, seed=0)
    pixels = train.images.reshape(len(train), -1) / 255.0
    assert fitted.gamma == pytest.approx(1 / (784 * pixels.var()))
    assert fitted.model.named_steps["clf"].gamma == pytest.approx(fitted.gamma)


def test_nystroem_with_every_landmark_is_exact_kernel_ridge():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 4)), rng.integers(0, 3, 60)
    model = cl.NystroemKRR("rbf", C=10.0, gamma=0.2, n_components=60, max_iter=200).fit(x, y)
    k = rbf_kernel(x, x, gamma=0.2)
    targets = np.where(y[:, None] == np.arange(3), 1.0, -1.0)
    lam = 1 / (10.0 * 60)
    # Minimiser of (1/n)|K a - Y|^2 + lam a'K a over the span of the landmarks: K a = (K + lam n)^-1 K Y
    fitted = np.linalg.solve(k + lam * 60 * np.eye(60), k @ targets)
    np.testing.assert_allclose(model.decision_function(x), fitted, atol=2e-3)


def test_nystroem_is_seeded_and_survives_joblib(tmp_path, train, test):
    cfg = dataclasses.replace(BASE, features="pca+hog", pca_components=20, solver="nystroem",
                              nystroem_components=80, gamma=0.25, C=200.0)
    first = cl.fit_model(cfg, train.images, train.labels, seed=3).model
    again = cl.fit_model(cfg, train.images, train.labels, seed=3).model
    np.testing.assert_array_equal(first.named_steps["clf"].centers_, again.named_steps["clf"].centers_)
    joblib.dump(first, tmp_path / "m.joblib")
    loaded = joblib.load(tmp_path / "m.joblib")
    np.testing.assert_allclose(loaded.decision_function(test.images), first.decision_function(test.images))


def test_cross_validated_search_picks_from_the_grid(train, test):
    cfg = dataclasses.replace(BASE, cv_folds=2)
    run = cl.train_variant(cfg, train, test, "searched", seed=0, quick=True)
    assert run.metrics["C"] in cfg.cv_C and run.metrics["gamma"] in cfg.cv_gamma
    assert run.metrics["cv_folds"] == 2 and 0 < run.metrics["cv_accuracy"] <= 1


def test_hybrid_kernel_search_over_gamma(train, test):
    cfg = dataclasses.replace(BASE, kernel="rbf+poly", degree=2, cv_folds=2, cv_C=(10.0,))
    run = cl.train_variant(cfg, train, test, "hybrid", seed=0, quick=True)
    assert run.metrics["gamma"] in cfg.cv_gamma


def test_train_size_takes_a_stratified_subsample(train, test):
    run = cl.train_variant(dataclasses.replace(BASE, train_size=50), train, test, "sub", 0, True)
    assert run.metrics["train_size"] == 50
    assert run.metrics["support_vectors"] <= 50


def test_describe_names_every_block(params_dict):
    params = params_from_dict(params_dict)
    assert cl.describe(params.svm["rbf"]) == "pixels /255; rbf C=10 gamma=0.01"
    assert cl.describe(params.svm["rbf_scaled"]) == "pixels /255, standardised; rbf C=10 gamma=0.01"
    fast = cl.describe(params.svm["fast"])
    assert fast.startswith("PCA 100 + HOG 4 px cells, 2x2 blocks; rbf") and "Nystroem" in fast
    assert "standardised images" not in fast
    assert cl.describe(params.svm["hog_seed"]) == \
        "HOG 4 px cells, 2x2 blocks of standardised images; rbf C=10 gamma=0.01"
    assert cl.describe(params.svm["hog"]) == "HOG 4 px cells, 2x2 blocks, standardised; rbf C=10 gamma=scale"


def test_recipes_are_the_defaults_with_their_differences(params_dict):
    """A recipe lists only what differs from svm_defaults; the loader merges the rest in."""
    params = params_from_dict(params_dict)
    defaults = params_dict["svm_defaults"]
    for name, listed in params_dict["svm"].items():
        cfg = params.svm[name]
        for key, default in defaults.items():
            expected = listed.get(key, default) if listed else default
            assert getattr(cfg, key) == (tuple(expected) if isinstance(expected, list) else expected), \
                f"svm.{name}.{key}"
    params_dict["svm_defaults"]["hog_cells"] = [7]
    params_dict["svm"]["hog"]["hog_block"] = 3
    changed = params_from_dict(params_dict).svm
    assert changed["hog"].hog_cells == (7,) and changed["hog_seed"].hog_cells == (7,)
    assert changed["hog"].hog_block == 3 and changed["hog_seed"].hog_block == 2
    assert cl.describe(changed["hog"]).startswith("HOG 7 px cells, 3x3 blocks")


def test_recipe_lookup_lists_the_recipes(params_dict):
    params = params_from_dict(params_dict)
    assert cl.recipe(params, "hog_seed") is params.svm["hog_seed"]
    with pytest.raises(ParamsError, match="no recipe named 'rbff'; defined: rbf, rbf_scaled"):
        cl.recipe(params, "rbff")


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("field,value,fragment", [
    ("features", "pixels", "unknown feature 'pixels'"),
    ("features", "pca+edges", "unknown feature 'edges'"),
    ("kernel", "sigmoid", "'sigmoid' is not one of"),
    ("C", 0, "must be > 0"),
    ("C", -1.0, "must be > 0"),
    ("pca_components", 800, "images have 784 pixel values"),
    ("hog_block", 8, "do not fit"),
    ("hog_input", "scaled", "'scaled' is not one of 'pixels', 'standardised'"),
])
def test_bad_recipe_names_its_key(params_dict, field, value, fragment):
    params_dict["svm"]["rbf"][field] = value
    with pytest.raises(ParamsError) as caught:
        params_from_dict(params_dict)
    assert caught.value.key == f"svm.rbf.{field}"
    assert fragment in str(caught.value)


@pytest.mark.parametrize("change,key", [
    ({"train_size": 500}, "svm.v.train_size"),
    ({"features": "pca", "pca_components": 300}, "svm.v.pca_components"),
    ({"solver": "nystroem", "nystroem_components": 500}, "svm.v.nystroem_components"),
    ({"cv_folds": 30}, "svm.v.cv_folds"),
])
def test_data_dependent_checks_fail_before_fitting(change, key, train, test, monkeypatch):
    monkeypatch.setattr(cl, "fit_model", lambda *a: pytest.fail("fitted despite a bad recipe"))
    with pytest.raises(ParamsError) as caught:
        cl.train_variant(dataclasses.replace(BASE, **change), train, test, "v", 0, True)
    assert caught.value.key == key


def test_hybrid_libsvm_refuses_a_gram_matrix_too_big(train, test, monkeypatch):
    monkeypatch.setattr(cl, "HYBRID_LIBSVM_MAX_IMAGES", 100)
    with pytest.raises(ParamsError, match="kernel matrix"):
        cl.train_variant(dataclasses.replace(BASE, kernel="rbf+poly"), train, test, "v", 0, True)


# ---------------------------------------------------------------- the stage


def run_stage(args):
    return invoke(train_svm_main, args)


@pytest.fixture
def repo(tmp_path, write_params, monkeypatch, train, test):
    """A repository root with a tiny synthetic prepared split; returns a params writer."""
    save_prepared(with_train_stats(train, None, test), tmp_path / "data/prepared")
    monkeypatch.chdir(tmp_path)
    return write_params


def tiny_recipes(raw: dict) -> None:
    fast = raw["svm"]["fast"]
    raw["svm"] = {"rbf": raw["svm"]["rbf"], "hog_seed": raw["svm"]["hog_seed"],
                  "fast": fast | {"nystroem_components": 100, "pca_components": 20}}


def test_stage_writes_model_scores_and_metrics(repo, tmp_path, test):
    params = load_params(repo(tiny_recipes))
    for variant in ("rbf", "hog_seed", "fast"):
        result = run_stage([variant])
        assert result.exit_code == 0, result.output
        saved = np.load(tmp_path / f"models/svm/{variant}/test_scores.npz")
        assert saved["scores"].dtype == np.float32 and saved["scores"].shape == (len(test), 10)
        assert saved["pred"].dtype == np.int64 and saved["labels"].dtype == np.int64
        np.testing.assert_array_equal(saved["labels"], test.labels)
        np.testing.assert_array_equal(saved["pred"], saved["scores"].argmax(1))
        model = joblib.load(tmp_path / f"models/svm/{variant}/model.joblib")
        np.testing.assert_array_equal(model.predict(test.images), saved["pred"])
        metrics = json.loads((tmp_path / f"metrics/train/svm-{variant}.json").read_text())
        assert metrics["test_accuracy"] == pytest.approx((saved["pred"] == test.labels).mean())
        for key in ("fit_time_s", "predict_time_s", "support_vectors", "feature_dim", "train_size",
                    "test_macro_f1", "seed", "quick"):
            assert key in metrics
        assert metrics["recipe"] == cl.describe(params.svm[variant])
        assert metrics["device"] in ("cpu", "cuda") and metrics["hardware"]
        assert isinstance(metrics["threads"], int) and (metrics["threads"] >= 1 or metrics["device"] == "cuda")
        assert metrics["quick"] is params.quick and metrics["train_size"] == 200
        if variant == "hog_seed":
            assert "standardised images" in metrics["recipe"] and metrics["feature_dim"] == 1296
            assert metrics["test_accuracy"] >= 0.9
    assert metrics["support_vectors"] == 0 and metrics["feature_dim"] == 20 + 1296
    assert metrics["recipe"].startswith("PCA 20 + HOG 4 px cells") and "Nystroem 100 landmarks" in metrics["recipe"]


def test_stage_reads_a_changed_default(repo, tmp_path):
    """An edit of svm_defaults (what `dvc exp run -S svm_defaults.C=...` does) reaches a recipe
    that does not list the key, and the recorded recipe says so."""
    def edit(raw):
        tiny_recipes(raw)
        raw["svm_defaults"]["hog_cells"] = [7]
    repo(edit)
    result = run_stage(["hog_seed"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics/train/svm-hog_seed.json").read_text())
    assert metrics["feature_dim"] == 3 * 3 * 2 * 2 * 9
    assert metrics["recipe"].startswith("HOG 7 px cells, 2x2 blocks of standardised images")


@pytest.mark.parametrize("field,value,fragment", [
    ("features", "pixels", "svm.rbf.features: unknown feature"),
    ("kernel", "sigmoid", "svm.rbf.kernel"),
    ("C", 0, "svm.rbf.C: must be > 0"),
    ("pca_components", 1000, "svm.rbf.pca_components"),
    ("train_size", 100000, "svm.rbf.train_size"),
])
def test_stage_bad_recipe_exits_2_naming_the_key(repo, tmp_path, field, value, fragment):
    repo(lambda raw: raw["svm"]["rbf"].update({field: value}))
    result = run_stage(["rbf"])
    assert result.exit_code == 2
    assert fragment in result.output
    assert not (tmp_path / "models").exists()


def test_stage_unknown_variant_lists_the_recipes(repo):
    repo()
    result = run_stage(["rbff"])
    assert result.exit_code == 2
    assert "no recipe named 'rbff'" in result.output and "rbf_scaled" in result.output


@pytest.mark.real_data
def test_fast_recipe_on_real_images():
    if not (REPO / "data/prepared/arrays.npz").is_file():
        pytest.skip("data/prepared absent: run `dvc repro preprocess`")
    from fashionbench.params import load_params

    data = load_prepared(REPO / "data/prepared")
    cfg = dataclasses.replace(load_params(REPO / "params.yaml").svm["fast"], train_size=3000,
                              nystroem_components=1000)
    run = cl.train_variant(cfg, data.train, Split(data.test.images[:2000], data.test.labels[:2000]),
                           "fast", seed=0, quick=True)
    assert run.metrics["test_accuracy"] > 0.85
