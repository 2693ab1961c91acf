"""The corrupted test set (stage corrupt) and a run's accuracy on it, in the spirit of MNIST-C
(Mu and Gilmer 2019) and CIFAR-10-C (Hendrycks and Dietterich 2019).

A fixed, seeded, class-stratified subset of the official test images is corrupted by every
corruption params.yaml lists (`corrupt.corruptions`), at every severity it lists (1-5, each a
value of SEVERITIES below, the benchmark's definition, versioned with this file). Every
corruption is a small pure function (uint8 images (N, H, W) or (N, H, W, C), severity,
np.random.Generator) -> uint8 images of the same shape; its generator is seeded from
(corrupt.seed, the corruption's name, the severity), so each (corruption, severity) is
reproducible on its own, whatever else the list holds.

data/corrupted/ holds corrupted.npz (images uint8 [corruption, severity, image, H, W(, C)],
labels, indices into the official test set, corruption names, severities) and manifest.json
(checksums of the file and of each corruption's images, the severity values, the library
versions that made them: JPEG and interpolation can change across versions).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fashionbench.errors import UserError

CORRUPTED_DIR = Path("data/corrupted")
CORRUPTED_FILE = "corrupted.npz"
MANIFEST = "manifest.json"
EXAMPLES = Path("plots/corrupt/examples.png")
MAX_SEVERITY = 5

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

# Each corruption's value at severities 1..5, and its unit. Chosen so that severity 1 is a
# nuisance a person ignores and 5 leaves the garment recognisable to a person on 28x28 images.
SEVERITIES: dict[str, tuple[tuple[float, ...], str]] = {
    "gaussian_noise": ((0.08, 0.12, 0.18, 0.26, 0.38), "noise std, fraction of full scale"),
    "shot_noise": ((60, 25, 12, 5, 3), "photons at full scale (Poisson; fewer is noisier)"),
    "gaussian_blur": ((0.5, 0.75, 1.0, 1.5, 2.0), "blur std, px"),
    "contrast": ((0.6, 0.45, 0.3, 0.2, 0.1), "factor on the distance to the image's mean"),
    "brightness": ((0.1, 0.2, 0.3, 0.4, 0.5), "added, fraction of full scale"),
    "translate": ((2, 3, 4, 5, 6), "shift, px, in a random direction per image"),
    "rotate": ((8, 15, 22, 30, 40), "degrees, random sign per image"),
    "zoom": ((0.9, 0.8, 0.7, 0.6, 0.5), "zoom-out factor about the centre"),
    "elastic": ((0.5, 1.0, 1.5, 2.0, 2.5), "RMS displacement, px, of a field smoothed over 4 px"),
    "jpeg": ((40, 25, 15, 10, 5), "JPEG quality"),
}
ELASTIC_SMOOTHING_PX = 4.0


class CorruptedSetError(UserError):
    """data/corrupted is missing, unreadable or not the one its manifest describes."""


# ---------------------------------------------------------------- helpers


def _level(name: str, severity: int) -> float:
    if not 1 <= severity <= MAX_SEVERITY:
        raise ValueError(f"{name}: severity {severity} is outside 1..{MAX_SEVERITY}")
    return SEVERITIES[name][0][severity - 1]


def _unit(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / np.float32(255)


def _bytes(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)


def _channels_last(images: np.ndarray) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) -> (N, H, W, C)."""
    return images[..., None] if images.ndim == 3 else images


def _like(out: np.ndarray, images: np.ndarray) -> np.ndarray:
    return out[..., 0] if images.ndim == 3 else out


