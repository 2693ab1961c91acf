"""Lookahead: the slow weights follow the fast optimiser every k steps; state resumes exactly."""

import copy

import pytest
import torch
from torch import nn

from fashionbench.lookahead import Lookahead


def model_and_batches(seed: int = 0) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(20)]
    return model, batches


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches) -> None:
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_every_k_steps_the_weights_move_alpha_of_the_way_from_slow_to_fast():
    model, batches = model_and_batches()
    start = flat(model)
    plain = copy.deepcopy(model)
    train(plain, torch.optim.SGD(plain.parameters(), lr=0.1), batches[:5])
    train(model, Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=5, alpha=0.5), batches[:5])
    torch.testing.assert_close(flat(model), start + 0.5 * (flat(plain) - start))


def test_alpha_one_is_the_inner_optimiser():
    model, batches = model_and_batches()
    plain = copy.deepcopy(model)
    train(plain, torch.optim.RAdam(plain.parameters(), lr=0.01), batches)
    train(model, Lookahead(torch.optim.RAdam(model.parameters(), lr=0.01), k=3, alpha=1.0), batches)
    torch.testing.assert_close(flat(model), flat(plain))


def test_a_scheduler_on_the_wrapper_sets_the_inner_lr():
    model, _ = model_and_batches()
    inner = torch.optim.RAdam(model.parameters(), lr=0.01)
    optimizer = Lookahead(inner)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.step()
    scheduler.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.005)


def test_state_dict_resumes_between_two_syncs_exactly():
    model, batches = model_and_batches()
    whole = copy.deepcopy(model)
    train(whole, Lookahead(torch.optim.RAdam(whole.parameters(), lr=0.01), k=6), batches)

    first = Lookahead(torch.optim.RAdam(model.parameters(), lr=0.01), k=6)
    train(model, first, batches[:8])  # 8 steps: synced at 6, two fast steps since
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(first.state_dict())

    resumed, _ = model_and_batches(seed=1)  # other weights: all of them come from the state
    resumed.load_state_dict(saved_model)
    second = Lookahead(torch.optim.RAdam(resumed.parameters(), lr=0.01), k=6)
    second.load_state_dict(saved_optimizer)
    train(resumed, second, batches[8:])
    torch.testing.assert_close(flat(resumed), flat(whole), rtol=0, atol=0)
    # a scheduler on the resumed wrapper still reaches the inner optimiser's (reloaded) groups
    torch.optim.lr_scheduler.StepLR(second, step_size=1, gamma=0.5).step()
    assert second.inner.param_groups[0]["lr"] == pytest.approx(0.005)


@pytest.mark.parametrize("k, alpha", [(0, 0.5), (6, 0.0), (6, 1.5)])
def test_impossible_settings_are_refused(k, alpha):
    model, _ = model_and_batches()
    with pytest.raises(ValueError, match="Lookahead"):
        Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=k, alpha=alpha)
