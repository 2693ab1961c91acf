"""Building and saving registered models (the registry itself: models/registry.py).

build_model(name, arch, input_shape, num_classes) is the only constructor the stages use;
load_trained(path) rebuilds a saved model.pt (see save_trained for its format).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fashionbench.dataset import DATASETS, FASHION_MNIST, Dataset, idx_dataset
from fashionbench.errors import UserError
from fashionbench.io import atomic_path
from fashionbench.models.registry import REGISTRY, spec  # noqa: F401 (REGISTRY re-exported)


class TrainedModelError(UserError):
    """A saved model is missing or does not fit; the message names the stage to re-run."""


def build_model(name: str, arch: Any, input_shape: tuple[int, int, int] = FASHION_MNIST.shape,
                num_classes: int = FASHION_MNIST.num_classes) -> nn.Module:
    """A freshly initialised registered model `name` mapping (B, *input_shape) to
    (B, num_classes). `arch` is the model's architecture dataclass or an equivalent dict."""
    model_spec = spec(name)
    if isinstance(arch, dict):
        arch = model_spec.arch(**{k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()})
    if not isinstance(arch, model_spec.arch):
        raise TypeError(f"model {name!r} needs a {model_spec.arch.__name__}, got {type(arch).__name__}")
    return model_spec.build(arch, tuple(input_shape), num_classes)


def describe(name: str, arch: Any, input_shape: tuple[int, int, int], num_classes: int) -> str:
    """Model `name`'s one-line summary for tables, e.g. "WRN-40-4 post-act"."""
    return spec(name).summary(arch, tuple(input_shape), num_classes)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _plain(arch: Any) -> dict:
    # Lists and scalars only, so model.pt loads with torch.load(weights_only=True).
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(arch).items()}


def save_trained(path: Path, model: nn.Module, name: str, arch: Any, *, mean: float, std: float,
                 seed: int, epochs: int, hflip: float, dataset: Dataset = FASHION_MNIST,
                 input_size: int = 0, tta_shift: int = 0) -> None:
    """Write model.pt (atomically): weights plus everything load_trained, evaluation and
    prediction need (`hflip`: the training flip probability, which decides whether flip TTA is
    sound; `input_size`: the side in px the model was trained at, 0 = the dataset's, recorded
    in `input_shape`; `dataset`: its name, class names and polarity; `tta_shift`: px of the
    shifted views its flip TTA adds, 0 = none)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    side = input_size or dataset.side
    # Saved through a file object, so the zip's inner folder is "archive", not the temporary
    # file's random name: identical weights give a byte-identical file (and DVC hash).
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({"model": name, "arch": _plain(arch), "state_dict": state,
                    "input_shape": [dataset.channels, side, side], "num_classes": dataset.num_classes,
                    "mean": float(mean),
                    "std": float(std), "seed": int(seed), "epochs": int(epochs),
                    "hflip": float(hflip), "dataset": dataset_record(dataset),
                    **({"tta_shift": int(tta_shift)} if tta_shift else {})}, f)


def dataset_record(dataset: Dataset) -> dict:
    """What a model file keeps of its dataset: enough to read new images as it was trained."""
    return {"name": dataset.name, "classes": list(dataset.classes), "shape": list(dataset.shape),
            "light_on_dark": dataset.light_on_dark}


def trained_dataset(meta: dict) -> Dataset:
    """The dataset a loaded model was trained on (files saved before the record: Fashion-MNIST)."""
    record = meta.get("dataset") or dataset_record(FASHION_MNIST)
    known = DATASETS.get(record["name"])
    if known is not None:
        return known
    return idx_dataset(tuple(record["classes"]), int(record["shape"][1]), bool(record["light_on_dark"]))


def _train_stage(path: Path) -> str:
    # models/<run>/seed<N>/model.pt is written by the stage train_<run>.
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-2].startswith("seed"):
        return f"`dvc repro train_{parts[-3]}`"
    return "the train stage that writes it"


def load_trained(path: Path | str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a saved model.pt: (model in eval mode on `device`, metadata without weights)."""
    path = Path(path)
    rerun = f"re-run {_train_stage(path)}"
    if not path.is_file():
        raise TrainedModelError(f"{path} not found: {rerun}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign file: any unpickling error
        raise TrainedModelError(f"{path} is not a readable model file ({err}): {rerun}") from err
    meta = {k: v for k, v in saved.items() if k != "state_dict"}
    try:
        dataset = trained_dataset(meta)
        shape = [int(n) for n in meta["input_shape"]]
    except (KeyError, TypeError, ValueError) as err:
        raise TrainedModelError(f"{path} lacks its input shape or dataset ({err}): {rerun}") from err
    if shape[0] != dataset.channels or shape[1] not in dataset.input_sizes() \
            or meta.get("num_classes") != dataset.num_classes:
        raise TrainedModelError(
            f"{path} was trained for input {shape} and {meta.get('num_classes')} classes, which "
            f"{dataset.name} ({dataset.shape}, {dataset.num_classes} classes) cannot give: {rerun}")
    try:
        model = build_model(meta["model"], meta["arch"], tuple(shape), dataset.num_classes)
        model.load_state_dict(saved["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise TrainedModelError(f"{path} does not fit the current model code ({err}): {rerun}") from err
    meta["dataset"] = dataset_record(dataset)
    return model.to(device).eval(), meta
