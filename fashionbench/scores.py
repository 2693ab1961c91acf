"""Scores of predicted classes against the true ones: the one home of accuracy, macro F1,
log loss and per-class accuracy, shared by evaluation and the results table."""

from __future__ import annotations

import numpy as np


def classification_metrics(labels: np.ndarray, pred: np.ndarray, num_classes: int,
                           probs: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy, macro F1 over `num_classes` classes, and log loss if `probs` (N, classes)
    are probabilities."""
    from sklearn.metrics import f1_score

    metrics = {
        "accuracy": float(np.mean(labels == pred)),
        "macro_f1": float(f1_score(labels, pred, labels=range(num_classes), average="macro",
                                   zero_division=0)),
    }
    if probs is not None:
        # Clipped so that one confident miss (a float32 probability of 0) stays finite.
        true_class = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)
        metrics["log_loss"] = float(-np.mean(np.log(true_class)))
    return metrics


def class_accuracy(labels: np.ndarray, pred: np.ndarray, classes: tuple[str, ...]) -> dict[str, float]:
    """Per-class accuracy (recall) keyed by class name; 0 for a class absent from `labels`."""
    from sklearn.metrics import recall_score

    recall = recall_score(labels, pred, labels=range(len(classes)), average=None, zero_division=0)
    return {name: float(r) for name, r in zip(classes, recall)}
