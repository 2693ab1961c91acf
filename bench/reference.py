"""A training loop written the seed's way, as the speed reference for the engine.

torchvision Dataset of PIL images, per-sample PIL transforms, a DataLoader with no workers,
fp32, `.item()` every step: what the seed report's code does. Only the benchmarks use it.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms


class PILFashion(Dataset):
    """uint8 arrays served one PIL image at a time, like torchvision.datasets.FashionMNIST."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: transforms.Compose):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[index])  # 2-D uint8 -> mode "L"
        return self.transform(image), int(self.labels[index])


def seed_transform(augment: bool, mean: float = 0.2860, std: float = 0.3530) -> transforms.Compose:
    """The seed's WRN pipeline (crop pad 4, hflip, translate 0.1) or its CNN one (hflip only)."""
    steps = [transforms.RandomCrop(28, padding=4)] if augment else []
    steps += [transforms.RandomHorizontalFlip()]
    if augment:
        steps += [transforms.RandomAffine(0, translate=(0.1, 0.1))]
    steps += [transforms.ToTensor(), transforms.Normalize((mean,), (std,))]
    return transforms.Compose(steps)


def reference_images_per_s(model: nn.Module, images: np.ndarray, labels: np.ndarray,
                           batch_size: int, steps: int, augment: bool, warmup: int = 2,
                           device: torch.device = torch.device("cpu")) -> float:
    """Training images/s of the seed-style loop over `steps` timed steps (after `warmup`), each
    batch copied from the host to `device` as the seed did."""
    loader = DataLoader(PILFashion(images, labels, seed_transform(augment)),
                        batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    running_loss, done, start = 0.0, 0, 0.0
    for step, (x, y) in enumerate(loader):
        if step == warmup:
            start = time.perf_counter()
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()  # the seed's per-step host sync
        if step >= warmup:
            done += len(y)
        if step + 1 == warmup + steps:
            break
    return done / (time.perf_counter() - start)
