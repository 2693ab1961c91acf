"""params.yaml -> typed, frozen, validated objects.

Every key in params.yaml must map to a field here and every field must be present: a
misspelt key, a wrong type or an impossible value raises ParamsError naming the key,
before a stage does any work. Defaults live in params.yaml only.
"""

from __future__ import annotations

import copy
import difflib
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

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


# ---------------------------------------------------------------- data stages


@dataclass(frozen=True)
class Download:
    sources: tuple[str, ...]
    timeout: float

    def __post_init__(self) -> None:
        _require(len(self.sources) > 0, "sources", "list at least one directory or URL")
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


TRAIN_IMAGES = 60_000
CLASSES = 10


@dataclass(frozen=True)
class Preprocess:
    validation_size: int
    subset_size: int
    seed: int

    def __post_init__(self) -> None:
        _require(self.validation_size >= 0, "validation_size", "must be >= 0 (0 = no validation split)")
        _require(self.validation_size <= TRAIN_IMAGES - 10 * CLASSES, "validation_size",
                 f"{self.validation_size} leaves too few of the {TRAIN_IMAGES} training images; "
                 f"use at most {TRAIN_IMAGES - 10 * CLASSES}")
        left = TRAIN_IMAGES - self.validation_size
        _require(self.subset_size >= 0, "subset_size", "must be >= 0 (0 = all)")
        _require(self.subset_size <= left, "subset_size",
                 f"{self.subset_size} is more than the {left} training images left after the "
                 "validation split; lower it or use 0 for all")
        _require(self.subset_size == 0 or self.subset_size >= CLASSES, "subset_size",
                 f"must be 0 or at least {CLASSES} (one image per class)")

    @property
    def train_size(self) -> int:
        """Training images kept after the split and the subset."""
        return self.subset_size or TRAIN_IMAGES - self.validation_size


# ---------------------------------------------------------------- SVM


SVM_FEATURES = ("raw", "hog", "pca")
IMAGE_SIDE = 28


