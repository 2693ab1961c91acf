"""Batched augmentations: small pure functions of a batch and an explicit torch.Generator.

Images are (N, C, H, W) tensors, uint8 or float, on any device; `gen` must live on the same
device. Every random draw comes from `gen`, so a seeded generator reproduces a batch exactly,
and nothing waits on the host: no PIL, no per-image Python, with one exception: AutoAugment
(torchvision's policies, applied image by image; see `autoaugment`).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fashionbench.dataset import RESIZE_MARGIN
from fashionbench.params import Augment


def _rand(n: int, gen: torch.Generator, low: float = 0.0, high: float = 1.0) -> Tensor:
    return torch.rand(n, generator=gen, device=gen.device) * (high - low) + low


def _per_image(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


def _box(shape: torch.Size, top: Tensor, left: Tensor, height: Tensor, width: Tensor) -> Tensor:
    """(N,1,H,W) bool mask of one rectangle per image (corners may lie outside the image)."""
    _, _, h, w = shape
    rows = torch.arange(h, device=top.device)[None, :]
    cols = torch.arange(w, device=top.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + height)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def shift(x: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """Move image i by (dy[i], dx[i]) whole pixels; uncovered pixels become 0."""
    n, c, h, w = x.shape
    rows = torch.arange(h, device=x.device) - dy[:, None]  # source row of each output row
    cols = torch.arange(w, device=x.device) - dx[:, None]
    out = x.gather(2, rows.clamp(0, h - 1)[:, None, :, None].expand(n, c, h, w))
    out = out.gather(3, cols.clamp(0, w - 1)[:, None, None, :].expand(n, c, h, w))
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    return out.masked_fill(~inside[:, None], 0)


def random_crop(x: Tensor, pad: int, gen: torch.Generator) -> Tensor:
    """A random HxW crop of the image zero-padded by `pad` px on every side."""
    n = x.shape[0]
    dy, dx = (torch.randint(-pad, pad + 1, (n,), generator=gen, device=gen.device) for _ in range(2))
    return shift(x, dy, dx)


def as_nchw(images: Tensor) -> Tensor:
    """Stored images as a batch (N, C, H, W): grey (N, H, W) gains its channel; colour
    (N, H, W, C) becomes a channels-last view, no copy."""
    return images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)


def enlarge(x: Tensor, size: int) -> Tensor:
    """uint8 images as stored (e.g. 28 px) -> bilinear-resized to `size` + RESIZE_MARGIN px, the frame
    a `size`-px recipe crops from; unchanged when `size` is the stored side."""
    if size == x.shape[-1]:
        return x
    side = size + RESIZE_MARGIN
    big = F.interpolate(x.float(), size=(side, side), mode="bilinear", align_corners=False)
    return big.round_().clamp_(0, 255).to(torch.uint8)


def random_crop_to(x: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """A random `size` x `size` window of each image (no padding)."""
    n, _, h, w = x.shape
    top = torch.randint(0, h - size + 1, (n,), generator=gen, device=gen.device)
    left = torch.randint(0, w - size + 1, (n,), generator=gen, device=gen.device)
    return shift(x, -top, -left)[..., :size, :size]


def centre_crop(x: Tensor, size: int) -> Tensor:
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]


def input_view(x: Tensor, size: int) -> Tensor:
    """Stored uint8 images as a `size`-px recipe sees them without augmentation
    (validation, precise BN, evaluation): resized to `size` + margin, centre crop."""
    return centre_crop(enlarge(x, size), size)


@functools.cache
def _autoaugment_policy(policy: str):  # noqa: ANN202 (a torchvision transform)
    from torchvision.transforms import v2

    return v2.AutoAugment(v2.AutoAugmentPolicy(policy))


def autoaugment(x: Tensor, policy: str, gen: torch.Generator) -> Tensor:
    """torchvision's AutoAugment `policy` (cifar10, imagenet, svhn) on uint8 images, one
    sub-policy drawn per image. Per image because torchvision applies one draw to a whole
    batch tensor; its draws come from torch's global generator, so they are seeded from `gen`
    once per batch. Its cost per epoch is a row of the speed bench."""
    transform = _autoaugment_policy(policy)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([transform(image) for image in x])


def translate(x: Tensor, fraction: float, gen: torch.Generator) -> Tensor:
    """Shift by round(U(-fraction, fraction) * side) px per axis, as torchvision's RandomAffine."""
    n, _, h, w = x.shape
    dy = torch.round(_rand(n, gen, -fraction * h, fraction * h)).long()
    dx = torch.round(_rand(n, gen, -fraction * w, fraction * w)).long()
    return shift(x, dy, dx)


