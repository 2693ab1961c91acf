"""A plain multilayer perceptron on the flattened pixels."""

from __future__ import annotations

from dataclasses import dataclass

import math

from torch import Tensor, nn

from fashionbench.models.registry import register
from fashionbench.params import _require


@dataclass(frozen=True)
class MLPArch:
    hidden: tuple[int, ...]   # hidden layer widths
    dropout: float

    def __post_init__(self) -> None:
        _require(all(h >= 1 for h in self.hidden), "hidden", "widths must be >= 1")
        _require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")


def _summary(arch: MLPArch, shape: tuple[int, int, int], classes: int) -> str:
    return "MLP " + "-".join(map(str, (math.prod(shape), *arch.hidden, classes)))


@register("mlp", MLPArch, summary=_summary)
class MLP(nn.Module):
    """pixels - hidden... - classes with ReLU (and dropout when set) after each hidden layer."""

    def __init__(self, arch: MLPArch, input_shape: tuple[int, int, int] = (1, 28, 28),
                 num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for hidden in arch.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            if arch.dropout:
                layers.append(nn.Dropout(arch.dropout))
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
