"""Dataset statistics and figures for the stats stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fashionbench.data import Split
from fashionbench.dataset import Dataset
from fashionbench.io import save_figure
from fashionbench.params import Stats


def summary(train: Split, test: Split) -> dict:
    """The tracked numbers (metrics/stats.json): image counts, train pixel mean/std (pixels
    in [0, 1])."""
    pixels = train.images.astype(np.float64) / 255.0
    return {"train_images": len(train), "test_images": len(test),
            "train_mean": round(float(pixels.mean()), 6), "train_std": round(float(pixels.std()), 6)}


def description(train: Split, test: Split, classes: tuple[str, ...]) -> dict:
    """reports/dataset.json: the summary plus image shape and per-class counts, which a reader
    looks up rather than compares across experiments."""
    def counts(split: Split) -> dict[str, int]:
        per_class = np.bincount(split.labels, minlength=len(classes))
        return {name: int(n) for name, n in zip(classes, per_class)}

    return summary(train, test) | {"image_shape": list(train.images.shape[1:]),
                                   "train_per_class": counts(train), "test_per_class": counts(test)}


def _seeded_subset(split: Split, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(split), size=min(size, len(split)), replace=False))
    return split.images[idx].reshape(len(idx), -1) / 255.0, split.labels[idx]


def write_figures(train: Split, cfg: Stats, seed: int, out_dir: Path, dataset: Dataset) -> None:
    """Sample sprite, class means, PCA and t-SNE maps and pixel histogram as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _sprite(train, cfg.sprite_per_class, seed, out_dir / "samples.png", dataset)
    _class_means(train, out_dir / "class_means.png", dataset.classes)
    _embedding(train, "pca", cfg.pca_size, seed, cfg.tsne_perplexity, out_dir / "pca.png", dataset.classes)
    _embedding(train, "tsne", cfg.tsne_size, seed, cfg.tsne_perplexity, out_dir / "tsne.png", dataset.classes)
    _histogram(train, out_dir / "pixel_histogram.png")


def _sprite(train: Split, per_class: int, seed: int, path: Path, dataset: Dataset) -> None:
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(dataset.classes), per_class, figsize=(per_class * 0.9, len(dataset.classes)),
                             squeeze=False)
    for label, name in enumerate(dataset.classes):
        chosen = rng.choice(np.flatnonzero(train.labels == label), size=per_class, replace=False)
        for col, index in enumerate(chosen):
            ax = axes[label, col]
            ax.imshow(train.images[index], cmap="gray_r", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[label, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"{dataset.display_name} training samples ({per_class} per class)")
    save_figure(fig, path, dpi=100)


def _class_means(train: Split, path: Path, classes: tuple[str, ...]) -> None:
    import matplotlib.pyplot as plt

    rows = -(-len(classes) // 5)
    fig, axes = plt.subplots(rows, 5, figsize=(10, 2.3 * rows), squeeze=False)
    for ax in axes.flat[len(classes):]:
        ax.axis("off")
    for label, (name, ax) in enumerate(zip(classes, axes.flat)):
        mean = train.images[train.labels == label].mean(axis=0)
        ax.imshow(mean / 255.0 if mean.ndim == 3 else mean, cmap="gray_r")  # colour: RGB in [0, 1]
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Mean training image per class")
    save_figure(fig, path, dpi=100)


def _embedding(train: Split, method: str, size: int, seed: int, perplexity: float, path: Path,
               classes: tuple[str, ...]) -> None:
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    features, labels = _seeded_subset(train, size, seed)
    if method == "pca":
        points = PCA(n_components=2, random_state=seed).fit_transform(features)
        title, axis = "PCA of training images", "principal component"
    else:
        # t-SNE on 50 principal components: the usual denoising step, and far faster.
        reduced = PCA(n_components=min(50, len(features)), random_state=seed).fit_transform(features)
        points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                      n_jobs=-1).fit_transform(reduced)
        title, axis = "t-SNE of training images", "t-SNE dimension"
    fig, ax = plt.subplots(figsize=(8, 7))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo",
                        len(classes))
    for label, name in enumerate(classes):
        mask = labels == label
        ax.scatter(points[mask, 0], points[mask, 1], s=3, color=cmap(label), label=name)
    ax.set_title(f"{title} ({len(labels)} seeded samples, seed {seed})")
    ax.set_xlabel(f"{axis} 1")
    ax.set_ylabel(f"{axis} 2")
    ax.legend(markerscale=4, fontsize=8, loc="best")
    save_figure(fig, path, dpi=100)


def _histogram(train: Split, path: Path) -> None:
    import matplotlib.pyplot as plt

    counts = np.bincount(train.images.ravel(), minlength=256)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(np.arange(256), counts, width=1.0, color="tab:blue")
    ax.set_yscale("log")
    ax.set_title("Pixel intensity histogram, all training images")
    ax.set_xlabel("pixel value (0-255)")
    ax.set_ylabel("pixels (log scale)")
    save_figure(fig, path, dpi=100)
