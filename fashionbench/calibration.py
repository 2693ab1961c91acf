"""Calibration of test-set probabilities: ECE, Brier score, log loss and temperature scaling.

Pure NumPy (SciPy for the 1-D search), computed from the probabilities a run keeps in git
(predictions/<id>.npz, float16), so that anyone can recompute them from the record.

- Expected calibration error (Guo, Pleiss, Sun and Weinberger, "On Calibration of Modern
  Neural Networks", ICML 2017): the top-1 confidences fall into ECE_BINS equal-width bins
  ((0, 1/15], (1/15, 2/15], ..., (14/15, 1]) and ECE = sum_b (n_b / N) |acc_b - conf_b|,
  acc_b the accuracy and conf_b the mean top-1 confidence of the n_b images in bin b.
- Brier score: the original multiclass definition (Brier 1950), the mean over images of
  sum_k (p_k - y_k)^2 with y the one-hot label: 0 is perfect, 2 the worst; not divided by the
  number of classes.
- Temperature scaling (Guo et al.): probabilities softmax(log p / T), one T > 0 for the whole
  model, fitted by minimising the negative log-likelihood. It never changes a prediction.
  Fitted here without the labels it is scored on: the test set is split into two stratified
  halves (seeded), each half's temperature is fitted on the other half, and the figures
  "after" are those of the whole test set so scaled (two-fold cross-fitting).

SVM rows store a softmax of decision scores, which is not a probability: their "before"
figures are not applicable (None), and temperature scaling of those scores (softmax(s / T),
the same as softmax(log p / T)) is exactly what turns them into probabilities.
"""

from __future__ import annotations

import math

import numpy as np

from fashionbench.errors import UserError

ECE_BINS = 15                     # equal-width confidence bins (Guo et al. 2017 use 15)
PROB_FLOOR = 1e-7                 # as scores.py's log loss: float16 storage rounds tiny p to 0
TEMPERATURE_BOUNDS = (0.01, 100.0)  # the search interval of T (log-spaced search)


class CalibrationError(UserError):
    """Too few images to fit a temperature; the message names the params.yaml key to change."""


# ---------------------------------------------------------------- metrics


def confidence_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """The reliability diagram's points: for each non-empty equal-width bin of top-1
    confidence, {bin (0-based), confidence (mean top-1 probability), accuracy, count}."""
    confidence, correct = _top1(probs, labels)
    which = _bin_of(confidence, bins)
    out = []
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        if count:
            out.append({"bin": b, "confidence": float(confidence[inside].mean()),
                        "accuracy": float(correct[inside].mean()), "count": count})
    return out


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| over `bins` equal-width bins of top-1 confidence
    (Guo et al. 2017)."""
    n = len(labels)
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"])
                     for b in confidence_bins(probs, labels, bins)))


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over images of sum_k (p_k - y_k)^2, y one-hot (in [0, 2]; not divided by classes)."""
    p = np.asarray(probs, dtype=np.float64)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true class, clipped at PROB_FLOOR."""
    true_class = np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(true_class, PROB_FLOOR, 1.0)).mean())


def _top1(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    return p.max(axis=1), (p.argmax(axis=1) == labels).astype(np.float64)


def _bin_of(confidence: np.ndarray, bins: int) -> np.ndarray:
    """0-based bin of each confidence: bin b holds (b/bins, (b+1)/bins]; 0 goes to bin 0."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.clip(np.digitize(confidence, edges, right=True) - 1, 0, bins - 1)


# ---------------------------------------------------------------- temperature scaling


