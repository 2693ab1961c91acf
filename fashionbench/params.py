"""params.yaml -> typed, frozen, validated objects.

params.yaml writes each default once: `train_defaults` for every deep recipe, `svm_defaults`
for every SVM recipe, `model` for the WRN family's shared shape. A recipe lists only what it
changes; the loader lays it over its defaults (a recipe's key wins, and `dvc exp run -S` edits
whichever key the user names, so the command line always wins). After merging, every key must
map to a field and every field must be present: a misspelt key, a wrong type or an impossible
value raises ParamsError naming the key, before a stage does any work.

`quick: true` scales sizes only (`quick_scale`: training, validation and test images, epochs,
images per epoch, t-SNE/PCA sizes): no model or recipe key changes with the scale.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

from ruamel.yaml import YAML, YAMLError

from fashionbench.dataset import DATASETS, FASHION_MNIST, Dataset, idx_dataset
from fashionbench.errors import UserError

PARAMS_FILE = Path("params.yaml")


class ParamsError(UserError, ValueError):
    """A params.yaml value is missing, misspelt, mistyped or impossible."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"params.yaml: {key}: {problem}")

    def under(self, prefix: str) -> ParamsError:
        """The same error with its key placed under `prefix`."""
        return ParamsError(f"{prefix}.{self.key}" if prefix else self.key, self.problem)


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ParamsError(key, problem)


# The dataset the file being validated names: sizes, pixel bounds and class counts are checked
# against it (`data` is read first).
_DATASET: contextvars.ContextVar[Dataset] = contextvars.ContextVar("dataset", default=FASHION_MNIST)


def _data() -> Dataset:
    return _DATASET.get()


# ---------------------------------------------------------------- data stages


@dataclass(frozen=True)
class IdxSet:
    """`data.name: idx`: any one-channel IDX set in MNIST's four-file layout."""

    classes: tuple[str, ...]   # class names, in label order
    image_side: int            # px; square images
    light_on_dark: bool        # bright subject on a dark background (as MNIST)


DATA_NAMES = (*DATASETS, "idx")


@dataclass(frozen=True)
class Data:
    name: str
    idx: IdxSet

    def __post_init__(self) -> None:
        _require(self.name in DATA_NAMES, "name", f"unknown dataset {self.name!r}; choose from "
                 f"{', '.join(DATA_NAMES)}" + _did_you_mean(self.name, DATA_NAMES))
        if self.name == "idx":
            classes = self.idx.classes
            _require(len(classes) >= 2 and len(set(classes)) == len(classes), "idx.classes",
                     "list the set's distinct class names in label order (at least two)")
            _require(8 <= self.idx.image_side <= 256, "idx.image_side", "must be in [8, 256] px")

    def dataset(self) -> Dataset:
        """The Dataset this section names."""
        if self.name == "idx":
            return idx_dataset(self.idx.classes, self.idx.image_side, self.idx.light_on_dark)
        return DATASETS[self.name]


@dataclass(frozen=True)
class Download:
    sources: tuple[str, ...]   # tried in order; () = the dataset's own mirrors
    timeout: float

    def __post_init__(self) -> None:
        _require(self.timeout > 0, "timeout", "must be > 0 seconds")


@dataclass(frozen=True)
class Stats:
    tsne_size: int
    tsne_perplexity: float
    pca_size: int
    sprite_per_class: int

    def __post_init__(self) -> None:
        _require(self.tsne_size >= 10, "tsne_size", "must be >= 10 images")
        _require(0 < self.tsne_perplexity < self.tsne_size, "tsne_perplexity",
                 "must be > 0 and smaller than tsne_size")
        _require(self.pca_size >= 10, "pca_size", "must be >= 10 images")
        _require(self.sprite_per_class >= 1, "sprite_per_class", "must be >= 1")


MIN_PER_CLASS = 10  # training images per class a split must leave