@dataclass(frozen=True)
class SVM:
    features: str               # raw | hog | pca, or several joined with "+" (e.g. pca+hog)
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
        _require(all(0 < c <= IMAGE_SIDE // 2 for c in self.hog_cells) and self.hog_cells, "hog_cells",
                 f"list pixel sizes between 1 and {IMAGE_SIDE // 2}")
        _require(self.hog_block >= 1, "hog_block", "must be >= 1")
        _require(all((IMAGE_SIDE // c) >= self.hog_block for c in self.hog_cells), "hog_block",
                 f"{self.hog_block} cells per block side do not fit a {IMAGE_SIDE}-px image with "
                 f"{max(self.hog_cells)}-px cells")
        _require(0 <= self.pca_components <= IMAGE_SIDE ** 2, "pca_components",
                 f"{self.pca_components} is impossible: images have {IMAGE_SIDE ** 2} pixels")
        _require("pca" not in names or self.pca_components > 0, "pca_components",
                 "must be > 0 with the pca feature")
        _require(self.solver != "nystroem" or self.nystroem_components > 0, "nystroem_components",
                 "must be > 0 with solver: nystroem")
        _require(self.cg_iterations >= 1, "cg_iterations", "must be >= 1")
        _require(self.train_size >= 0, "train_size", "must be >= 0 (0 = all)")
        _require(self.train_size == 0 or self.train_size >= 2 * CLASSES, "train_size",
                 f"must be 0 (all) or at least {2 * CLASSES} (two images per class)")
        _require(self.cv_folds == 0 or self.cv_folds >= 2, "cv_folds", "must be 0 (off) or >= 2")
        _require(all(c > 0 for c in self.cv_C) and self.cv_C, "cv_C", "list values > 0")
        _require(all(g > 0 for g in self.cv_gamma) and self.cv_gamma, "cv_gamma", "list values > 0")


# ---------------------------------------------------------------- deep models


@dataclass(frozen=True)
class WRNShape:
    """The `model:` section: the WRN family's shared architecture."""

    depth: int
    widen: int
    dropout: float

    def __post_init__(self) -> None:
        _require(self.depth >= 10 and (self.depth - 4) % 6 == 0, "depth",
                 f"{self.depth} is impossible: a WRN depth is 6n+4 (10, 16, 22, 28, 34, 40, ...)")
        _require(self.widen >= 1, "widen", "must be >= 1")
        _require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class WRNVariant:
    block: Literal["post", "pre"]
    se_reduction: int
    drop_path: float
    drop_path_mode: Literal["sample", "batch"]

    def __post_init__(self) -> None:
        _require(self.se_reduction >= 0, "se_reduction", "must be >= 0 (0 = no SE)")
        _require(0 <= self.drop_path < 1, "drop_path", "must be in [0, 1)")


@dataclass(frozen=True)
class CNNArch:
    dropout: float

    def __post_init__(self) -> None:
        _require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class ResNet7Arch:
    width: int

    def __post_init__(self) -> None:
        _require(self.width >= 1, "width", "must be >= 1")


@dataclass(frozen=True)
class MLPArch:
    hidden: tuple[int, ...]
    dropout: float

    def __post_init__(self) -> None:
        _require(all(h >= 1 for h in self.hidden), "hidden", "widths must be >= 1")
        _require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")


ARCH_TYPES: dict[str, type] = {
    "cnn": CNNArch,
    "resnet7": ResNet7Arch,
    "mlp": MLPArch,
    "wrn": WRNVariant,
}


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

    def __post_init__(self) -> None:
        _require(0 <= self.crop_pad <= 14, "crop_pad", "must be in [0, 14] px")
        _require(0 <= self.translate < 0.5, "translate", "must be in [0, 0.5)")
        for name in ("hflip", "jitter_p", "erase_p"):
            _require(0 <= getattr(self, name) <= 1, name, "is a probability: must be in [0, 1]")
        _require(0 <= self.jitter < 1, "jitter", "must be in [0, 1)")
        low, high = self.erase_scale
        _require(0 < low <= high < 1, "erase_scale", "must be [min, max] with 0 < min <= max < 1")
        _require(0 <= self.cutout <= 28, "cutout", "must be in [0, 28] px")
        _require(self.mixup >= 0 and self.cutmix >= 0, "mixup", "Beta alphas must be >= 0")


@dataclass(frozen=True)
class TrainRecipe:
    model: str
    arch: Any
    epochs: int
    batch_size: int
    optimizer: Literal["adamw", "sgd"]
    lr: float
    weight_decay: float
    momentum: float
    schedule: Literal["onecycle", "cosine", "constant"]
    pct_start: float
    div_factor: float
    final_div_factor: float
    warmup_epochs: float
    label_smoothing: float
    grad_clip: float
    ema: float
    augment: Augment
    checkpoint_every: int
    device: Literal["auto", "cuda", "mps", "cpu"]
    precision: Literal["auto", "bf16", "fp32"]
    channels_last: bool
    compile: bool
    eval_batch_size: int

    def __post_init__(self) -> None:
        _require(self.model in ARCH_TYPES, "model",
                 f"unknown model {self.model!r}; registered: {', '.join(sorted(ARCH_TYPES))}")
        if not isinstance(self.arch, ARCH_TYPES[self.model]):  # dataclasses.replace passes it built
            object.__setattr__(self, "arch", _build(ARCH_TYPES[self.model], self.arch, "arch"))
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
        _require(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        _require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 = off)")
        _require(0 <= self.ema < 1, "ema", "must be in [0, 1) (0 = off)")
        _require(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1 epoch")


# ---------------------------------------------------------------- evaluate, compare


@dataclass(frozen=True)
class Evaluate:
    tta: bool
    batch_size: int
    gallery_size: int
    gradcam_images: int

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")
        _require(self.gallery_size >= 1, "gallery_size", "must be >= 1")
        _require(1 <= self.gradcam_images <= 100, "gradcam_images", "must be in [1, 100]")


DEEP_MODELS = ("cnn", "resnet7", "mlp", "wrn", "se_wrn")


@dataclass(frozen=True)
class Compare:
    ensemble: tuple[str, ...]
    tolerance: float

    def __post_init__(self) -> None:
        for name in self.ensemble:
            _require(name in DEEP_MODELS, "ensemble",
                     f"unknown model {name!r}; choose from {', '.join(DEEP_MODELS)}")
        _require(0 <= self.tolerance < 1, "tolerance", "must be in [0, 1) (accuracy, absolute)")


# ---------------------------------------------------------------- the whole file


@dataclass(frozen=True)
class Params:
    seed: int
    seeds: tuple[int, ...]
    quick: bool
    download: Download
    stats: Stats
    preprocess: Preprocess
    svm: dict[str, SVM]
    model: WRNShape
    cnn: TrainRecipe
    resnet7: TrainRecipe
    mlp: TrainRecipe
    wrn: TrainRecipe
    se_wrn: TrainRecipe
    evaluate: Evaluate
    compare: Compare
    quick_run: dict[str, Any]

    def __post_init__(self) -> None:
        _require(len(self.seeds) > 0, "seeds", "list at least one training seed")
        _require(len(set(self.seeds)) == len(self.seeds), "seeds", "seeds must be distinct")
        _require(len(self.svm) > 0, "svm", "define at least one SVM recipe")

    def recipe(self, name: str) -> TrainRecipe:
        """The training recipe of a deep model stage (cnn, resnet7, mlp, wrn, se_wrn)."""
        if name not in DEEP_MODELS:
            raise ParamsError(name, f"no such training section; choose from {', '.join(DEEP_MODELS)}")
        return getattr(self, name)


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read, apply the quick run when `quick: true`, and validate params.yaml."""
    path = Path(path)
    if not path.exists():
        raise ParamsError("(file)", f"{path} not found: run from the repository root")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError("(file)", f"{path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ParamsError("(file)", f"{path} must be a mapping of sections")
    return params_from_dict(raw)


def params_from_dict(raw: Mapping[str, Any]) -> Params:
    """Validate a params mapping (as read from params.yaml)."""
    full = _build(Params, raw, "")  # the full recipes are checked even in a quick run
    if not full.quick:
        return full
    return _build(Params, apply_overrides(raw, full.quick_run, "quick_run"), "")


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any], where: str) -> dict:
    """Deep-merge `overrides` onto `raw`; an override key absent from `raw` is an error."""
    merged = copy.deepcopy(dict(raw))
    for key, value in overrides.items():
        path = f"{where}.{key}"
        if key not in merged:
            raise ParamsError(path, f"overrides {key!r}, which params.yaml does not define"
                              + _did_you_mean(key, merged))
        if isinstance(value, Mapping) and isinstance(merged[key], Mapping):
            merged[key] = apply_overrides(merged[key], value, path)
        else:
            merged[key] = value
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
        return _build(hint, value, where)
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
