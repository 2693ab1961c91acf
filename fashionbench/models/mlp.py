"""A plain multilayer perceptron on the flattened 784 pixels."""

from __future__ import annotations

from torch import Tensor, nn

from fashionbench.params import MLPArch


class MLP(nn.Module):
    """784 - hidden... - 10 with ReLU (and dropout when set) after each hidden layer."""

    def __init__(self, arch: MLPArch, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * 28 * 28
        for hidden in arch.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            if arch.dropout:
                layers.append(nn.Dropout(arch.dropout))
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
