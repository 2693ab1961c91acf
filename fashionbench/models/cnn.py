"""The seed's 2-conv CNN."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from fashionbench.dataset import IMAGE_SIDE
from fashionbench.models.registry import register
from fashionbench.params import _require


@dataclass(frozen=True)
class CNNArch:
    dropout: float      # before the last layer

    def __post_init__(self) -> None:
        _require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")


@register("cnn", CNNArch, summary=lambda a: f"2-conv CNN, dropout {a.dropout:g}")
class CNN(nn.Module):
    """conv32-relu-pool, conv64-relu-pool, fc256-relu-dropout, fc10: 824,458 parameters.

    The 3x3 convs use padding 1, so two 2x2 pools leave 64 maps of 7x7 for the 3136-wide fc.
    """

    def __init__(self, arch: CNNArch, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * (IMAGE_SIDE // 4) ** 2, 256), nn.ReLU(inplace=True),
            nn.Dropout(arch.dropout), nn.Linear(256, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