def _each_image(images: np.ndarray, apply: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    """apply(image (H, W[, C]) float in [0, 1], index) for every image, back to uint8."""
    x = _unit(images)
    return _bytes(np.stack([apply(x[i], i) for i in range(len(x))])) if len(x) else images.copy()


# ---------------------------------------------------------------- the corruptions


def gaussian_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise (sensor read noise)."""
    sigma = _level("gaussian_noise", severity)
    return _bytes(_unit(images) + rng.normal(0.0, sigma, images.shape).astype(np.float32))


def shot_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Poisson photon noise: dark pixels stay dark, bright ones fluctuate."""
    photons = _level("shot_noise", severity)
    return _bytes(rng.poisson(_unit(images) * photons).astype(np.float32) / np.float32(photons))


def gaussian_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Defocus: skimage.filters.gaussian over the image axes only."""
    from skimage.filters import gaussian

    sigma = _level("gaussian_blur", severity)
    x = _channels_last(_unit(images))
    return _like(_bytes(gaussian(x, sigma=(0, sigma, sigma, 0), mode="nearest")), images)


def contrast(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Every pixel moved towards the image's mean (a washed-out, low-contrast image)."""
    factor = _level("contrast", severity)
    x = _unit(images)
    mean = x.mean(axis=tuple(range(1, x.ndim)), keepdims=True)
    return _bytes((x - mean) * np.float32(factor) + mean)


def brightness(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A constant added to every pixel, clipped at white (the dark background lightens)."""
    return _bytes(_unit(images) + np.float32(_level("brightness", severity)))


def translate(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A whole-pixel shift of `severity`'s length in a random direction per image; the
    uncovered border is 0 (the background of Fashion-MNIST)."""
    shift = _level("translate", severity)
    angle = rng.uniform(0.0, 2 * math.pi, len(images))
    dy, dx = np.rint(shift * np.sin(angle)).astype(int), np.rint(shift * np.cos(angle)).astype(int)
    pad = int(math.ceil(shift))
    x = _channels_last(images)
    height, width = x.shape[1:3]
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = np.arange(height)[None, :] + (pad - dy)[:, None]   # output row r reads input r - dy
    cols = np.arange(width)[None, :] + (pad - dx)[:, None]
    n = np.arange(len(x))[:, None, None]
    return _like(padded[n, rows[:, :, None], cols[:, None, :]], images)


def rotate(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """skimage.transform.rotate about the centre (bilinear), by `severity`'s angle with a
    random sign per image; the uncovered corners are 0."""
    from skimage.transform import rotate as sk_rotate

    angle = _level("rotate", severity)
    signs = rng.choice([-1.0, 1.0], len(images))
    return _each_image(images, lambda image, i: sk_rotate(image, signs[i] * angle, order=1,
                                                          mode="constant", cval=0.0))


def zoom(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Zoom out: the image shrunk about its centre (skimage.transform.warp, bilinear), the
    garment seen from farther away; the border is 0."""
    from skimage.transform import AffineTransform, warp

    factor = _level("zoom", severity)
    x = _channels_last(_unit(images))
    n, height, width, channels = x.shape
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    # warp maps output coordinates to input ones: scale by 1/factor about the centre
    inverse = AffineTransform(scale=1 / factor, translation=centre - centre / factor)
    stacked = x.transpose(1, 2, 0, 3).reshape(height, width, n * channels)  # one warp for all
    out = warp(stacked, inverse, order=1, mode="constant", cval=0.0) if n else stacked
    return _like(_bytes(out.reshape(height, width, n, channels).transpose(2, 0, 1, 3)), images)


def elastic(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """torchvision's elastic_transform with a seeded displacement field per image: uniform
    noise smoothed over ELASTIC_SMOOTHING_PX, scaled to `severity`'s RMS displacement."""
    import torch
    from skimage.filters import gaussian
    from torchvision.transforms.v2 import functional as tvf

    rms = _level("elastic", severity)
    x = _channels_last(_unit(images))
    n, height, width, _ = x.shape
    field = rng.uniform(-1.0, 1.0, (n, height, width, 2))
    field = gaussian(field, sigma=(0, ELASTIC_SMOOTHING_PX, ELASTIC_SMOOTHING_PX, 0), mode="reflect")
    field *= rms / np.sqrt((field ** 2).sum(axis=-1).mean(axis=(1, 2)))[:, None, None, None]
    field /= np.array([width / 2, height / 2])  # px -> grid_sample's [-1, 1] units (x, y)
    out = [tvf.elastic_transform(torch.from_numpy(x[i].transpose(2, 0, 1)).contiguous(),
                                 torch.from_numpy(field[i:i + 1]).float(), fill=[0.0])
           for i in range(n)]
    stacked = torch.stack(out).numpy().transpose(0, 2, 3, 1) if n else x
    return _like(_bytes(stacked), images)


def jpeg(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """JPEG compression at `severity`'s quality (Pillow, through memory)."""
    from PIL import Image

    quality = int(_level("jpeg", severity))

    def compress(image: np.ndarray) -> np.ndarray:
        original, buffer = Image.fromarray(image), io.BytesIO()
        original.save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            return np.asarray(decoded.convert(original.mode))

    return np.stack([compress(image) for image in images]) if len(images) else images.copy()


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "gaussian_blur": gaussian_blur,
    "contrast": contrast, "brightness": brightness, "translate": translate, "rotate": rotate,
    "zoom": zoom, "elastic": elastic, "jpeg": jpeg,
}
RANDOM = ("gaussian_noise", "shot_noise", "translate", "rotate", "elastic")  # use their generator


def generator(seed: int, name: str, severity: int) -> np.random.Generator:
    """The generator of one (corruption, severity): keyed by the name, not a list position."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), severity])


def corrupt(images: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """`images` under corruption `name` at `severity`, seeded by (seed, name, severity)."""
    return CORRUPTIONS[name](images, severity, generator(seed, name, severity))


# ---------------------------------------------------------------- the set


@dataclass(frozen=True)
class CorruptedSet:
    images: np.ndarray                # uint8 [corruption, severity, image, H, W(, C)]
    labels: np.ndarray                # (N,) int64
    indices: np.ndarray               # (N,) indices into the official test set
    corruptions: tuple[str, ...]
    severities: tuple[int, ...]


def build(test_images: np.ndarray, test_labels: np.ndarray, size: int, seed: int,
          corruptions: tuple[str, ...], severities: tuple[int, ...],
          key: str = "corrupt.subset_size") -> CorruptedSet:
    """Corrupt a stratified subset of `size` test images (seeded) every listed way; a size
    the test set cannot give is a ParamsError naming `key`."""
    from fashionbench.data import stratified_take
    from fashionbench.params import ParamsError

    classes = len(np.unique(test_labels))
    if not classes <= size <= len(test_labels):
        raise ParamsError(key, f"{size} images cannot be drawn from a test set of {len(test_labels)} "
                          f"images in {classes} classes: use between {classes} and {len(test_labels)}")
    indices = stratified_take(test_labels, size, seed)
    clean = test_images[indices]
    images = np.stack([np.stack([corrupt(clean, name, s, seed) for s in severities])
                       for name in corruptions])
    return CorruptedSet(images, test_labels[indices].astype(np.int64), indices.astype(np.int64),
                        tuple(corruptions), tuple(severities))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(corrupted: CorruptedSet, out_dir: Path, levels: dict | None = None) -> dict:
    """Write corrupted.npz (compressed; equal arrays give equal bytes) and manifest.json;
    return the manifest."""
    import PIL
    import skimage
    import torch
    import torchvision

    from fashionbench.io import atomic_path, write_json

    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=corrupted.images, labels=corrupted.labels.astype(np.uint8),
                        indices=corrupted.indices, corruptions=np.array(corrupted.corruptions),
                        severities=np.array(corrupted.severities, dtype=np.int64))
    content = buffer.getvalue()
    with atomic_path(Path(out_dir) / CORRUPTED_FILE) as tmp:
        tmp.write_bytes(content)
    manifest = {
        "file": CORRUPTED_FILE, "sha256": _sha256(content),
        "images": len(corrupted.labels), "shape": list(corrupted.images.shape),
        "corruptions": list(corrupted.corruptions), "severities": list(corrupted.severities),
        "images_sha256": {name: _sha256(corrupted.images[c].tobytes())
                          for c, name in enumerate(corrupted.corruptions)},
        "levels": levels or {name: {"values": list(SEVERITIES[name][0]), "unit": SEVERITIES[name][1]}
                             for name in corrupted.corruptions},
        "versions": {"numpy": np.__version__, "scikit-image": skimage.__version__,
                     "torch": torch.__version__, "torchvision": torchvision.__version__,
                     "pillow": PIL.__version__},
    }
    write_json(Path(out_dir) / MANIFEST, manifest)
    return manifest


REBUILD = "rebuild it with `dvc repro -f corrupt`"


def load(out_dir: Path = CORRUPTED_DIR, stored_shape: tuple[int, ...] | None = None) -> CorruptedSet:
    """data/corrupted as `save` wrote it, checked against its manifest's checksum and, when
    given, the dataset's stored image shape."""
    path, manifest_path = Path(out_dir) / CORRUPTED_FILE, Path(out_dir) / MANIFEST
    if not path.is_file() or not manifest_path.is_file():
        raise CorruptedSetError(f"{out_dir} has no corrupted test set: run `dvc repro corrupt` first")
    content = path.read_bytes()
    try:
        expected = json.loads(manifest_path.read_text())["sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptedSetError(f"{manifest_path} is unreadable ({type(err).__name__}): {REBUILD}") from None
    if _sha256(content) != expected:
        raise CorruptedSetError(f"{path} does not match the checksum in {manifest_path}: {REBUILD}")
    with np.load(io.BytesIO(content)) as saved:
        corrupted = CorruptedSet(saved["images"], saved["labels"].astype(np.int64), saved["indices"],
                                 tuple(str(n) for n in saved["corruptions"]),
                                 tuple(int(s) for s in saved["severities"]))
    if stored_shape is not None and corrupted.images.shape[3:] != tuple(stored_shape):
        raise CorruptedSetError(f"{path} holds images of shape {corrupted.images.shape[3:]}, not "
                                f"the dataset's {tuple(stored_shape)}: {REBUILD}")
    return corrupted


# ---------------------------------------------------------------- the figure


def examples_figure(clean: np.ndarray, corrupted: CorruptedSet, index: int, path: Path) -> None:
    """PNG: test image `index` of the set, clean and under every corruption and severity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fashionbench.io import save_figure

    rows, cols = len(corrupted.corruptions), len(corrupted.severities) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.35 * rows), squeeze=False)
    grey = clean.ndim == 2
    for r, name in enumerate(corrupted.corruptions):
        values, unit = SEVERITIES[name]
        for c in range(cols):
            ax = axes[r, c]
            image = clean if c == 0 else corrupted.images[r, c - 1, index]
            ax.imshow(image, cmap="gray" if grey else None, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            severity = corrupted.severities[c - 1] if c else None
            ax.set_title("clean" if c == 0 else f"{severity}: {values[severity - 1]:g}", fontsize=7)
        axes[r, 0].set_ylabel(name, fontsize=8)
    fig.suptitle(f"test image {int(corrupted.indices[index])} under every corruption and severity",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


# ---------------------------------------------------------------- scoring a run


def accuracy_grid(predict: Callable[[np.ndarray], np.ndarray], corrupted: CorruptedSet) -> np.ndarray:
    """Accuracy [corruption, severity] of `predict` (uint8 images -> predicted classes),
    called once per corruption on all its severities' images."""
    n_corr, n_sev, n = corrupted.images.shape[:3]
    grid = np.empty((n_corr, n_sev))
    for c in range(n_corr):
        images = corrupted.images[c].reshape(n_sev * n, *corrupted.images.shape[3:])
        correct = np.asarray(predict(images)).reshape(n_sev, n) == corrupted.labels[None, :]
        grid[c] = correct.mean(axis=1)
    return grid


def robustness(grid: np.ndarray, corrupted: CorruptedSet) -> tuple[dict, dict]:
    """(compact figures for metrics/eval, the full record for reports/robustness).

    mean_accuracy: over every corruption and severity; worst_corruption: the corruption of
    the lowest mean accuracy over its severities, and that accuracy; corruptions: each
    corruption's mean over severities."""
    per_corruption = grid.mean(axis=1)
    worst = int(per_corruption.argmin())
    summary = {"mean_accuracy": float(grid.mean()),
               "worst_corruption": corrupted.corruptions[worst],
               "worst_accuracy": float(per_corruption[worst]),
               "corruptions": {name: float(a) for name, a in zip(corrupted.corruptions, per_corruption)}}
    record = summary | {
        "images": int(len(corrupted.labels)), "severities": list(corrupted.severities),
        "accuracy": {name: {str(s): float(a) for s, a in zip(corrupted.severities, row)}
                     for name, row in zip(corrupted.corruptions, grid)},
        "severity_accuracy": {str(s): float(a) for s, a in zip(corrupted.severities, grid.mean(axis=0))},
    }
    return summary, record


def svm_predictor(model_path: Path, run_id: str, stage: str) -> Callable[[np.ndarray], np.ndarray]:
    """Predicted classes of a fitted SVM pipeline (models/svm/<variant>/model.joblib) for
    uint8 images, through `decision_scores`."""
    import joblib

    if not Path(model_path).is_file():
        raise UserError(f"{run_id}: {model_path} is missing: re-run `dvc repro {stage}`")
    model = joblib.load(model_path)
    classes = model.steps[-1][1].classes_
    return lambda images: classes[decision_scores(model, images).argmax(axis=1)]


def decision_scores(model, images: np.ndarray, chunk: int = 1024) -> np.ndarray:  # noqa: ANN001
    """The (N, classes) decision scores of a fitted SVM pipeline, as classical.score gives
    them, computed in chunks of `chunk` images.

    An SVC with a built-in kernel is scored by `svc_decision` (the same function through
    BLAS on every core: libsvm's prediction runs on one core at ~37-72 ms an image on the
    development CPU, 30-60 min for 50,000 corrupted images); anything else by its own
    decision_function."""
    from sklearn.pipeline import Pipeline
    from sklearn.svm import SVC

    front, clf = Pipeline(model.steps[:-1]), model.steps[-1][1]
    out = []
    for start in range(0, len(images), chunk):
        features = front.transform(images[start:start + chunk])
        if isinstance(clf, SVC) and (clf.kernel in ("rbf", "linear") or clf.kernel == "poly" and not clf.coef0):
            scores = svc_decision(clf, features)
        else:
            scores = clf.decision_function(features)
            if scores.ndim == 1:  # two classes: scikit-learn gives the second class's score
                scores = np.stack([-scores, scores], axis=1)
        out.append(np.asarray(scores, dtype=np.float64))
    return np.concatenate(out) if out else np.zeros((0, len(clf.classes_)))


def svc_decision(clf, features: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """SVC.decision_function (one-vs-rest shape, or [-s, s] for two classes, as
    classical.score) from the fitted support vectors, in float64 matrix products: the
    one-vs-one value of classes i < j is the sum over both classes' support vectors of
    dual_coef * k(sv, x), plus intercept_ (tests/test_corrupt.py checks it against libsvm)."""
    import torch
    from sklearn.utils.multiclass import _ovr_decision_function

    from fashionbench.classical import kernel_matrix

    if clf.kernel == "poly" and clf.coef0:
        raise ValueError("svc_decision: poly kernels with coef0 != 0 are not supported")
    x = torch.as_tensor(np.asarray(features, dtype=np.float64))
    sv = torch.as_tensor(np.asarray(clf.support_vectors_, dtype=np.float64))
    kernel = kernel_matrix(x, sv, clf.kernel, float(clf._gamma), int(clf.degree))
    n_classes = len(clf.classes_)
    starts = np.concatenate([[0], np.cumsum(clf.n_support_)])
    coef = torch.as_tensor(np.asarray(clf.dual_coef_, dtype=np.float64))
    # per class c: its support vectors' kernel values times each row of dual_coef
    parts = [kernel[:, starts[c]:starts[c + 1]] @ coef[:, starts[c]:starts[c + 1]].T
             for c in range(n_classes)]
    ovo = [parts[i][:, j - 1] + parts[j][:, i] for i in range(n_classes) for j in range(i + 1, n_classes)]
    dec = (torch.stack(ovo, dim=1) + torch.as_tensor(clf.intercept_)).numpy()
    if n_classes == 2:  # scikit-learn's public coefficients are sign-flipped: dec is its score
        return np.stack([-dec[:, 0], dec[:, 0]], axis=1)
    return _ovr_decision_function(dec < 0, -dec, n_classes)
