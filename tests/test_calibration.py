"""Calibration: ECE and Brier against hand-computed values, temperature scaling recovering a
known temperature, the two-fold fit that never scores a half with its own temperature, SVM
score softmaxes, the error on too few images, and the table's "not evaluated"."""

import json
import math

import numpy as np
import pytest

from fashionbench import calibration as cal
from fashionbench import report
from tests.test_compare import PLAN, line_of, tree  # noqa: F401 (tree: the compare tree fixture)

# ---------------------------------------------------------------- metrics by hand


def test_a_perfectly_calibrated_case_has_ece_zero():
    # ten images at top-1 confidence 0.8, all in one bin, eight of them right: accuracy 0.8
    probs = np.full((10, 3), 0.1)
    probs[:, 0] = 0.8
    labels = np.array([0] * 8 + [1, 2])
    assert cal.expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
    # Brier: a right image (0.2^2 + 0.1^2 + 0.1^2), a wrong one (0.8^2 + 0.9^2 + 0.1^2)
    right, wrong = 0.04 + 0.01 + 0.01, 0.64 + 0.81 + 0.01
    assert cal.brier_score(probs, labels) == pytest.approx((8 * right + 2 * wrong) / 10)


def test_ece_and_brier_of_a_small_case_by_hand():
    probs = np.array([[0.90, 0.05, 0.05],    # label 0: right at 0.90 (bin 13: (13/15, 14/15])
                      [0.62, 0.28, 0.10],    # label 1: wrong at 0.62 (bin 9: (9/15, 10/15])
                      [0.20, 0.70, 0.10],    # label 1: right at 0.70 (bin 10: (10/15, 11/15])
                      [0.10, 0.18, 0.72]])   # label 2: right at 0.72 (bin 10)
    labels = np.array([0, 1, 1, 2])
    # bins: {0.90: acc 1}, {0.62: acc 0}, {0.70, 0.72: acc 1, conf 0.71}
    ece = 1 / 4 * abs(1 - 0.90) + 1 / 4 * abs(0 - 0.62) + 2 / 4 * abs(1 - 0.71)
    assert cal.expected_calibration_error(probs, labels) == pytest.approx(ece)
    assert ece == pytest.approx(0.325)
    brier = ((0.1 ** 2 + 0.05 ** 2 + 0.05 ** 2) + (0.62 ** 2 + 0.72 ** 2 + 0.1 ** 2)
             + (0.2 ** 2 + 0.3 ** 2 + 0.1 ** 2) + (0.1 ** 2 + 0.18 ** 2 + 0.28 ** 2)) / 4
    assert cal.brier_score(probs, labels) == pytest.approx(brier)
    assert brier == pytest.approx(0.29715)
    bins = cal.confidence_bins(probs, labels)
    assert [(b["bin"], b["count"]) for b in bins] == [(9, 1), (10, 2), (13, 1)]
    assert bins[1]["confidence"] == pytest.approx(0.71) and bins[1]["accuracy"] == 1.0
    assert cal.log_loss(probs, labels) == pytest.approx(-np.mean(np.log([0.9, 0.28, 0.7, 0.72])))


def test_a_probability_stored_as_zero_gives_a_finite_log_loss():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert cal.log_loss(probs, np.array([1, 1])) == pytest.approx(-math.log(cal.PROB_FLOOR) / 2)


# ---------------------------------------------------------------- temperature scaling


def synthetic(n: int, temperature: float, seed: int, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(log-probabilities of a model whose logits are calibrated ones divided by
    `temperature`, labels drawn from the calibrated probabilities)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, (n, classes))
    calibrated = cal.scale(logits, 1.0)
    labels = (calibrated.cumsum(axis=1) < rng.uniform(size=(n, 1))).sum(axis=1)
    return cal.log_probabilities(cal.scale(logits, 1 / temperature)), labels


@pytest.mark.parametrize("temperature", [0.5, 2.5])
def test_temperature_scaling_recovers_a_known_temperature(temperature):
    log_probs, labels = synthetic(20_000, temperature, seed=1)
    fitted = cal.fit_temperature(log_probs, labels, "key")
    assert fitted == pytest.approx(temperature, rel=0.05)
    # scaling never changes a prediction, and it lowers the NLL
    scaled = cal.scale(log_probs, fitted)
    np.testing.assert_array_equal(scaled.argmax(axis=1), log_probs.argmax(axis=1))
    assert cal.nll(log_probs, labels, fitted) < cal.nll(log_probs, labels, 1.0)
    assert cal.expected_calibration_error(scaled, labels) < cal.expected_calibration_error(np.exp(log_probs), labels)