def hflip(x: Tensor, p: float, gen: torch.Generator) -> Tensor:
    """Mirror each image left-right with probability p."""
    flip = _per_image(_rand(x.shape[0], gen) < p)
    return torch.where(flip, x.flip(-1), x)


def _hash_bit(index: Tensor, salt: int) -> Tensor:
    """A fixed pseudo-random bit per integer index (a 32-bit integer hash, salted)."""
    h = (index.long() + (salt % 2**31) * 0x9E3779B1) & 0xFFFFFFFF
    h = ((h >> 16) ^ h) * 0x45D9F3B & 0xFFFFFFFF
    h = ((h >> 16) ^ h) * 0x45D9F3B & 0xFFFFFFFF
    return ((h >> 16) ^ h) & 1 == 1


def alternating_flip(x: Tensor, index: Tensor, epoch: int, gen: torch.Generator) -> Tensor:
    """airbench's derandomised flip: training image `index[i]` is mirrored in epoch 1 or not
    by a fixed coin (a hash of its index, salted by the seed `gen` was made with; nothing is
    drawn), and in each later epoch the opposite of the one before: over any two epochs every
    image is seen once each way, where independent coins repeat a side half the time."""
    flip = _hash_bit(index, gen.initial_seed()) ^ (epoch % 2 == 0)
    return torch.where(_per_image(flip), x.flip(-1), x)


def jitter(x: Tensor, strength: float, p: float, gen: torch.Generator) -> Tensor:
    """With probability p, brightness then contrast factors from U(1 - s, 1 + s).

    x is float in [0, 1]; contrast blends with each image's mean, as torchvision does.
    """
    n = x.shape[0]
    apply = _rand(n, gen) < p
    brightness = torch.where(apply, _rand(n, gen, 1 - strength, 1 + strength), 1.0)
    contrast = torch.where(apply, _rand(n, gen, 1 - strength, 1 + strength), 1.0)
    x = (x * _per_image(brightness)).clamp(0, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * _per_image(contrast) + mean).clamp(0, 1)


def random_erase(x: Tensor, p: float, scale: tuple[float, float], gen: torch.Generator,
                 ratio: tuple[float, float] = (0.3, 3.3), value: float = 0.0) -> Tensor:
    """With probability p, set a rectangle of area U(scale) * HW and aspect ratio log-U(ratio)
    to `value` (torchvision's RandomErasing, with the box clipped to the image instead of
    re-drawn)."""
    n, _, h, w = x.shape
    area = _rand(n, gen, *scale) * h * w
    aspect = torch.exp(_rand(n, gen, math.log(ratio[0]), math.log(ratio[1])))
    eh = torch.sqrt(area * aspect).round().clamp(1, h).long()
    ew = torch.sqrt(area / aspect).round().clamp(1, w).long()
    top = (_rand(n, gen) * (h - eh + 1)).long()
    left = (_rand(n, gen) * (w - ew + 1)).long()
    mask = _box(x.shape, top, left, eh, ew) & _per_image(_rand(n, gen) < p)
    return x.masked_fill(mask, value)


