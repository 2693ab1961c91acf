"""The seed's ResNet-7: seven weight layers, two post-activation residual blocks."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from fashionbench.models.registry import register
from fashionbench.params import _require


@dataclass(frozen=True)
class ResNet7Arch:
    width: int          # channels of both stages

    def __post_init__(self) -> None:
        _require(self.width >= 1, "width", "must be >= 1")


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """Post-activation: relu(x + bn(conv(relu(bn(conv(x)))))), bias-free convs."""

    def __init__(self, width: int):
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(x + self.branch(x))


@register("resnet7", ResNet7Arch, summary=lambda a, shape, classes: f"ResNet-7, width {a.width}")
class ResNet7(nn.Module):
    """conv-bn-relu, block, maxpool, conv-bn-relu, block, global average pool, fc.

    The seed's 186,442 parameters at width 64 pin the layout: 6 convs of 3x3 (one 1->64,
    five 64->64) and the 64->10 fc hold 185,546 weights and fc biases, which leaves 896 =
    64 * (convs with a bias) + 128 * (batch norms). With a batch norm after every conv (6)
    that is exactly two convs with a bias: the two stand-alone convs keep nn.Conv2d's default
    bias and the block convs drop theirs. (All six convs biased with norms inside the blocks
    only would give the same count; a norm after every conv is the usual ResNet layout.)
    """

    def __init__(self, arch: ResNet7Arch, input_shape: tuple[int, int, int] = (1, 28, 28),
                 num_classes: int = 10):
        super().__init__()
        w = arch.width
        self.features = nn.Sequential(
            _conv_bn_relu(input_shape[0], w), ResidualBlock(w), nn.MaxPool2d(2),
            _conv_bn_relu(w, w), ResidualBlock(w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))