def test_stratified_halves_are_disjoint_balanced_and_seeded():
    labels = np.repeat(np.arange(10), 21)
    a, b = cal.stratified_halves(labels, seed=0)
    assert len(a) == 105 and len(b) == 105 and not set(a) & set(b) and set(a) | set(b) == set(range(210))
    assert all(abs(np.sum(labels[a] == c) - np.sum(labels[b] == c)) <= 1 for c in range(10))
    np.testing.assert_array_equal(cal.stratified_halves(labels, seed=0)[0], a)
    assert not np.array_equal(cal.stratified_halves(labels, seed=1)[0], a)


def test_each_half_is_scored_with_the_temperature_of_the_other_half():
    # half a from a model overconfident by 3, half b from one underconfident by 2: each half's
    # own temperature is far from the other's, so scoring a half with its own would show
    log_probs, labels = synthetic(4_000, 1.0, seed=1)
    half_a, half_b = cal.stratified_halves(labels, seed=7)
    log_probs[half_a] *= 3.0   # softmax(3 log p): overconfident, its temperature about 3
    log_probs[half_b] *= 0.5
    scaled, (t_a, t_b), halves = cal.cross_fitted(log_probs, labels, seed=7, key="key")
    np.testing.assert_array_equal(halves[0], half_a)
    assert t_a == pytest.approx(cal.fit_temperature(log_probs[half_a], labels[half_a], "key"))
    assert t_b == pytest.approx(cal.fit_temperature(log_probs[half_b], labels[half_b], "key"))
    assert t_a > 2 and t_b < 0.7
    np.testing.assert_allclose(scaled[half_b], cal.scale(log_probs[half_b], t_a))
    np.testing.assert_allclose(scaled[half_a], cal.scale(log_probs[half_a], t_b))


def test_calibration_of_model_probabilities_and_of_svm_score_softmaxes():
    log_probs, labels = synthetic(2_000, 2.0, seed=3)
    probs = np.exp(log_probs)
    figures, points = cal.calibration(probs, labels, seed=0, key="key")
    assert figures["ece"] == pytest.approx(cal.expected_calibration_error(probs, labels))
    assert figures["ece_ts"] < figures["ece"] and figures["brier_ts"] < figures["brier"]
    assert figures["log_loss_ts"] < figures["log_loss"]
    assert figures["temperature"] == pytest.approx(math.sqrt(figures["temperature_a"] * figures["temperature_b"]))
    assert {p["probabilities"] for p in points} == {"model", "temperature-scaled"}
    assert sum(p["count"] for p in points if p["probabilities"] == "model") == len(labels)
    # SVM: no "before" figures (a score softmax is no probability), the same "after" ones
    svm, svm_points = cal.calibration(probs, labels, seed=0, key="key", probabilities=False)
    assert svm["ece"] is None and svm["brier"] is None and svm["log_loss"] is None
    assert {k: svm[k] for k in ("ece_ts", "brier_ts", "temperature")} == \
        {k: figures[k] for k in ("ece_ts", "brier_ts", "temperature")}
    assert {p["probabilities"] for p in svm_points} == {"temperature-scaled"}


def test_too_few_images_for_a_temperature_name_the_key():
    log_probs, labels = synthetic(28, 1.0, seed=0, classes=2)  # halves of 14 < 15 bins
    with pytest.raises(cal.CalibrationError, match=r"params\.yaml: quick_scale\.test_size: .* 14 images, "
                                                   r"fewer than the 15 ECE bins.*at least 30"):
        cal.calibration(np.exp(log_probs), labels, seed=0, key="quick_scale.test_size")
    log_probs, labels = synthetic(30, 1.0, seed=0, classes=2)
    figures, _ = cal.calibration(np.exp(log_probs), labels, seed=0, key="quick_scale.test_size")
    assert figures["temperature_a"] > 0  # 15 images a half: enough


# ---------------------------------------------------------------- the table


def evaluated(cal_figures: dict | None = None, robust: dict | None = None) -> dict:
    return ({"calibration": cal_figures} if cal_figures else {}) | ({"robustness": robust} if robust else {})


def figures(ece, ece_ts, t=1.5):
    return {"ece": ece, "brier": None if ece is None else 0.2, "log_loss": None, "ece_ts": ece_ts,
            "brier_ts": 0.1, "log_loss_ts": 0.3, "temperature": t, "temperature_a": t, "temperature_b": t}


def robustness(mean, worst, corruptions):
    return {"mean_accuracy": mean, "worst_corruption": worst, "worst_accuracy": corruptions[worst],
            "corruptions": corruptions}