def cutout(x: Tensor, size: int, gen: torch.Generator, value: float = 0.0) -> Tensor:
    """Set a size x size square centred on a random pixel (clipped at the border) to `value`."""
    n, _, h, w = x.shape
    cy, cx = (torch.randint(0, s, (n,), generator=gen, device=gen.device) for s in (h, w))
    side = torch.full_like(cy, size)
    return x.masked_fill(_box(x.shape, cy - size // 2, cx - size // 2, side, side), value)


def _gamma(alpha: float, n: int, gen: torch.Generator, tries: int = 16) -> Tensor:
    """Gamma(alpha) by Marsaglia-Tsang, vectorised: each draw keeps the first accepted of
    `tries` candidates (each accepted with probability > 0.95, so a miss is < 1e-20)."""
    a = alpha + 1 if alpha < 1 else alpha
    d = a - 1 / 3
    c = 1 / math.sqrt(9 * d)
    z = torch.randn(n, tries, generator=gen, device=gen.device)
    u = torch.rand(n, tries, generator=gen, device=gen.device)
    v = (1 + c * z) ** 3
    ok = (v > 0) & (u.log() < 0.5 * z * z + d - d * v + d * v.clamp_min(1e-12).log())
    g = d * v.gather(1, ok.int().argmax(dim=1, keepdim=True)).squeeze(1).clamp_min(1e-12)
    if alpha < 1:  # Gamma(a) = Gamma(a + 1) * U^(1/a)
        g = g * _rand(n, gen).pow(1 / alpha)
    return g


def sample_beta(alpha: float, n: int, gen: torch.Generator) -> Tensor:
    """n draws of Beta(alpha, alpha) on gen's device."""
    g1, g2 = _gamma(alpha, n, gen), _gamma(alpha, n, gen)
    return g1 / (g1 + g2)


def mixup(x: Tensor, y: Tensor, alpha: float, gen: torch.Generator,
          num_classes: int = 10) -> tuple[Tensor, Tensor]:
    """Blend each image with a random partner by lam ~ Beta(alpha, alpha), drawn per image.

    Returns the mixed images and the mixed one-hot targets (N, num_classes).
    """
    lam = sample_beta(alpha, x.shape[0], gen)
    partner = torch.randperm(x.shape[0], generator=gen, device=gen.device)
    mixed = _per_image(lam) * x + _per_image(1 - lam) * x[partner]
    return mixed, _mix_targets(y, partner, lam, num_classes)


def cutmix(x: Tensor, y: Tensor, alpha: float, gen: torch.Generator,
           num_classes: int = 10) -> tuple[Tensor, Tensor]:
    """Paste a random partner's box of area (1 - lam) HW, lam ~ Beta(alpha, alpha) per image;
    targets mix by the box's area after clipping at the border."""
    n, _, h, w = x.shape
    lam = sample_beta(alpha, n, gen)
    cut = torch.sqrt(1 - lam)
    bh, bw = (cut * h).round().long(), (cut * w).round().long()
    cy, cx = (torch.randint(0, s, (n,), generator=gen, device=gen.device) for s in (h, w))
    box = _box(x.shape, cy - bh // 2, cx - bw // 2, bh, bw)
    partner = torch.randperm(n, generator=gen, device=gen.device)
    lam = 1 - box.flatten(1).float().mean(dim=1)
    return torch.where(box, x[partner], x), _mix_targets(y, partner, lam, num_classes)


def _mix_targets(y: Tensor, partner: Tensor, lam: Tensor, num_classes: int) -> Tensor:
    own, other = F.one_hot(y, num_classes).float(), F.one_hot(y[partner], num_classes).float()
    return lam[:, None] * own + (1 - lam[:, None]) * other


def normalise(x: Tensor, mean: float, std: float) -> Tensor:
    """uint8 images -> float, standardised with the training split's pixel mean and std: the
    one normalisation training, precise-BN and evaluation share."""
    return (x.float() / 255.0 - mean) / std


def augment_batch(x: Tensor, cfg: Augment, gen: torch.Generator, mean: float, std: float,
                  size: int = 0, *, index: Tensor | None = None, epoch: int = 1) -> Tensor:
    """uint8 (N,C,H,W) -> normalised float (N,C,size,size), in the seed's order: crop (a random
    `size` window where H is larger: the enlarged frame of a 32-px recipe), AutoAugment, jitter,
    hflip, translate, normalise, erase (then cutout). Steps switched off draw nothing.
    `index` (the images' places in the training set) and `epoch` (from 1) drive
    cfg.alternate_flip."""
    if size and x.shape[-1] > size:
        x = random_crop_to(x, size, gen)
    if cfg.crop_pad:
        x = random_crop(x, cfg.crop_pad, gen)
    if cfg.autoaugment != "none":
        x = autoaugment(x, cfg.autoaugment, gen)
    x = x.float() / 255.0
    if cfg.jitter and cfg.jitter_p:
        x = jitter(x, cfg.jitter, cfg.jitter_p, gen)
    if cfg.hflip and cfg.alternate_flip:
        if index is None:
            raise ValueError("alternate_flip needs the images' training-set indices (index=)")
        x = alternating_flip(x, index, epoch, gen)
    elif cfg.hflip:
        x = hflip(x, cfg.hflip, gen)
    if cfg.translate:
        x = translate(x, cfg.translate, gen)
    x = (x - mean) / std
    if cfg.erase_p:
        x = random_erase(x, cfg.erase_p, cfg.erase_scale, gen)
    if cfg.cutout:
        x = cutout(x, cfg.cutout, gen)
    return x


def mix_batch(x: Tensor, y: Tensor, cfg: Augment, gen: torch.Generator,
              num_classes: int = 10) -> tuple[Tensor, Tensor]:
    """Mixup and/or CutMix as `cfg` asks; with both on, each image takes one at random.

    Returns (images, targets): class indices when neither is on, else soft targets.
    """
    if not (cfg.mixup or cfg.cutmix):
        return x, y
    if not cfg.cutmix:
        return mixup(x, y, cfg.mixup, gen, num_classes)
    if not cfg.mixup:
        return cutmix(x, y, cfg.cutmix, gen, num_classes)
    (xm, tm), (xc, tc) = mixup(x, y, cfg.mixup, gen, num_classes), cutmix(x, y, cfg.cutmix, gen, num_classes)
    use_cut = _rand(x.shape[0], gen) < 0.5
    return torch.where(_per_image(use_cut), xc, xm), torch.where(use_cut[:, None], tc, tm)
