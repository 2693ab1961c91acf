"""ResNet-18/34 adapted to 28x28 (the reports' adaptation: a 3x3 stem, no max-pool, dropout
before the classifier), and the CIFAR-10 lab's ResNet-9."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from fashionbench.models.registry import register
from fashionbench.params import _require

WIDTHS = (64, 128, 256, 512)   # channels of the four stages; stages 2-4 halve the resolution


@dataclass(frozen=True)
class ResNetArch:
    blocks: tuple[int, ...]    # basic blocks per stage: [2, 2, 2, 2] is ResNet-18, [3, 4, 6, 3] ResNet-34
    dropout: float             # before the fc

    def __post_init__(self) -> None:
        _require(len(self.blocks) == len(WIDTHS) and all(b >= 1 for b in self.blocks), "blocks",
                 f"list {len(WIDTHS)} stages of >= 1 block each, e.g. [2, 2, 2, 2] (ResNet-18)")
        _require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")


def _depth(arch: ResNetArch) -> int:
    return 2 * sum(arch.blocks) + 2


class BasicBlock(nn.Module):
    """relu(shortcut(x) + bn(conv(relu(bn(conv(x)))))); a 1x1 conv shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.shortcut(x) + self.branch(x))


@register("resnet", ResNetArch, summary=lambda a, shape, classes: f"ResNet-{_depth(a)}, 3x3 stem, dropout {a.dropout:g}")
class ResNet(nn.Module):
    """3x3 stem (64), four stages of basic blocks at 28, 14, 7, 4 px, global average pool,
    dropout, fc. The ImageNet 7x7 stride-2 stem and max-pool would leave a 1x1 map at 28x28."""

    def __init__(self, arch: ResNetArch, input_shape: tuple[int, int, int] = (1, 28, 28),
                 num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(input_shape[0], WIDTHS[0], 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(WIDTHS[0]), nn.ReLU(inplace=True)]
        cin = WIDTHS[0]
        for stage, (width, count) in enumerate(zip(WIDTHS, arch.blocks)):
            for i in range(count):
                layers.append(BasicBlock(cin, width, 2 if stage > 0 and i == 0 else 1))
                cin = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(arch.dropout)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


@dataclass(frozen=True)
class ResNet9Arch:
    hidden: int                # width of the hidden fc layer (the lab: 512-128-10)


def _conv(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.branch = nn.Sequential(_conv(width, width), _conv(width, width))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


@register("resnet9", ResNet9Arch, summary=lambda a, shape, classes: f"ResNet-9, fc 512-{a.hidden}-{classes}")
class ResNet9(nn.Module):
    """conv64, conv128+pool, res128 x2, conv256+pool, conv512+pool, res512 x2, pool, fc.
    The lab's final MaxPool2d(4) turns CIFAR's 4x4 map into 1x1; at 28x28 the map is 3x3
    (28 -> 14 -> 7 -> 3), so an adaptive max-pool to 1x1 takes its place."""

    def __init__(self, arch: ResNet9Arch, input_shape: tuple[int, int, int] = (1, 28, 28),
                 num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            _conv(input_shape[0], 64), _conv(64, 128, pool=True), _Residual(128),
            _conv(128, 256, pool=True), _conv(256, 512, pool=True), _Residual(512),
            nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(512, arch.hidden), nn.ReLU(inplace=True),
                                  nn.Linear(arch.hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