@dataclass(frozen=True)
class Preprocess:
    """The table's protocol: validation_size 0 trains on all 60,000 images, as the seed did."""

    validation_size: int
    subset_size: int
    seed: int

    def __post_init__(self) -> None:
        classes, train_images = _data().num_classes, _data().train_images or 10**9
        _require(self.validation_size == 0 or self.validation_size >= classes, "validation_size",
                 f"must be 0 (no validation split) or at least {classes} (one image per class)")
        _require(self.validation_size <= train_images - MIN_PER_CLASS * classes, "validation_size",
                 f"{self.validation_size} leaves too few of the {train_images} training images; "
                 f"use at most {train_images - MIN_PER_CLASS * classes}")
        left = train_images - self.validation_size
        _require(self.subset_size >= 0, "subset_size", "must be >= 0 (0 = all)")
        _require(self.subset_size <= left, "subset_size",
                 f"{self.subset_size} is more than the {left} training images left after the "
                 "validation split; lower it or use 0 for all")
        _require(self.subset_size == 0 or self.subset_size >= classes, "subset_size",
                 f"must be 0 or at least {classes} (one image per class)")


@dataclass(frozen=True)
class Sizes:
    """The split sizes preprocess applies: the `preprocess` section's or the quick scale's."""

    validation_size: int
    subset_size: int     # 0 = all training images left after the validation split
    test_size: int       # 0 = the whole official test set
    seed: int


# ---------------------------------------------------------------- SVM


SVM_FEATURES = ("raw", "hog", "pca")


