"""Test-set evaluation: predictions -> metrics, flip TTA, mistakes gallery and Grad-CAM.

One run id names one trained model: "<model>-seed<N>" for the deep models and
"svm-<variant>" for the SVMs. evaluate_run() writes everything the evaluate stage records,
all of it small and kept in git, so that the table is rebuilt on a clone without the DVC
cache: metrics/eval/<id>.json, predictions/<id>.npz (test probabilities as float16, every
metric computed from exactly these), reports/runs/<id>.json (the training record's facts and
curves, carried over from the cached train outputs) and plots/eval/<id>/. Calibration
(fashionbench/calibration.py: ECE, Brier, log loss before and after two-fold temperature
scaling) goes into the metrics, its reliability points into plots/reliability/<id>.csv; the
accuracy on the corrupted test set (fashionbench/corrupt.py, data/corrupted) into the metrics
(summary) and reports/robustness/<id>.json (every corruption and severity).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fashionbench import calibration, corrupt
from fashionbench.augment import as_nchw, input_view, normalise, shift
from fashionbench.data import Split, load_prepared
from fashionbench.errors import UserError
from fashionbench.io import atomic_path, save_figure, write_json
from fashionbench.models import load_trained
from fashionbench.params import RUN_RECORDS, Evaluate, Params, run_ids
from fashionbench.scores import classification_metrics

SOFTMAX = "softmax"              # predictions/<id>.npz `kind`: model probabilities
SVM_SOFTMAX = "svm-score-softmax"  # softmax of SVM decision scores: not calibrated


class EvaluateError(UserError):
    """A trained model is missing or does not fit the test set; the message names the fix."""


# ---------------------------------------------------------------- run ids


@dataclass(frozen=True)
class Run:
    """One trained model to evaluate, and where its files live under the repository root."""

    id: str
    model: str            # deep row (a params section: cnn, resnet7, ...) or "svm"
    seed: int | None = None
    variant: str | None = None

    @property
    def is_svm(self) -> bool:
        return self.model == "svm"

    @property
    def artifact(self) -> Path:
        if self.is_svm:
            return Path("models/svm") / str(self.variant) / "test_scores.npz"
        return Path("models") / self.model / f"seed{self.seed}" / "model.pt"


def parse_run_id(run_id: str, params: Params) -> Run:
    """Run for "cnn-seed0" or "svm-rbf"; a UserError lists the valid ids otherwise."""
    runs = run_ids(params.svm, params.recipes, params.seeds)
    for known, row, seed in runs:
        if known == run_id:
            svm = row.startswith("svm-")
            return Run(run_id, "svm" if svm else row, seed, row[4:] if svm else None)
    valid = ", ".join(known for known, _, _ in runs)
    raise EvaluateError(f"unknown run id {run_id!r}; valid ids (from params.yaml): {valid}")


# ---------------------------------------------------------------- metrics


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, stable for large scores."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted.astype(np.float64))
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------- inference


def _inputs(images: np.ndarray, mean: float, std: float, device: torch.device,
            size: int = 0) -> torch.Tensor:
    """Stored uint8 images -> normalised float (N,C,size,size) on `device`, as a model trained
    at `size` px (0: as stored) sees images without augmentation."""
    x = as_nchw(torch.as_tensor(images, device=device))
    return normalise(input_view(x, size or x.shape[-1]), mean, std)


@torch.no_grad()
def predict_proba(model: nn.Module, images: np.ndarray, mean: float, std: float,
                  batch_size: int, device: torch.device, views: tuple[str, ...] = ("plain",),
                  batch_stats: bool = False, size: int = 0) -> np.ndarray:
    """Softmax probabilities (N, classes) float32, averaged over `views` (see `view`: "plain",
    "hflip", "shift 1 1", "hflip shift -1 -1", ...).

    `batch_stats` normalises batch-norm layers by each test batch's own statistics instead
    of the running ones: a diagnostic of stale running statistics, never a headline number.
    """
    model.eval().to(device)
    if batch_stats:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                m.track_running_stats, m.momentum = True, 0.0  # use batch stats, keep running ones
    out = []
    try:
        for start in range(0, len(images), batch_size):
            x = _inputs(images[start:start + batch_size], mean, std, device, size)
            probs = sum(model(view(x, name, black=-mean / std)).float().softmax(dim=1)
                        for name in views) / len(views)
            out.append(probs.cpu())
    finally:
        model.eval()
    return torch.cat(out).numpy().astype(np.float32)


def view(x: torch.Tensor, name: str, black: float) -> torch.Tensor:
    """One TTA view of a normalised batch: "plain", "hflip" (mirrored), "shift DY DX" (moved
    DY px down and DX px right, uncovered pixels set to `black`, the normalised 0 pixel, as
    training's crops fill them) or "hflip shift DY DX"."""
    words = name.split()
    if words[:1] == ["hflip"]:
        x, words = x.flip(dims=[-1]), words[1:]
    if words[:1] == ["shift"] and len(words) == 3:
        dy, dx = (torch.full((len(x),), int(w), device=x.device) for w in words[1:])
        return shift(x - black, dy, dx) + black
    if words not in ([], ["plain"]):
        raise ValueError(f"unknown TTA view {name!r}")
    return x


def shifted_views(px: int) -> tuple[str, ...]:
    """The translate part of flip + translate TTA (airbench): up-left and down-right by `px`,
    each plain and mirrored."""
    return tuple(f"{flip}shift {d} {d}" for d in (-px, px) for flip in ("", "hflip "))


def load_model(run: Run, root: Path, device: torch.device) -> tuple[nn.Module, dict]:
    """The trained model of a deep run; the registry checks its input shape and class count."""
    try:
        return load_trained(root / run.artifact, device)
    except UserError as err:  # the registry names the file and the stage; add the run
        raise EvaluateError(f"{run.id}: {err}") from err


def load_svm_scores(run: Run, root: Path, test: Split, num_classes: int) -> np.ndarray:
    """Decision scores (N, classes) of an SVM run, checked against the test set."""
    path = root / run.artifact
    rerun = f"re-run `dvc repro train_svm@{run.variant}`"
    if not path.is_file():
        raise EvaluateError(f"{run.id}: test scores {run.artifact} are missing: {rerun}")
    try:
        with np.load(path) as saved:
            scores, labels = saved["scores"], saved["labels"]
    except Exception as err:  # truncated or foreign file
        raise EvaluateError(f"{run.id}: {run.artifact} is unreadable ({type(err).__name__}): {rerun}") from None
    if scores.shape != (len(test), num_classes):
        raise EvaluateError(f"{run.id}: {run.artifact} holds scores of shape {scores.shape}, "
                            f"expected {(len(test), num_classes)}: {rerun}")
    if not np.array_equal(labels, test.labels):
        raise EvaluateError(f"{run.id}: {run.artifact} was scored on another test set: {rerun}")
    return scores.astype(np.float32)


# ---------------------------------------------------------------- Grad-CAM


def gradcam_layer(model: nn.Module) -> nn.Module | None:
    """The module whose output maps Grad-CAM weighs, or None for a model without convs.

    Every conv model of the registry is `features` (a Sequential of conv stages, then global
    pooling) and a classifier: the maps are the output of the last stage before the pooling
    (the last conv block). The last nn.Conv2d in module order would be wrong: squeeze-
    excitation gates and projection shortcuts register 1x1 convs after the main path.
    """
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        return None
    if not any(isinstance(m, nn.Conv2d) for m in features.modules()):
        return None
    stages = list(features)
    pooled = [i for i, m in enumerate(stages) if isinstance(m, (nn.AdaptiveAvgPool2d, nn.Flatten))]
    return stages[pooled[0] - 1] if pooled else stages[-1]


def gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Grad-CAM maps (B,H,W) in [0, 1] of class `target` for input `x`, resized to x's size."""
    saved: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        saved["act"] = output.detach()
        output.register_hook(lambda grad: saved.__setitem__("grad", grad.detach()))
        return output.clone()  # later in-place ops (ReLU(inplace)) must not touch the saved tensor

    handle = layer.register_forward_hook(keep)
    try:
        model.eval().zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = model(x)
            logits.gather(1, target[:, None]).sum().backward()
    finally:
        handle.remove()
    weights = saved["grad"].mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * saved["act"]).sum(dim=1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    cam = cam[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12)
    return (cam / peak[:, None, None]).cpu().numpy()


def one_per_class(labels: np.ndarray, count: int, num_classes: int) -> np.ndarray:
    """Fixed test indices: the first image of each class in turn, then the second, ..."""
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    picks = [by_class[i % num_classes][i // num_classes] for i in range(count)
             if i // num_classes < len(by_class[i % num_classes])]
    return np.array(picks, dtype=np.int64)


# ---------------------------------------------------------------- figures


def _figure_grid(count: int, cols: int, rows_per_item: int = 1, row_height: float = 1.9):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-count // cols) * rows_per_item
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, row_height * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes


def mistakes_gallery(images: np.ndarray, labels: np.ndarray, probs: np.ndarray, count: int,
                     path: Path, classes: tuple[str, ...], prob_label: str = "p") -> None:
    """PNG of the `count` most confident mistakes: image, true class, predicted class and prob."""
    pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(pred != labels)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:count]
    fig, axes = _figure_grid(max(len(wrong), 1), cols=6, row_height=2.3)
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"true {classes[labels[i]]}\npred {classes[pred[i]]}\n"
                     f"{prob_label} {probs[i, pred[i]]:.2f}", fontsize=7)
    fig.suptitle(f"{len(wrong)} most confident mistakes", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def gradcam_grid(images: np.ndarray, cams: np.ndarray, labels: np.ndarray, pred: np.ndarray,
                 path: Path, classes: tuple[str, ...]) -> None:
    """PNG: each image above its Grad-CAM overlay for the predicted class."""
    cols = min(len(images), len(classes))
    fig, axes = _figure_grid(len(images), cols, rows_per_item=2)
    for k, (image, cam) in enumerate(zip(images, cams)):
        top, bottom = axes[2 * (k // cols), k % cols], axes[2 * (k // cols) + 1, k % cols]
        top.imshow(image, cmap="gray", vmin=0, vmax=255)
        top.set_title(f"true {classes[labels[k]]}\npred {classes[pred[k]]}", fontsize=7)
        bottom.imshow(image, cmap="gray", vmin=0, vmax=255)
        bottom.imshow(cam, cmap="jet", alpha=0.5, vmin=0, vmax=1)
    fig.suptitle("Grad-CAM of the predicted class (last conv stage)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def first_layer_weights(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[np.ndarray, str] | None:
    """The first layer's weights as images (N, h, w) and what they are: a conv layer's filters
    or, for a layer reading the flattened (C, H, W) image, each unit's weights over the pixels
    (first input channel in both). None when the first weighted layer is neither."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    weight = first.weight.detach().float().cpu() if first is not None else None
    if isinstance(first, nn.Conv2d):
        return weight[:, 0].numpy(), f"first conv layer: {weight.shape[0]} filters {weight.shape[2]}x{weight.shape[3]}"
    if isinstance(first, nn.Linear) and first.in_features == math.prod(input_shape):
        _, height, width = input_shape
        return (weight.reshape(-1, *input_shape)[:, 0].numpy(),
                f"first layer: {weight.shape[0]} units' weights over the {height}x{width} pixels")
    return None


def weight_map(maps: np.ndarray, title: str, path: Path, limit: int = 64) -> None:
    """PNG of up to `limit` weight maps as tiles, each on its own symmetric colour scale."""
    maps = maps[:limit]
    cols = min(len(maps), 16)
    fig, axes = _figure_grid(len(maps), cols, row_height=1.0)
    fig.set_size_inches(0.9 * cols, 0.95 * axes.shape[0] + 0.5)
    for ax, tile in zip(axes.flat, maps):
        scale = float(np.abs(tile).max()) or 1.0
        ax.imshow(tile, cmap="RdBu_r", vmin=-scale, vmax=scale)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def write_confusion_csv(labels: np.ndarray, pred: np.ndarray, path: Path, classes: tuple[str, ...]) -> None:
    """actual,predicted per test image as class names: the input of DVC's confusion template."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[a], classes[p]) for a, p in zip(labels, pred))


def write_reliability_csv(points: list[dict], path: Path) -> None:
    """probabilities,bin,confidence,accuracy,count per non-empty confidence bin: the
    reliability diagram of the model's probabilities ("model", not for SVM score softmaxes)
    and of the two-fold temperature-scaled ones ("temperature-scaled")."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, ["probabilities", "bin", "confidence", "accuracy", "count"])
        writer.writeheader()
        writer.writerows({**p, "confidence": f"{p['confidence']:.6f}", "accuracy": f"{p['accuracy']:.6f}"}
                         for p in points)


def _predictor(run: Run, root: Path, cfg: Evaluate):  # noqa: ANN202 (images -> classes)
    """Predicted classes of a run for uint8 images as stored: a deep model's plain view in
    eval mode (no TTA), an SVM's fitted pipeline (models/svm/<variant>/model.joblib)."""
    if run.is_svm:
        return corrupt.svm_predictor(root / "models/svm" / str(run.variant) / "model.joblib", run.id,
                                     f"train_svm@{run.variant}")
    from fashionbench.train import resolve_device

    device = resolve_device(cfg.device)
    model, meta = load_model(run, root, device)
    norm = {"mean": meta["mean"], "std": meta["std"], "batch_size": cfg.batch_size, "device": device,
            "size": meta["input_shape"][-1]}
    return lambda images: predict_proba(model, images, **norm).argmax(axis=1)


# ---------------------------------------------------------------- the stage


def evaluate_run(run_id: str, params: Params, root: Path = Path(".")) -> dict:
    """Evaluate one run on the test set and write its metrics, plots and predictions.

    Headline: plain single-view accuracy and macro F1. `tta_accuracy` (flip TTA) is separate,
    and only for rows trained with horizontal flips: a model never shown a flip is not
    invariant to one. Models with batch norm also report the batch-statistics accuracy, a
    check that the running statistics match the final weights. Calibration (before and after
    two-fold temperature scaling) comes from the stored probabilities; the corrupted test set
    is scored with the plain view (no TTA), or the SVM's fitted pipeline.
    """
    run = parse_run_id(run_id, params)
    cfg = params.evaluate
    classes = params.dataset.classes
    test = load_prepared(root / "data/prepared", params.dataset).test
    corrupted = corrupt.load(root / corrupt.CORRUPTED_DIR, params.dataset.stored_shape)
    plots = root / "plots/eval" / run.id
    if run.is_svm:
        probs, info = softmax(load_svm_scores(run, root, test, len(classes))), {}
    else:
        probs, info = _deep_predictions(run, root, test, cfg, plots, classes)
    kind = SVM_SOFTMAX if run.is_svm else SOFTMAX
    probs = stored_probabilities(probs)  # every figure below is computed from what git keeps
    pred = probs.argmax(axis=1)
    # Softmax of SVM decision scores is not a calibrated probability: no log loss for it.
    metrics = classification_metrics(test.labels, pred, len(classes), None if run.is_svm else probs)
    # The temperature is fitted on half of the test set the stage evaluates: its size is
    # quick_scale.test_size in the quick run, the dataset's whole test set otherwise.
    calibrated, reliability = calibration.calibration(
        probs, test.labels, cfg.calibration_seed, "quick_scale.test_size" if params.quick else "data.name",
        probabilities=not run.is_svm)
    robust, grid = corrupt.robustness(corrupt.accuracy_grid(_predictor(run, root, cfg), corrupted), corrupted)
    result = (metrics | {k: v for k, v in info.items() if v is not None}
              | {"calibration": calibrated, "robustness": robust})
    write_confusion_csv(test.labels, pred, root / "plots/confusion" / f"{run.id}.csv", classes)
    write_reliability_csv(reliability, root / "plots/reliability" / f"{run.id}.csv")
    write_json(root / "reports/robustness" / f"{run.id}.json", grid)
    mistakes_gallery(test.images, test.labels, probs, cfg.gallery_size, plots / "mistakes.png", classes,
                     prob_label="score softmax" if run.is_svm else "p")
    write_json(root / "metrics/eval" / f"{run.id}.json", result)
    write_predictions(root / "predictions" / f"{run.id}.npz", probs, test.labels, kind)
    write_json(root / RUN_RECORDS / f"{run.id}.json", run_record(run, root))
    return result


def stored_probabilities(probs: np.ndarray) -> np.ndarray:
    """Probabilities as predictions/<id>.npz keeps them: float16 (10,000 x 10 is 200 KB, a
    tenth of a percent of resolution), returned as float32 for arithmetic."""
    return probs.astype(np.float16).astype(np.float32)


def write_predictions(path: Path, probs: np.ndarray, labels: np.ndarray, kind: str) -> None:
    """predictions/<id>.npz: probs (N, classes) float16, labels uint8, kind. np.savez_compressed
    writes no timestamps, so equal arrays give equal bytes."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, probs=probs.astype(np.float16), labels=labels.astype(np.uint8),
                            kind=np.array(kind))


def run_record(run: Run, root: Path) -> dict:
    """What the table needs of a run's training record (metrics/train/<id>.json, a cached
    output) and its per-epoch curves (plots/train/<id>/, DVCLive TSVs): carried into git
    here so the compare stage never reads the cache."""
    train_path = root / "metrics/train" / f"{run.id}.json"
    try:
        record = json.loads(train_path.read_text())
    except (OSError, ValueError) as err:
        stage = f"train_svm@{run.variant}" if run.is_svm else f"train_{run.model}@{run.seed}"
        raise EvaluateError(f"{train_path} is unreadable ({err}): re-run `dvc repro {stage}`") from None
    curves_dir = root / "plots/train" / run.id / "plots/metrics"
    record["curves"] = {str(tsv.relative_to(curves_dir).with_suffix("")): read_curve(tsv)
                        for tsv in sorted(curves_dir.rglob("*.tsv"))}
    return record


def read_curve(path: Path) -> list[list[float]]:
    """[[step, value], ...] of a DVCLive .tsv (columns step, <name>, maybe timestamp)."""
    with open(path, newline="") as f:
        return [[float(r["step"]), float(r[path.stem])] for r in csv.DictReader(f, delimiter="\t")]


def _deep_predictions(run: Run, root: Path, test: Split, cfg: Evaluate, plots: Path,
                      classes: tuple[str, ...]) -> tuple[np.ndarray, dict]:
    """Plain test probabilities of a deep run and its TTA and batch-statistics accuracies;
    draws its Grad-CAM grid."""
    from fashionbench.train import resolve_device

    device = resolve_device(cfg.device)
    model, meta = load_model(run, root, device)
    if tuple(meta["dataset"]["classes"]) != tuple(classes):
        raise EvaluateError(f"{run.id}: {run.artifact} was trained on {meta['dataset']['name']}, not "
                            f"the dataset params.yaml names: re-run `dvc repro train_{run.model}`")
    size = meta["input_shape"][-1]
    norm = {"mean": meta["mean"], "std": meta["std"], "batch_size": cfg.batch_size, "device": device,
            "size": size}
    probs = predict_proba(model, test.images, **norm)
    info: dict = {}
    if cfg.tta and meta.get("hflip", 0.0) > 0:
        flipped = predict_proba(model, test.images, views=("hflip",), **norm)
        tta = (probs + flipped) / 2  # the plain view's pass is already done: one pass, not two
        shift_px = int(meta.get("tta_shift", 0))
        if shift_px:  # the row's translate TTA: the four shifted views take half the weight
            tta = (tta + predict_proba(model, test.images, views=shifted_views(shift_px), **norm)) / 2
            info["tta_shift"] = shift_px
        info["tta_accuracy"] = float(np.mean(tta.argmax(axis=1) == test.labels))
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        batch = predict_proba(model, test.images, batch_stats=True, **norm)
        info["batchstat_accuracy"] = float(np.mean(batch.argmax(axis=1) == test.labels))
    weights = first_layer_weights(model, tuple(meta["input_shape"]))
    if weights is not None:
        maps, title = weights
        shown = f" (the first {min(len(maps), 64)})" if len(maps) > 64 else ""
        weight_map(maps, title + shown, plots / "first_layer.png")
    layer = gradcam_layer(model)
    if layer is not None:
        idx = one_per_class(test.labels, cfg.gradcam_images, len(classes))
        pred = probs[idx].argmax(axis=1)
        x = _inputs(test.images[idx], meta["mean"], meta["std"], device, size)
        cams = gradcam(model, layer, x, torch.as_tensor(pred, device=device))
        gradcam_grid(test.images[idx], cams, test.labels[idx], pred, plots / "gradcam.png", classes)
    return probs, info
