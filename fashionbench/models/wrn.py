"""One WideResNet class: WRN, pre-activation, squeeze-excitation, drop-path and the activation
function are options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fashionbench.models.registry import register
from fashionbench.params import _require


@dataclass(frozen=True)
class WRNConfig:
    """A WRN's whole architecture. params.yaml's shared `model:` section gives depth, widen
    and dropout to every WRN row; a row's `arch:` gives the variant (and may override)."""

    depth: int                                 # layers, 6n+4
    widen: int                                 # width multiplier k (channels 16k, 32k, 64k)
    dropout: float                             # inside each residual block
    block: Literal["post", "pre"]              # activation order
    se_reduction: int                          # squeeze-excitation reduction; 0 = no SE
    drop_path: float                           # max residual-branch drop probability
    drop_path_mode: Literal["sample", "batch"]  # per image (rescaled) | the seed's block skip
    # After each batch norm (SE gates keep ReLU). params.yaml sets it for every row; the default
    # only reads model files saved before the option existed, all of them ReLU networks.
    activation: Literal["relu", "mish"] = "relu"

    def __post_init__(self) -> None:
        _require(self.depth >= 10 and (self.depth - 4) % 6 == 0, "depth",
                 f"{self.depth} is impossible: a WRN depth is 6n+4 (10, 16, 22, 28, 34, 40, ...)")
        _require(self.widen >= 1, "widen", "must be >= 1")
        _require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        _require(self.se_reduction >= 0, "se_reduction", "must be >= 0 (0 = no SE)")
        _require(0 <= self.drop_path < 1, "drop_path", "must be in [0, 1)")


def _summary(cfg: WRNConfig, shape: tuple[int, int, int], classes: int) -> str:
    name = f"{'SE-' if cfg.se_reduction else ''}WRN-{cfg.depth}-{cfg.widen} {cfg.block}-act"
    extras = [f"dropout {cfg.dropout:g}"] if cfg.dropout else []
    if cfg.activation != "relu":
        extras.append(cfg.activation)
    if cfg.drop_path:
        extras.append(f"drop-path {cfg.drop_path:g} ({cfg.drop_path_mode})")
    return ", ".join([name, *extras])