@dataclass(frozen=True)
class SVM:
    features: str               # raw | hog | pca, or several joined with "+" (e.g. pca+hog)
    hog_input: Literal["pixels", "standardised"]
    scale: bool
    kernel: Literal["rbf", "poly", "linear", "rbf+poly"]
    C: float
    gamma: float
    degree: int
    hog_cells: tuple[int, ...]
    hog_block: int
    pca_components: int
    solver: Literal["libsvm", "nystroem"]
    nystroem_components: int
    cg_iterations: int
    train_size: int
    cv_folds: int
    cv_C: tuple[float, ...]
    cv_gamma: tuple[float, ...]

    def __post_init__(self) -> None:
        names = self.features.split("+")
        for name in names:
            _require(name in SVM_FEATURES, "features",
                     f"unknown feature {name!r}; choose from {', '.join(SVM_FEATURES)}, "
                     "or join several with + (e.g. pca+hog)" + _did_you_mean(name, SVM_FEATURES))
        _require(len(set(names)) == len(names), "features", f"{self.features!r} repeats a feature")
        _require(self.C > 0, "C", "must be > 0")
        _require(self.gamma >= 0, "gamma", "must be >= 0 (0 = 1/(n_features * variance))")
        _require(self.degree >= 1, "degree", "must be >= 1")
        side, values = _data().side, _data().pixels * _data().channels
        _require(all(0 < c <= side // 2 for c in self.hog_cells) and self.hog_cells, "hog_cells",
                 f"list pixel sizes between 1 and {side // 2}")
        _require(self.hog_block >= 1, "hog_block", "must be >= 1")
        _require(all((side // c) >= self.hog_block for c in self.hog_cells), "hog_block",
                 f"{self.hog_block} cells per block side do not fit a {side}-px image with "
                 f"{max(self.hog_cells)}-px cells")
        _require(0 <= self.pca_components <= values, "pca_components",
                 f"{self.pca_components} is impossible: images have {values} pixel values")
        _require("pca" not in names or self.pca_components > 0, "pca_components",
                 "must be > 0 with the pca feature")
        _require(self.solver != "nystroem" or self.nystroem_components > 0, "nystroem_components",
                 "must be > 0 with solver: nystroem")
        _require(self.cg_iterations >= 1, "cg_iterations", "must be >= 1")
        _require(self.train_size >= 0, "train_size", "must be >= 0 (0 = all)")
        _require(self.train_size == 0 or self.train_size >= 2 * _data().num_classes, "train_size",
                 f"must be 0 (all) or at least {2 * _data().num_classes} (two images per class)")
        _require(self.cv_folds == 0 or self.cv_folds >= 2, "cv_folds", "must be 0 (off) or >= 2")
        _require(all(c > 0 for c in self.cv_C) and self.cv_C, "cv_C", "list values > 0")
        _require(all(g > 0 for g in self.cv_gamma) and self.cv_gamma, "cv_gamma", "list values > 0")


# ---------------------------------------------------------------- deep models


@dataclass(frozen=True)
class Augment:
    crop_pad: int
    translate: float
    hflip: float
    jitter: float
    jitter_p: float
    erase_p: float
    erase_scale: tuple[float, float]
    cutout: int
    mixup: float
    cutmix: float
    autoaugment: Literal["none", "cifar10", "imagenet", "svhn"]  # torchvision's policies
    alternate_flip: bool = False  # hflip 0.5: each image flips every other epoch (airbench)

    def __post_init__(self) -> None:
        side = _data().side
        _require(0 <= self.crop_pad <= side // 2, "crop_pad", f"must be in [0, {side // 2}] px")
        _require(0 <= self.translate < 0.5, "translate", "must be in [0, 0.5)")
        for name in ("hflip", "jitter_p", "erase_p"):
            _require(0 <= getattr(self, name) <= 1, name, "is a probability: must be in [0, 1]")
        _require(0 <= self.jitter < 1, "jitter", "must be in [0, 1)")
        low, high = self.erase_scale
        _require(0 < low <= high < 1, "erase_scale", "must be [min, max] with 0 < min <= max < 1")
        _require(0 <= self.cutout <= side, "cutout", f"must be in [0, {side}] px")
        _require(self.mixup >= 0 and self.cutmix >= 0, "mixup", "Beta alphas must be >= 0")
        _require(not self.alternate_flip or self.hflip == 0.5, "alternate_flip",
                 f"needs hflip: 0.5 (half the images flipped in any epoch), not {self.hflip:g}")


@dataclass(frozen=True)
class TrainRecipe:
    """One deep row: `train_defaults` with the row's section laid over it."""

    model: str
    arch: Any
    epochs: int
    batch_size: int
    input_size: int   # px; 0 = as stored (read through Params.recipe, which puts the side in)
    optimizer: Literal["adamw", "sgd", "ranger"]
    lr: float
    weight_decay: float
    momentum: float
    schedule: Literal["onecycle", "cosine", "constant", "step", "linear"]
    pct_start: float
    div_factor: float
    final_div_factor: float
    warmup_epochs: float
    step_epochs: float
    step_gamma: float
    label_smoothing: float
    bn_bias_lr: float     # batch-norm biases' lr as a multiple of lr (their weight decay / it)
    grad_clip: float
    ema: float
    precise_bn: int
    augment: Augment
    checkpoint_every: int
    device: Literal["auto", "cuda", "mps", "cpu"]
    precision: Literal["auto", "bf16", "fp32"]
    channels_last: bool
    compile: Literal["auto", "none", "default", "reduce-overhead"]  # auto: train.resolve_compile
    sync_bn: bool
    eval_batch_size: int
    time_budget_s: float  # s; 0 = none
    tta_shift: int        # px; evaluate's TTA adds shifted views; 0 = flips only

    def __post_init__(self) -> None:
        from fashionbench.models.registry import UnknownModelError, spec

        try:
            model_spec = spec(self.model)
        except UnknownModelError as err:
            raise ParamsError("model", str(err)) from None
        arch_cls = model_spec.arch
        sizes = _data().input_sizes()
        _require(self.input_size in (0, *sizes), "input_size",
                 f"{_data().name} trains at 0 (as stored, {_data().side} px) or "
                 f"{' or '.join(map(str, sizes))} px, not {self.input_size}")
        if isinstance(self.arch, Mapping):
            object.__setattr__(self, "arch", _build(arch_cls, self.arch, "arch"))
        _require(self.epochs >= 1, "epochs", "must be >= 1")
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")
        _require(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        _require(self.lr > 0, "lr", "must be > 0")
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        _require(0 < self.pct_start < 1, "pct_start", "must be in (0, 1)")
        _require(self.div_factor >= 1 and self.final_div_factor >= 1, "div_factor",
                 "div_factor and final_div_factor must be >= 1")
        _require(0 <= self.warmup_epochs < self.epochs or self.warmup_epochs == 0, "warmup_epochs",
                 "must be >= 0 and fewer than epochs")
        _require(self.step_epochs > 0, "step_epochs", "must be > 0 epochs")
        _require(0 < self.step_gamma <= 1, "step_gamma", "must be in (0, 1]")
        _require(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        _require(self.bn_bias_lr > 0, "bn_bias_lr", "must be > 0 (1 = the lr of every other weight)")
        _require(self.time_budget_s >= 0, "time_budget_s", "must be >= 0 s (0 = no budget)")
        _require(0 <= self.tta_shift <= _data().side // 4, "tta_shift",
                 f"must be in [0, {_data().side // 4}] px (0 = flip TTA only)")
        _require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 = off)")
        _require(0 <= self.ema < 1, "ema", "must be in [0, 1) (0 = off)")
        _require(self.precise_bn >= 0, "precise_bn", "must be >= 0 images (0 = off)")
        _require(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1 epoch")
        if self.device == "cuda":
            _require(_cuda_available(), "device", "cuda is not available on this machine: "
                     "use device: auto (or cpu) in train_defaults or this recipe")


def _cuda_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------- evaluate, compare, scale


@dataclass(frozen=True)
class Evaluate:
    tta: bool
    device: Literal["auto", "cuda", "mps", "cpu"]
    batch_size: int
    gallery_size: int
    gradcam_images: int
    calibration_seed: int   # the stratified halves of the test set for temperature scaling

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")
        _require(self.gallery_size >= 1, "gallery_size", "must be >= 1")
        _require(1 <= self.gradcam_images <= 100, "gradcam_images", "must be in [1, 100]")
        _require(self.device != "cuda" or _cuda_available(), "device",
                 "cuda is not available on this machine: use device: auto (or cpu)")


@dataclass(frozen=True)
class Corrupt:
    """The corrupted test set (fashionbench/corrupt.py defines each corruption's severities)."""

    subset_size: int                   # stratified official test images corrupted
    seed: int
    corruptions: tuple[str, ...]
    severities: tuple[int, ...]

    def __post_init__(self) -> None:
        from fashionbench.corrupt import CORRUPTIONS, MAX_SEVERITY

        classes, test_images = _data().num_classes, _data().test_images or 10**9
        _require(classes <= self.subset_size <= test_images, "subset_size",
                 f"{self.subset_size} is impossible: use between {classes} (one image per class) "
                 f"and the {test_images} test images of {_data().name}")
        _require(len(self.corruptions) > 0, "corruptions", "list at least one corruption")
        for name in self.corruptions:
            _require(name in CORRUPTIONS, "corruptions", f"unknown corruption {name!r}; choose from "
                     f"{', '.join(CORRUPTIONS)}" + _did_you_mean(name, CORRUPTIONS))
        _require(len(set(self.corruptions)) == len(self.corruptions), "corruptions", "list each corruption once")
        _require(len(self.severities) > 0, "severities", "list at least one severity")
        for severity in self.severities:
            _require(1 <= severity <= MAX_SEVERITY, "severities",
                     f"severity {severity} is out of range: severities are 1..{MAX_SEVERITY}")
        _require(len(set(self.severities)) == len(self.severities), "severities", "list each severity once")


@dataclass(frozen=True)
class Compare:
    ensemble: tuple[str, ...]
    tolerance: float
    reproduce: tuple[str, ...]    # run ids `python -m fashionbench.reproduce` re-trains
    reproduce_tolerance: float

    def __post_init__(self) -> None:
        _require(0 <= self.tolerance < 1, "tolerance", "must be in [0, 1) (accuracy, absolute)")
        _require(0 <= self.reproduce_tolerance < 1, "reproduce_tolerance", "must be in [0, 1) (accuracy, absolute)")
        _require(len(self.reproduce) > 0, "reproduce", "name at least one run id (svm-fast, mlp-seed0, ...)")


@dataclass(frozen=True)
class QuickScale:
    """What `quick: true` shrinks: sizes only."""

    train_size: int
    validation_size: int
    test_size: int
    epochs: int
    epoch_images: dict[str, int]
    tsne_size: int
    pca_size: int
    corrupt_size: int     # test images in the corrupted set

    def __post_init__(self) -> None:
        classes = _data().num_classes
        train_images, test_images = _data().train_images or 10**9, _data().test_images or 10**9
        _require(classes <= self.train_size <= train_images - self.validation_size, "train_size",
                 f"must be between {classes} and the training images left after the validation split")
        _require(self.validation_size == 0 or self.validation_size >= classes, "validation_size",
                 f"must be 0 or at least {classes} (one image per class)")
        _require(classes <= self.test_size <= test_images, "test_size",
                 f"must be at least {classes} and at most the {test_images} test images")
        _require(self.epochs >= 1, "epochs", "must be >= 1")
        _require("default" in self.epoch_images, "epoch_images",
                 "needs a `default` entry (training images per epoch for any deep row)")
        _require(all(v >= 1 for v in self.epoch_images.values()), "epoch_images", "sizes must be >= 1")
        _require(self.tsne_size >= 10 and self.pca_size >= 10, "tsne_size", "t-SNE and PCA sizes must be >= 10")
        _require(classes <= self.corrupt_size <= test_images, "corrupt_size",
                 f"must be at least {classes} and at most the {test_images} test images")

    def images_per_epoch(self, row: str) -> int:
        """Training images drawn per epoch by deep row `row` in the quick run."""
        return self.epoch_images.get(row, self.epoch_images["default"])


# ---------------------------------------------------------------- the whole file

TOP_LEVEL = ("seed", "seeds", "quick", "quick_scale", "data", "download", "stats", "preprocess",
             "svm_defaults", "svm", "model", "train_defaults", "corrupt", "evaluate", "compare")


@dataclass(frozen=True)
class Params:
    seed: int
    seeds: dict[str, tuple[int, ...]]  # each deep row's training seeds
    quick: bool
    quick_scale: QuickScale
    data: Data
    download: Download
    stats: Stats
    preprocess: Preprocess
    svm: dict[str, SVM]
    recipes: dict[str, TrainRecipe]  # every deep row: a top-level section naming a `model`
    corrupt: Corrupt
    evaluate: Evaluate
    compare: Compare

    def __post_init__(self) -> None:
        check_seeds(self.seeds, self.recipes)
        _require(len(self.svm) > 0, "svm", "define at least one SVM recipe")
        for name in self.compare.ensemble:
            _require(name in self.recipes, "compare.ensemble",
                     f"unknown row {name!r}; deep rows: {', '.join(self.recipes)}")
        for name in self.quick_scale.epoch_images:
            _require(name == "default" or name in self.recipes, f"quick_scale.epoch_images.{name}",
                     "not a deep row" + _did_you_mean(name, self.recipes) + f"; deep rows: {', '.join(self.recipes)}")
        _require(self.quick_scale.tsne_size > self.stats.tsne_perplexity, "quick_scale.tsne_size",
                 f"must be larger than stats.tsne_perplexity ({self.stats.tsne_perplexity:g})")

    def recipe(self, row: str) -> TrainRecipe:
        """The training recipe of deep row `row` (cnn, resnet7, mlp, wrn, se_wrn, ...), with
        its epochs and precise-BN images capped by the quick scale when `quick` is on."""
        if row not in self.recipes:
            raise ParamsError(row, f"no such training section; deep rows: {', '.join(self.recipes)}")
        recipe = self.recipes[row]
        with reading(self.dataset):  # replace() validates again, against this dataset
            if recipe.input_size == 0:
                recipe = dataclasses.replace(recipe, input_size=self.dataset.side)
            if self.quick:
                epochs = min(recipe.epochs, self.quick_scale.epochs)
                recipe = dataclasses.replace(  # warmup keeps its fraction of the schedule
                    recipe, epochs=epochs, warmup_epochs=recipe.warmup_epochs * epochs / recipe.epochs,
                    precise_bn=min(recipe.precise_bn, self.epoch_images(row)))
        return recipe

    @property
    def dataset(self) -> Dataset:
        """The dataset `data` names."""
        return self.data.dataset()

    def epoch_images(self, row: str) -> int:
        """Training images per epoch of deep row `row`; 0 = the whole training split."""
        return self.quick_scale.images_per_epoch(row) if self.quick else 0

    def sizes(self) -> Sizes:
        """The preprocess sizes in force: the section's, or the quick scale's."""
        pre, q = self.preprocess, self.quick_scale
        if not self.quick:
            return Sizes(pre.validation_size, pre.subset_size, 0, pre.seed)
        return Sizes(q.validation_size, q.train_size, q.test_size, pre.seed)

    def corrupt_size(self) -> int:
        """Test images in the corrupted set: `corrupt.subset_size`, or the quick scale's."""
        return self.quick_scale.corrupt_size if self.quick else self.corrupt.subset_size

    def stats_sizes(self) -> Stats:
        """The stats section with the quick scale's t-SNE and PCA sizes when `quick` is on."""
        if not self.quick:
            return self.stats
        return dataclasses.replace(self.stats, tsne_size=self.quick_scale.tsne_size,
                                   pca_size=self.quick_scale.pca_size)


def read_yaml(path: Path) -> Any:
    """params.yaml as plain Python values, read as YAML 1.2 like DVC writes it: `yes`, `no`,
    `on` and `off` are strings there (PyYAML's YAML 1.1 would take them for booleans and let
    `-S quick=yes` pass as true while DVC records the string)."""
    return YAML(typ="safe", pure=True).load(path.read_text())


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read, merge defaults into recipes, and validate params.yaml."""
    path = Path(path)
    if not path.exists():
        raise ParamsError("(file)", f"{path} not found: run from the repository root")
    try:
        raw = read_yaml(path)
    except YAMLError as err:
        raise ParamsError("(file)", f"{path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ParamsError("(file)", f"{path} must be a mapping of sections")
    return params_from_dict(raw)


def params_from_dict(raw: Mapping[str, Any]) -> Params:
    """Validate a params mapping (as read from params.yaml): `data` first, then the rest
    against the dataset it names."""
    _require(isinstance(raw.get("data"), Mapping), "data", "missing section: add `data:` with "
             "`name: fashion-mnist` and its `idx:` keys, as the repository's params.yaml has them")
    with reading(_build(Data, raw.get("data"), "data").dataset()):
        return _build(Params, resolve(raw), "")


@contextlib.contextmanager
def reading(dataset: Dataset) -> typing.Iterator[None]:
    """Validate sections against `dataset` inside the block."""
    token = _DATASET.set(dataset)
    try:
        yield
    finally:
        _DATASET.reset(token)


def deep_rows(raw: Mapping[str, Any]) -> list[str]:
    """The deep rows of a params mapping: top-level sections that name a `model:`."""
    return [k for k, v in raw.items() if isinstance(v, Mapping) and "model" in v]


def resolve(raw: Mapping[str, Any]) -> dict:
    """The params with every recipe complete: defaults merged in, recipes gathered.

    A top-level section holding a `model:` key is a deep row; any other key that is not a
    known section is a mistake (with a did-you-mean).
    """
    rows = {k: raw[k] for k in deep_rows(raw)}
    for key in raw:
        if key not in TOP_LEVEL and key not in rows:
            raise ParamsError(key, "unknown section" + _did_you_mean(str(key), TOP_LEVEL + tuple(rows))
                              + "; a deep row's section must name its `model:`")
    out = {k: v for k, v in raw.items() if k in TOP_LEVEL}
    for key in ("svm_defaults", "train_defaults", "model"):
        _require(isinstance(raw.get(key), Mapping), key, "missing section: add it to params.yaml")
    # A typo in a defaults section is named there, not in the first recipe inheriting it.
    _check_keys(raw["svm_defaults"], SVM, "svm_defaults")
    _check_keys(raw["train_defaults"], TrainRecipe, "train_defaults")
    svm = raw.get("svm")
    _require(isinstance(svm, Mapping), "svm", "must be a mapping of named recipes")
    out["svm"] = {name: merge(raw["svm_defaults"], recipe or {}, f"svm.{name}")
                  for name, recipe in svm.items()}
    out["recipes"] = {row: _deep_recipe(row, section, raw) for row, section in rows.items()}
    for key in ("svm_defaults", "train_defaults", "model"):
        out.pop(key, None)
    return out


def _deep_recipe(row: str, section: Mapping[str, Any], raw: Mapping[str, Any]) -> TrainRecipe:
    """Deep row `row`: train_defaults, the shared `model:` shape for the models that read it
    (the WRN family), then the row's own section; errors name keys as params.yaml spells them."""
    from fashionbench.models.registry import UnknownModelError, arch_type, shared_sections

    try:
        shares = shared_sections(section["model"])
    except UnknownModelError as err:
        raise ParamsError(f"{row}.model", str(err)) from None
    merged = merge(raw["train_defaults"], section, row)
    if shares:
        _check_keys(raw["model"], arch_type(section["model"]), "model")
        merged["arch"] = merge(raw["model"], merged.get("arch") or {}, f"{row}.arch")
    try:
        return _build(TrainRecipe, merged, row)
    except ParamsError as err:
        key = err.key.removeprefix(f"{row}.arch.")
        if shares and key in raw["model"] and key not in (section.get("arch") or {}):
            raise ParamsError(f"model.{key}", err.problem) from None  # the shared value is wrong
        raise


def _check_keys(section: Mapping[str, Any], cls: type, where: str) -> None:
    """Every key of `section` (recursively into dataclass-typed fields) is a field of `cls`."""
    hints = typing.get_type_hints(cls)
    for key, value in section.items():
        if key not in hints:
            raise ParamsError(f"{where}.{key}", "unknown key" + _did_you_mean(str(key), hints)
                              + f"; valid keys: {', '.join(hints)}")
        if is_dataclass(hints[key]) and isinstance(value, Mapping):
            _check_keys(value, hints[key], f"{where}.{key}")


def check_seeds(seeds: Mapping[str, Sequence[int]], deep: Iterable[str]) -> None:
    """`seeds` lists distinct training seeds for every deep row and for nothing else."""
    deep = list(deep)
    for row in deep:
        _require(row in seeds, f"seeds.{row}", f"missing: list the seeds deep row {row} trains with, "
                 f"e.g. `{row}: [0]` under `seeds:`")
    for row, row_seeds in seeds.items():
        _require(row in deep, f"seeds.{row}", "not a deep row" + _did_you_mean(row, deep)
                 + f"; deep rows: {', '.join(deep)}")
        _require(len(row_seeds) > 0, f"seeds.{row}", "list at least one training seed")
        _require(len(set(row_seeds)) == len(row_seeds), f"seeds.{row}", "seeds must be distinct")


RUN_RECORDS = Path("reports/runs")  # <run id>.json: a run's training facts and curves, in git


def run_ids(svm: Iterable[str], deep: Iterable[str],
            seeds: Mapping[str, Iterable[int]]) -> list[tuple[str, str, int | None]]:
    """(run id, row, seed) of every run: "svm-<recipe>" once per SVM recipe (row "svm-<recipe>",
    no seed), "<row>-seed<N>" per deep row and each of its seeds. The one home of the run-id
    format."""
    return ([(f"svm-{k}", f"svm-{k}", None) for k in svm]
            + [(f"{row}-seed{seed}", row, seed) for row in deep for seed in seeds[row]])


def evaluate_stage(run_id: str) -> str:
    """The dvc.yaml stage that evaluates run `run_id`: evaluate_svm@rbf, evaluate_cnn@cnn-0."""
    if run_id.startswith("svm-"):
        return f"evaluate_svm@{run_id[4:]}"
    row, _, seed = run_id.rpartition("-seed")
    return f"evaluate_{row}@{row}-{seed}"


@dataclass(frozen=True)
class Plan:
    """The runs params.yaml defines, read without building models (no torch): what the
    compare stage and the CI gate need. check_params has validated the file."""

    quick: bool
    seeds: dict[str, tuple[int, ...]]  # each deep row's training seeds
    svm: tuple[str, ...]              # SVM recipe names
    deep: tuple[str, ...]             # deep rows, in params.yaml order
    epochs: dict[str, int]            # each deep row's recipe epochs
    ensemble: tuple[str, ...]
    tolerance: float
    reproduce: tuple[str, ...]        # run ids `python -m fashionbench.reproduce` re-trains
    reproduce_tolerance: float
    dataset: str                      # data.name
    train_images: int                 # the dataset's official training images
    classes: tuple[str, ...]          # the dataset's class names, in label order

    def rows(self) -> list[str]:
        """Table rows in order: svm-<recipe>..., then the deep rows."""
        return [f"svm-{k}" for k in self.svm] + list(self.deep)

    def runs(self) -> list[tuple[str, str, int | None]]:
        """(run id, row, seed) of every run: one per SVM recipe, one per deep row and seed."""
        return run_ids(self.svm, self.deep, self.seeds)

    def row_of(self, run_id: str) -> str:
        return run_id if run_id.startswith("svm-") else run_id.rpartition("-seed")[0]


def load_plan(path: Path | str = PARAMS_FILE) -> Plan:
    """The Plan of params.yaml (errors as load_params gives them for the keys it reads)."""
    try:
        raw = read_yaml(Path(path)) if Path(path).is_file() else None
    except YAMLError as err:
        raise ParamsError("(file)", f"{path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ParamsError("(file)", f"{path} not found or not a mapping: run from the repository root")
    deep = deep_rows(raw)
    defaults = raw.get("train_defaults") or {}
    compare = _build(Compare, raw.get("compare"), "compare")
    data = _build(Data, raw.get("data"), "data")
    seeds = raw.get("seeds") or {}
    seeds = {str(row): tuple(values) for row, values in seeds.items()} if isinstance(seeds, Mapping) else {}
    return Plan(bool(raw.get("quick")), seeds, tuple(raw.get("svm") or ()),
                tuple(deep), {k: int(raw[k].get("epochs", defaults.get("epochs", 0))) for k in deep},
                compare.ensemble, compare.tolerance, compare.reproduce, compare.reproduce_tolerance,
                data.name, data.dataset().train_images, data.dataset().classes)


def merge(defaults: Mapping[str, Any], overrides: Mapping[str, Any], where: str) -> dict:
    """`overrides` laid over `defaults`, mappings merged key by key (the dataclass built from
    the result then names any unknown key, under `where`)."""
    merged = copy.deepcopy(dict(defaults))
    if not isinstance(overrides, Mapping):
        raise ParamsError(where, f"must be a mapping, got {overrides!r}")
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value, f"{where}.{key}")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _did_you_mean(key: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys and types; keys named in errors."""
    if not isinstance(raw, Mapping):
        raise ParamsError(prefix or "(file)", f"must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in raw:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ParamsError(where, "unknown key" + _did_you_mean(str(key), names)
                              + f"; valid keys: {', '.join(names)}")
    values = {}
    for name in names:
        where = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            raise ParamsError(where, "missing: add it to params.yaml")
        values[name] = _convert(raw[name], hints[name], where)
    try:
        return cls(**values)
    except ParamsError as err:
        raise err.under(prefix) from None


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if is_dataclass(hint):
        return value if isinstance(value, hint) else _build(hint, value, where)
    if origin is Literal:
        if value not in args:
            raise ParamsError(where, f"{value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ParamsError(where, f"must be a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list):
            raise ParamsError(where, f"must be a list, got {value!r}")
        item_hints = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(item_hints) != len(value):
            raise ParamsError(where, f"must be a list of {len(item_hints)} values, got {value!r}")
        return tuple(_convert(v, h, f"{where}[{i}]") for i, (v, h) in enumerate(zip(value, item_hints)))
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _convert(value, option, where)
            except ParamsError:
                continue
        raise ParamsError(where, f"{value!r} has the wrong type")
    return _scalar(value, hint, where)


def _scalar(value: Any, hint: type, where: str) -> Any:
    # bool is an int in Python; a `true` where a number belongs is a mistake, not 1.
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, bool, str) and type(value) is hint:
        return value
    raise ParamsError(where, f"must be {hint.__name__}, got {value!r} ({type(value).__name__})")
