"""Building and saving registered models (the registry itself: models/registry.py).

build_model(name, arch) is the only constructor the stages use; load_trained(path) rebuilds a
saved model.pt (see save_trained for its format).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fashionbench.dataset import CLASSES, IMAGE_SIDE, INPUT_SHAPE, INPUT_SIZES
from fashionbench.errors import UserError
from fashionbench.io import atomic_path
from fashionbench.models.registry import REGISTRY, spec  # noqa: F401 (REGISTRY re-exported)


class TrainedModelError(UserError):
    """A saved model is missing or does not fit; the message names the stage to re-run."""


def build_model(name: str, arch: Any) -> nn.Module:
    """A freshly initialised registered model `name` mapping (B, *INPUT_SHAPE) to (B, CLASSES).

    `arch` is the model's architecture dataclass or an equivalent dict.
    """
    model_spec = spec(name)
    if isinstance(arch, dict):
        arch = model_spec.arch(**{k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()})
    if not isinstance(arch, model_spec.arch):
        raise TypeError(f"model {name!r} needs a {model_spec.arch.__name__}, got {type(arch).__name__}")
    return model_spec.build(arch, INPUT_SHAPE[0], CLASSES)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _plain(arch: Any) -> dict:
    # Lists and scalars only, so model.pt loads with torch.load(weights_only=True).
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(arch).items()}


def save_trained(path: Path, model: nn.Module, name: str, arch: Any, *, mean: float, std: float,
                 seed: int, epochs: int, hflip: float, input_size: int = IMAGE_SIDE) -> None:
    """Write model.pt (atomically): weights plus everything load_trained and evaluation need
    (`hflip`: the training flip probability, which decides whether flip TTA is sound;
    `input_size`: the side in px the model was trained at, recorded in `input_shape`)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"model": name, "arch": _plain(arch), "state_dict": state,
                    "input_shape": [INPUT_SHAPE[0], input_size, input_size], "num_classes": CLASSES,
                    "mean": float(mean),
                    "std": float(std), "seed": int(seed), "epochs": int(epochs),
                    "hflip": float(hflip)}, tmp)


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
    shapes = [[INPUT_SHAPE[0], side, side] for side in INPUT_SIZES]
    if list(meta.get("input_shape", [])) not in shapes or meta.get("num_classes") != CLASSES:
        raise TrainedModelError(
            f"{path} was trained for input {meta.get('input_shape')} and {meta.get('num_classes')} "
            f"classes, not one of {shapes} and {CLASSES}: {rerun}")
    try:
        model = build_model(meta["model"], meta["arch"])
        model.load_state_dict(saved["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise TrainedModelError(f"{path} does not fit the current model code ({err}): {rerun}") from err
    return model.to(device).eval(), meta
