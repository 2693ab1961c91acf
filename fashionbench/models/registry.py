"""The one list of deep models. A model registers itself where it is defined:

    @register("cnn", CNNArch, summary=lambda arch, shape, classes: f"2-conv CNN, dropout {arch.dropout}")
    class CNN(nn.Module): ...

Every module of this package is imported on first look-up, so a new file here is the whole
registration. params.py validates a recipe's `arch:` against the registered dataclass, the
train stage records the model's one-line summary with its metrics, and tests walk REGISTRY.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

from fashionbench.errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: type                       # frozen dataclass of architecture params (`arch:` of a recipe)
    build: Callable[..., Any]        # (arch, input_shape (C, H, W), num_classes) -> nn.Module
    summary: Callable[..., str]      # (arch, input_shape, num_classes) -> one line for tables,
                                     # e.g. "WRN-40-4 post-act"
    shared: str | None = None        # a params.yaml section merged under `arch:` (WRN: `model`)


REGISTRY: dict[str, ModelSpec] = {}
_loaded = False


def register(name: str, arch: type, *, summary: Callable[..., str],
             shared: str | None = None) -> Callable[[type], type]:
    """Class decorator: make model class `cls` buildable as `name` from an `arch` dataclass."""
    def add(cls: type) -> type:
        if name in REGISTRY and REGISTRY[name].build is not cls:
            raise ValueError(f"model {name!r} is registered twice")
        REGISTRY[name] = ModelSpec(name, arch, cls, summary, shared)
        return cls
    return add


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    import fashionbench.models as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    _loaded = True


def spec(name: str) -> ModelSpec:
    """The registered model `name`; an unknown name is a UserError listing the registered ones."""
    _load_all()
    if name not in REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def arch_type(name: str) -> type:
    return spec(name).arch


def shared_sections(name: str) -> bool:
    """Whether model `name` reads the shared `model:` section (the WRN family)."""
    return spec(name).shared is not None


class UnknownModelError(UserError, ValueError):
    """A recipe names a model no module registered."""
