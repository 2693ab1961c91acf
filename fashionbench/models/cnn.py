"""The seed's 2-conv CNN and its wider, deeper, batch-normalised variants (one class)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from fashionbench.models.registry import register
from fashionbench.params import _require


@dataclass(frozen=True)
class CNNArch:
    """params.yaml sets every key; the defaults (the seed's CNN) read model files saved before
    the shape options existed."""

    dropout: float                      # before the last layer
    widths: tuple[int, ...] = (32, 64)  # channels of each stage; a stage ends in a 2x2 max-pool
    convs: int = 1                      # 3x3 convs per stage
    batch_norm: bool = False            # batch norm after each conv (the conv then has no bias)
    hidden: int = 256                   # units of the fc layer before the classifier

    def __post_init__(self) -> None:
        _require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        _require(1 <= len(self.widths) <= 3 and all(w >= 1 for w in self.widths), "widths",
                 "list 1 to 3 stage widths >= 1 (each stage halves the side), e.g. [32, 64]")
        _require(self.convs >= 1, "convs", "must be >= 1")
        _require(self.hidden >= 1, "hidden", "must be >= 1")


def _summary(arch: CNNArch, shape: tuple[int, int, int], classes: int) -> str:
    if arch == CNNArch(arch.dropout):
        return f"2-conv CNN, dropout {arch.dropout:g}"
    convs = f" x{arch.convs} convs" if arch.convs > 1 else ""
    bn = ", BN" if arch.batch_norm else ""
    widths = "-".join(map(str, arch.widths))
    return f"CNN {widths}{convs}{bn}, fc {arch.hidden}, dropout {arch.dropout:g}"


@register("cnn", CNNArch, summary=_summary)
class CNN(nn.Module):
    """Stages of `convs` 3x3 convs (padding 1; batch norm optional), ReLU, then a 2x2 max-pool;
    fc `hidden`-relu-dropout, fc 10. The seed's CNN is the default: conv32-relu-pool,
    conv64-relu-pool, fc256-relu-dropout, fc10 (824,458 parameters: 64 maps of 7x7 feed a
    3136-wide fc)."""

    def __init__(self, arch: CNNArch, input_shape: tuple[int, int, int] = (1, 28, 28),
                 num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        channels = input_shape[0]
        for width in arch.widths:
            for _ in range(arch.convs):
                layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=not arch.batch_norm))
                layers += [nn.BatchNorm2d(width)] if arch.batch_norm else []
                layers.append(nn.ReLU(inplace=True))
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = input_shape[1] >> len(arch.widths)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * side * side, arch.hidden), nn.ReLU(inplace=True),
            nn.Dropout(arch.dropout), nn.Linear(arch.hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
