"""The one place random sources are seeded, saved and restored."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and every CUDA device); return a generator on `device`.

    The global torch generators drive weight init, dropout and drop-path; the returned one
    drives data order and augmentation, explicitly, so both are reproducible from `seed`.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator(device=device).manual_seed(seed)


def rng_state(gen: torch.Generator) -> dict:
    """Every torch random state training consumes, as tensors (safe for weights_only loads)."""
    state = {"torch": torch.get_rng_state(), "generator": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    """Restore what rng_state saved."""
    torch.set_rng_state(state["torch"])
    gen.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
