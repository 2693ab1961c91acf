"""A plain multilayer perceptron on the flattened pixels."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from fashionbench.dataset import CLASSES, PIXELS
from fashionbench.models.registry import register
from fashionbench.params import _require


@dataclass(frozen=True)
class MLPArch:
    hidden: tuple[int, ...]   # hidden layer widths
    dropout: float

    def __post_init__(self) -> None:
        _require(all(h >= 1 for h in self.hidden), "hidden", "widths must be >= 1")
        _require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")


def _summary(arch: MLPArch) -> str:
    return "MLP " + "-".join(map(str, (PIXELS, *arch.hidden, CLASSES)))


@register("mlp", MLPArch, summary=_summary)
class MLP(nn.Module):
    """pixels - hidden... - classes with ReLU (and dropout when set) after each hidden layer."""

    def __init__(self, arch: MLPArch, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * PIXELS
        for hidden in arch.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            if arch.dropout:
                layers.append(nn.Dropout(arch.dropout))
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
