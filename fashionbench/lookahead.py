"""Lookahead (Zhang et al., 2019, "Lookahead Optimizer: k steps forward, 1 step back").

Ranger (Wright, 2019) is RAdam wrapped in Lookahead: `Lookahead(torch.optim.RAdam(...))`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class Lookahead(torch.optim.Optimizer):
    """Every `k` steps of the inner (fast) optimiser: slow += alpha * (fast - slow), fast = slow.

    The inner optimiser's param_groups are this one's, so an LR scheduler on the wrapper drives
    the inner optimiser; the state dict carries the inner state, the slow weights and the step
    count, so a checkpoint resumes exactly where it stopped.
    """

    def __init__(self, inner: torch.optim.Optimizer, k: int = 6, alpha: float = 0.5):
        if k < 1:
            raise ValueError(f"Lookahead k must be >= 1 steps, got {k}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"Lookahead alpha must be in (0, 1], got {alpha}")
        self.inner, self.k, self.alpha, self.fast_steps = inner, k, alpha, 0
        super().__init__(inner.param_groups, inner.defaults)
        self.param_groups = inner.param_groups  # one set of hyperparameters, the scheduler's
        self.slow = [p.detach().clone() for group in self.param_groups for p in group["params"]]

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        loss = self.inner.step(closure)
        self.fast_steps += 1
        if self.fast_steps % self.k == 0:
            fast = self._params()
            torch._foreach_lerp_(self.slow, fast, self.alpha)
            torch._foreach_copy_(fast, self.slow)
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "slow": [t.clone() for t in self.slow],
                "fast_steps": self.fast_steps, "k": self.k, "alpha": self.alpha}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(state_dict["slow"]) != len(self.slow):
            raise ValueError(f"the Lookahead state has {len(state_dict['slow'])} slow tensors; "
                             f"this model has {len(self.slow)}")
        self.inner.load_state_dict(state_dict["inner"])
        self.param_groups = self.inner.param_groups  # loading gave the inner optimiser new groups
        for slow, saved in zip(self.slow, state_dict["slow"]):
            slow.copy_(saved)
        self.fast_steps, self.k, self.alpha = state_dict["fast_steps"], state_dict["k"], state_dict["alpha"]