def log_probabilities(probs: np.ndarray) -> np.ndarray:
    """log p in float64, p clipped at PROB_FLOOR (a stored 0 is a probability below float16's
    resolution, not an impossibility)."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), PROB_FLOOR, 1.0))


def scale(log_probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log_probs / temperature), row by row, in float64."""
    z = log_probs / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(log_probs: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of softmax(log_probs / temperature)."""
    from scipy.special import logsumexp

    z = log_probs / temperature
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(labels)), labels]))


def fit_temperature(log_probs: np.ndarray, labels: np.ndarray, key: str,
                    bins: int = ECE_BINS) -> float:
    """The T in TEMPERATURE_BOUNDS minimising the NLL of softmax(log_probs / T): a bounded
    Brent search on log T (the NLL is convex in 1/T, so unimodal in log T).

    Fewer images than ECE bins is a CalibrationError naming `key`, the params.yaml key that
    sets how many test images there are."""
    from scipy.optimize import minimize_scalar

    if len(labels) < bins:
        raise CalibrationError(
            f"params.yaml: {key}: a temperature would be fitted on {len(labels)} images, fewer "
            f"than the {bins} ECE bins; evaluate at least {2 * bins} test images (each half of "
            "the test set fits the other half's temperature)")
    low, high = (math.log(t) for t in TEMPERATURE_BOUNDS)
    found = minimize_scalar(lambda u: nll(log_probs, labels, math.exp(u)), bounds=(low, high),
                            method="bounded", options={"xatol": 1e-6})
    return float(math.exp(found.x))


def stratified_halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint, class-stratified halves of range(len(labels)) (sorted indices; the first
    holds floor(N/2)), seeded."""
    from fashionbench.data import stratified_take

    first = stratified_take(labels, len(labels) // 2, seed)
    return first, np.setdiff1d(np.arange(len(labels)), first)


def cross_fitted(log_probs: np.ndarray, labels: np.ndarray, seed: int,
                 key: str) -> tuple[np.ndarray, tuple[float, float], tuple[np.ndarray, np.ndarray]]:
    """Two-fold temperature scaling: (scaled probabilities of every image, (T_a, T_b),
    (half a, half b)). T_a is fitted on half a and scales half b; T_b the other way round,
    so no image is scored with a temperature its own label helped to fit."""
    half_a, half_b = stratified_halves(labels, seed)
    t_a = fit_temperature(log_probs[half_a], labels[half_a], key)
    t_b = fit_temperature(log_probs[half_b], labels[half_b], key)
    scaled = np.empty_like(log_probs)
    scaled[half_b] = scale(log_probs[half_b], t_a)
    scaled[half_a] = scale(log_probs[half_a], t_b)
    return scaled, (t_a, t_b), (half_a, half_b)


def calibration(probs: np.ndarray, labels: np.ndarray, seed: int, key: str,
                probabilities: bool = True) -> tuple[dict, list[dict]]:
    """A run's calibration figures and its reliability points.

    Figures: ece, brier, log_loss (of the probabilities as stored; None when `probabilities`
    is False, as for a softmax of SVM scores), the same after two-fold temperature scaling
    (ece_ts, brier_ts, log_loss_ts), the two temperatures (temperature_a: fitted on half a,
    applied to half b; temperature_b) and their geometric mean `temperature`, a one-number
    summary. Points: confidence_bins of both (`probabilities`: "model" or
    "temperature-scaled"; "model" only for probabilities)."""
    log_probs = log_probabilities(probs)
    scaled, (t_a, t_b), _ = cross_fitted(log_probs, labels, seed, key)
    before = {"ece": expected_calibration_error(probs, labels), "brier": brier_score(probs, labels),
              "log_loss": log_loss(probs, labels)}
    if not probabilities:
        before = dict.fromkeys(before)
    figures = before | {"ece_ts": expected_calibration_error(scaled, labels),
                        "brier_ts": brier_score(scaled, labels), "log_loss_ts": log_loss(scaled, labels),
                        "temperature": math.sqrt(t_a * t_b), "temperature_a": t_a, "temperature_b": t_b}
    points = [{"probabilities": "temperature-scaled", **b} for b in confidence_bins(scaled, labels)]
    if probabilities:
        points = [{"probabilities": "model", **b} for b in confidence_bins(probs, labels)] + points
    return figures, points