def _activation(cfg: WRNConfig) -> nn.Module:
    return nn.Mish(inplace=True) if cfg.activation == "mish" else nn.ReLU(inplace=True)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class SqueezeExcite(nn.Module):
    """Channel gates from the global average: C -> C/r -> C, sigmoid."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1), nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


class Block(nn.Module):
    """A wide residual block.

    post: act(shortcut(x) + [conv-bn-act-drop-conv-bn-drop-SE](x)), shortcut conv1x1-bn
          (the seed's WRN: dropout after each conv).
    pre:  a = act(bn(x)); shortcut(a or x) + [conv-bn-act-drop-conv-SE](a), shortcut conv1x1
          (the seed's SE-WRN: dropout between the convs).
    act is ReLU or Mish (`activation`). The residual branch is dropped with probability `drop_path` in training: per image and
    rescaled by 1/keep ("sample"), or for the whole batch by returning x unchanged ("batch",
    the seed's block skip, only used on blocks whose input and output shapes agree). Under
    torch.compile a skipped block still runs (its output is discarded): its batch norms update
    their running statistics and its weights get zero gradients, so AdamW still decays them.
    """

    def __init__(self, cin: int, cout: int, stride: int, cfg: WRNConfig, drop_path: float):
        super().__init__()
        self.pre = cfg.block == "pre"
        self.drop_path, self.per_batch = drop_path, cfg.drop_path_mode == "batch"
        after_first = [nn.BatchNorm2d(cout), _activation(cfg), nn.Dropout(cfg.dropout)]
        second = [_conv3x3(cout, cout)]
        if not self.pre:
            second += [nn.BatchNorm2d(cout), nn.Dropout(cfg.dropout)]
        if cfg.se_reduction:
            second.append(SqueezeExcite(cout, cfg.se_reduction))
        self.branch = nn.Sequential(_conv3x3(cin, cout, stride), *after_first, *second)
        self.pre_act = nn.Sequential(nn.BatchNorm2d(cin), _activation(cfg)) if self.pre else None
        self.post_act = None if self.pre else _activation(cfg)
        self.shortcut: nn.Module | None = None
        if cin != cout or stride != 1:
            projection = [nn.Conv2d(cin, cout, 1, stride=stride, bias=False)]
            self.shortcut = nn.Sequential(*projection, *([] if self.pre else [nn.BatchNorm2d(cout)]))

    def forward(self, x: Tensor) -> Tensor:
        skip_batch = self.training and self.per_batch and self.drop_path
        # Eager: a host-side coin from the seeded CPU generator skips the block's arithmetic
        # with no device sync. Compiled: a host branch breaks the graph (and CUDA graphs), so
        # the block runs and a coin drawn on the device selects x instead of its output.
        compiling = _compiling()
        if skip_batch and not compiling and float(torch.rand(())) < self.drop_path:
            return x
        a = self.pre_act(x) if self.pre_act is not None else x
        # Pre-activation projections see the activated input (as in the WRN paper's code).
        skip = x if self.shortcut is None else self.shortcut(a)
        out = self.branch(a)
        if self.training and not self.per_batch and self.drop_path:
            keep = 1.0 - self.drop_path
            out = out * out.new_empty(out.shape[0], 1, 1, 1).bernoulli_(keep).div_(keep)
        out = skip + out
        out = out if self.post_act is None else self.post_act(out)
        if skip_batch and compiling:
            out = torch.where(torch.rand((), device=out.device) < self.drop_path, x, out)
        return out


def _compiling() -> bool:
    """True while torch.compile traces this code (one place for tests to patch)."""
    return torch.compiler.is_compiling()


@register("wrn", WRNConfig, summary=_summary, shared="model")
class WideResNet(nn.Module):
    """WRN-depth-widen (depth = 6n + 4): a 3x3 stem of 16 channels, three stages of n blocks
    with 16k, 32k and 64k channels (strides 1, 2, 2: 28 -> 14 -> 7), global pool and fc.

    Parameter counts on 1x28x28 input with 10 classes:
      WRN-28-2 (post)              1,467,770  (the seed's ~1.47M)
      WRN-40-4 (post)              8,949,818  (the seed's ~8.95M)
      SE-WRN-40-4 (pre, SE r=16)   9,016,290  (the seed's ~9.02M)
    The SE gates (two 1x1 convs with biases per block) add 67,368 to WRN-40-4. Pre- and
    post-activation differ only in batch-norm placement (pre: 8,948,922 without SE): post
    norms each conv's output and the projection shortcuts, pre norms each block's input and
    the head; the gap is under 0.01%. With one input channel the stem has 144 weights, not
    the 432 of the 3-channel CIFAR models the WRN paper counts.
    Drop-path: "sample" drops block i of N (counted over all stages) with probability
    drop_path * i / (N - 1), so the deepest block gets drop_path; "batch" skips blocks 2..n
    of every stage with probability drop_path, the first (shape-changing) block never.
    """

    def __init__(self, cfg: WRNConfig, input_shape: tuple[int, int, int] = (1, 28, 28),
                 num_classes: int = 10):
        super().__init__()
        n = (cfg.depth - 4) // 6
        widths = [16, 16 * cfg.widen, 32 * cfg.widen, 64 * cfg.widen]
        post = cfg.block == "post"
        stem: list[nn.Module] = [_conv3x3(input_shape[0], widths[0])]
        if post:
            stem += [nn.BatchNorm2d(widths[0]), _activation(cfg)]
        blocks, total = [], 3 * n
        for stage in range(3):
            for j in range(n):
                index = stage * n + j
                if cfg.drop_path_mode == "sample":
                    rate = cfg.drop_path * index / max(1, total - 1)
                else:
                    rate = cfg.drop_path if j > 0 else 0.0
                cin = widths[stage] if j == 0 else widths[stage + 1]
                stride = 2 if stage > 0 and j == 0 else 1
                blocks.append(Block(cin, widths[stage + 1], stride, cfg, rate))
        head: list[nn.Module] = [] if post else [nn.BatchNorm2d(widths[3]), _activation(cfg)]
        self.features = nn.Sequential(*stem, *blocks, *head, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.bias is None:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))
