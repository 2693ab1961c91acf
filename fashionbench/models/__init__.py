"""The model registry: every deep model is built from its name and its architecture params.

build_model(name, arch) is the only constructor the stages use; load_trained(path) rebuilds a
saved model.pt (see save_trained for its format).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from fashionbench.errors import UserError
from fashionbench.models.cnn import CNN
from fashionbench.models.mlp import MLP
from fashionbench.models.resnet7 import ResNet7
from fashionbench.models.wrn import WideResNet, WRNConfig
from fashionbench.params import CNNArch, MLPArch, Params, ResNet7Arch

INPUT_SHAPE = [1, 28, 28]
NUM_CLASSES = 10

# name -> (model class, architecture dataclass)
REGISTRY: dict[str, tuple[Callable[..., nn.Module], type]] = {
    "cnn": (CNN, CNNArch),
    "resnet7": (ResNet7, ResNet7Arch),
    "mlp": (MLP, MLPArch),
    "wrn": (WideResNet, WRNConfig),
}


class TrainedModelError(UserError):
    """A saved model is missing or does not fit; the message names the stage to re-run."""


def build_model(name: str, arch: Any) -> nn.Module:
    """A freshly initialised model `name` (cnn, resnet7, mlp, wrn) mapping (B,1,28,28) to (B,10).

    `arch` is the model's architecture dataclass (for wrn a WRNConfig) or an equivalent dict.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(REGISTRY)}")
    model_cls, arch_cls = REGISTRY[name]
    if isinstance(arch, dict):
        arch = arch_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()})
    if not isinstance(arch, arch_cls):
        raise TypeError(f"model {name!r} needs a {arch_cls.__name__}, got {type(arch).__name__}")
    return model_cls(arch, INPUT_SHAPE[0], NUM_CLASSES)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_arch(params: Params, run: str) -> Any:
    """The resolved architecture of training section `run`: wrn and se_wrn combine `model:`
    (depth, widen, dropout) with their own `arch:` variant."""
    recipe = params.recipe(run)
    if recipe.model == "wrn":
        return WRNConfig.combine(params.model, recipe.arch)
    return recipe.arch


def _plain(arch: Any) -> dict:
    # Lists and scalars only, so model.pt loads with torch.load(weights_only=True).
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(arch).items()}


def save_trained(path: Path, model: nn.Module, name: str, arch: Any, *, mean: float, std: float,
                 seed: int, epochs: int) -> None:
    """Write model.pt: weights plus everything load_trained needs to rebuild the model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"model": name, "arch": _plain(arch), "state_dict": state,
                "input_shape": INPUT_SHAPE, "num_classes": NUM_CLASSES,
                "mean": float(mean), "std": float(std), "seed": int(seed), "epochs": int(epochs)}, path)


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
    if list(meta.get("input_shape", [])) != INPUT_SHAPE or meta.get("num_classes") != NUM_CLASSES:
        raise TrainedModelError(
            f"{path} was trained for input {meta.get('input_shape')} and {meta.get('num_classes')} "
            f"classes, not {INPUT_SHAPE} and {NUM_CLASSES}: {rerun}")
    try:
        model = build_model(meta["model"], meta["arch"])
        model.load_state_dict(saved["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise TrainedModelError(f"{path} does not fit the current model code ({err}): {rerun}") from err
    return model.to(device).eval(), meta
