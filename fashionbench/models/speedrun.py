"""The CPU speed-run net: airbench's design (Keller Jordan's CIFAR-10 speed records) for small
grey images.

A frozen patch-whitening first conv whose filters are the leading eigenvectors of the patch
covariance of training images (each with both signs, then GELU), conv groups (conv, 2x2
max-pool, batch norm, GELU, conv, batch norm, GELU), a global max-pool, a bias-free linear
classifier and a fixed logit scale. Batch-norm scales are frozen at 1 (only their biases
train, at the recipe's `bn_bias_lr`); identity ("dirac") init makes each conv start by passing
its input channels through. The whitening filters need data: the trainer calls
init_from_data() with normalised training images before the first step (train.fit), and a
saved model carries them in its state dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fashionbench.models.registry import register
from fashionbench.params import _data, _require

WHITEN_EPS = 5e-4  # added to each eigenvalue: the flattest directions are not blown up to noise


@dataclass(frozen=True)
class SpeedrunArch:
    whiten: bool                # false: the first conv is an ordinary trainable one (ablation)
    whiten_kernel: int          # px side of the whitening patches (2 or 3)
    whiten_filters: int         # leading patch-covariance eigenvectors kept, <= patch pixels;
                                # each is applied with both signs: 2x as many channels out
    whiten_images: int          # training images whose patches give the covariance
    widths: tuple[int, ...]     # channels of each conv group (each halves the side)
    dirac: bool                 # identity init of every group conv
    logit_scale: float          # the logits are multiplied by this (airbench: 1/9)

    def __post_init__(self) -> None:
        _require(self.whiten_kernel in (2, 3), "whiten_kernel", "must be 2 or 3 px")
        pixels = self.whiten_kernel ** 2 * _data().channels
        _require(1 <= self.whiten_filters <= pixels, "whiten_filters",
                 f"{self.whiten_filters} is impossible: a {self.whiten_kernel}x{self.whiten_kernel} "
                 f"patch of {_data().channels}-channel images has {pixels} pixels, so at most "
                 f"{pixels} eigenvectors (filters)")
        _require(self.whiten_images >= 1, "whiten_images", "must be >= 1 image")
        side = _data().side - self.whiten_kernel + 1
        _require(1 <= len(self.widths) <= int(math.log2(side)) and all(w >= 1 for w in self.widths),
                 "widths", f"list 1 to {int(math.log2(side))} group widths >= 1 (each group halves "
                 f"the {side}-px side after whitening), e.g. [32, 64, 128]")
        _require(self.logit_scale > 0, "logit_scale", "must be > 0")


def _summary(arch: SpeedrunArch, shape: tuple[int, int, int], classes: int) -> str:
    k, widths = arch.whiten_kernel, "-".join(map(str, arch.widths))
    first = f"{k}x{k} whitening ({arch.whiten_filters} eigenvectors)" if arch.whiten else f"{k}x{k} conv"
    return f"speed-run net {widths}, {first}"


def whitening_filters(images: Tensor, kernel: int, filters: int, eps: float = WHITEN_EPS) -> Tensor:
    """(filters, C, kernel, kernel) conv weights that whiten the kernel x kernel patches of
    `images` (N, C, H, W float): the `filters` eigenvectors of the patch covariance (second
    moment, as airbench) with the largest eigenvalues, each divided by sqrt(eigenvalue + eps),
    so the patches' projections on them have (about) the identity covariance."""
    channels = images.shape[1]
    if filters > channels * kernel * kernel:
        raise ValueError(f"whiten_filters {filters} exceeds the {channels * kernel * kernel} "
                         f"pixels of a {kernel}x{kernel} patch")
    patches = F.unfold(images.double(), kernel).transpose(1, 2).reshape(-1, channels * kernel * kernel)
    covariance = patches.T @ patches / len(patches)
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    values, vectors = values.flip(0)[:filters], vectors.flip(1)[:, :filters]
    scaled = vectors.T / torch.sqrt(values.clamp_min(0) + eps)[:, None]
    return scaled.reshape(filters, channels, kernel, kernel).float()


def _conv(cin: int, cout: int, dirac: bool) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    if dirac:  # output i < cin starts as a copy of input i (airbench); the rest keep their init
        with torch.no_grad():
            nn.init.dirac_(conv.weight[:cin])
    return conv


def _norm(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    bn.weight.requires_grad_(False)  # scale frozen at 1: only the bias trains (airbench)
    return bn


class ConvGroup(nn.Sequential):
    """conv, 2x2 max-pool, BN, GELU, conv, BN, GELU: the pool before the norm halves the
    elementwise work of the group's first conv output."""

    def __init__(self, cin: int, cout: int, dirac: bool):
        super().__init__(_conv(cin, cout, dirac), nn.MaxPool2d(2), _norm(cout), nn.GELU(),
                         _conv(cout, cout, dirac), _norm(cout), nn.GELU())


@register("speedrun", SpeedrunArch, summary=_summary)
class Speedrun(nn.Module):
    def __init__(self, arch: SpeedrunArch, input_shape: tuple[int, int, int] = (1, 28, 28),
                 num_classes: int = 10):
        super().__init__()
        channels = input_shape[0]
        k, filters = arch.whiten_kernel, arch.whiten_filters
        if filters > channels * k * k:  # params.py says so first; a model built by hand too
            raise ValueError(f"whiten_filters {filters} exceeds the {channels * k * k} pixels of "
                             f"a {k}x{k} patch of {channels}-channel images")
        self.init_images = arch.whiten_images if arch.whiten else 0
        whiten = nn.Conv2d(channels, 2 * filters, k, bias=False).requires_grad_(not arch.whiten)
        groups, width = [], 2 * filters
        for out in arch.widths:
            groups.append(ConvGroup(width, out, arch.dirac))
            width = out
        # `features` then a classifier: the layout evaluate's Grad-CAM reads
        self.features = nn.Sequential(whiten, nn.GELU(), *groups, nn.AdaptiveMaxPool2d(1))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(width, num_classes, bias=False))
        self.logit_scale = arch.logit_scale
        self.whiten_filters = filters

    @property
    def whiten(self) -> nn.Conv2d:
        """The frozen whitening conv (2 x whiten_filters channels out)."""
        return self.features[0]

    @torch.no_grad()
    def init_from_data(self, images: Tensor) -> None:
        """Set the whitening filters from normalised training images (N, C, H, W) float:
        the eigenvectors with both signs (nothing when `whiten` is off)."""
        if not self.init_images:
            return
        k = self.whiten.kernel_size[0]
        weights = whitening_filters(images[:self.init_images], k, self.whiten_filters)
        self.whiten.weight.copy_(torch.cat([weights, -weights]).to(self.whiten.weight))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x)) * self.logit_scale