def add_to_metrics(root, run_id, extra):
    path = root / "metrics/eval" / f"{run_id}.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | extra))


def test_runs_without_calibration_or_robustness_show_not_evaluated(tree):  # noqa: F811
    table = report.compare(PLAN, 0, tree)
    for row, blank in (("svm-rbf", 5), ("cnn", 5), ("wrn", 5), ("ensemble", 2)):  # the ensemble: calibrated
        cells = [c.strip() for c in line_of(table, row).split("|")]
        assert cells.count("not evaluated") == blank, (row, cells)
    markdown = (tree / "reports/results.md").read_text()
    assert "nan" not in markdown.lower() and "15 equal-width bins" in markdown
    assert "each half scored with the other half's temperature" in markdown
    for name in ("reliability", "robustness"):
        assert (tree / "plots/compare" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_calibration_and_robustness_columns_mean_over_the_evaluated_seeds(tree):  # noqa: F811
    add_to_metrics(tree, "cnn-seed0", evaluated(figures(0.04, 0.01, 1.2),
                                                robustness(0.7, "contrast", {"contrast": 0.3, "jpeg": 0.9})))
    add_to_metrics(tree, "cnn-seed1", evaluated(figures(0.06, 0.03, 1.4),
                                                robustness(0.8, "contrast", {"contrast": 0.5, "jpeg": 0.9})))
    add_to_metrics(tree, "wrn-seed0", evaluated(figures(0.1, 0.02)))  # seed 1: not evaluated
    add_to_metrics(tree, "svm-rbf", evaluated(figures(None, 0.05, 0.3),
                                              robustness(0.6, "jpeg", {"contrast": 0.7, "jpeg": 0.5})))
    for run_id, series in (("cnn-seed0", ("model", "temperature-scaled")), ("svm-rbf", ("temperature-scaled",))):
        path = tree / "plots/reliability" / f"{run_id}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("probabilities,bin,confidence,accuracy,count\n"
                        + "".join(f"{s},13,0.9,0.85,60\n{s},14,0.97,0.99,40\n" for s in series))
    record = {"severity_accuracy": {"1": 0.85, "2": 0.7}}
    (tree / "reports/robustness").mkdir(parents=True)
    (tree / "reports/robustness/cnn-seed0.json").write_text(json.dumps(record))
    table = report.compare(PLAN, 0, tree)
    cnn = [c.strip() for c in line_of(table, "cnn").split("|")]
    assert "0.0500 → 0.0200" in cnn and "1.300" in cnn and "0.7500" in cnn and "contrast 0.4000" in cnn
    wrn = [c.strip() for c in line_of(table, "wrn").split("|")]
    assert "0.1000 → 0.0200 (1 of 2 seeds)" in wrn and wrn.count("not evaluated") == 2
    svm = [c.strip() for c in line_of(table, "svm-rbf").split("|")]
    assert "n/a → 0.0500" in svm and "jpeg 0.5000" in svm
    assert table["cnn"]["corruptions"] == pytest.approx({"contrast": 0.4, "jpeg": 0.9})
    assert json.loads((tree / "metrics/compare.json").read_text())["cnn"]["ece_ts"] == pytest.approx(0.02)
    assert "nan" not in (tree / "reports/results.md").read_text().lower()


def test_the_ensemble_is_calibrated_from_its_mean_probabilities_not_on_corruptions(tree):  # noqa: F811
    labels, _ = report._load_predictions(tree / "predictions/cnn-seed0.npz")
    expected = [cal.calibration(np.mean([report._load_predictions(tree / "predictions" / f"{row}-seed{seed}.npz")[1]
                                         for row in ("cnn", "wrn")], axis=0), labels, 3, "quick_scale.test_size")[0]
                for seed in (0, 1)]
    table = report.compare(PLAN, 3, tree)
    ensemble = table["ensemble"]
    for key in ("ece", "ece_ts", "brier", "brier_ts", "temperature"):
        assert ensemble[key] == pytest.approx(np.mean([e[key] for e in expected]), abs=1e-5), key
    assert ensemble["calibrated_runs"] == 2 and ensemble["robust_runs"] == 0
    cells = [c.strip() for c in line_of(table, "ensemble").split("|")]
    assert cells.count("not evaluated") == 2 and f"{ensemble['ece']:.4f} → {ensemble['ece_ts']:.4f}" in cells
    # the seed chooses the halves the temperatures are fitted on: another seed, other figures
    assert report.compare(PLAN, 4, tree)["ensemble"]["temperature"] != ensemble["temperature"]
