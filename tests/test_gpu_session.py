"""GPU sessions: the CUDA defaults resolve from `auto` without touching CPU runs, a session is
planned to its budget, trains its runs side by side and resumes, its outputs travel within a
transfer's limits and come back verified, placed and committed by DVC."""

from __future__ import annotations

import pytest
import torch

from fashionbench.params import params_from_dict
from fashionbench.train import make_runtime, resolve_compile


# ---------------------------------------------------------------- the CUDA defaults


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_compile_auto_is_cuda_graphs_on_one_cuda_process(device):
    assert resolve_compile("auto", device) == "reduce-overhead"


@pytest.mark.parametrize("device", ["cpu", "mps", torch.device("cpu")])
def test_compile_auto_is_off_on_the_cpu_and_mps(device):
    assert resolve_compile("auto", device) == "none"


def test_compile_auto_is_off_for_the_quick_check_and_under_torchrun():
    assert resolve_compile("auto", "cuda", quick=True) == "none"
    assert resolve_compile("auto", "cuda", data_parallel=True) == "none"


@pytest.mark.parametrize("mode", ["none", "default", "reduce-overhead"])
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_an_explicit_compile_mode_is_kept(mode, device):
    assert resolve_compile(mode, device) == mode
    assert resolve_compile(mode, device, quick=True, data_parallel=True) == mode


def test_the_defaults_train_as_before_on_the_cpu(params_dict):
    """train_defaults says auto; on the CPU that is no compile, as every recorded CPU run had."""
    assert params_dict["train_defaults"]["compile"] == "auto"
    params_dict["train_defaults"]["device"] = "cpu"
    params = params_from_dict(params_dict)
    for row in ("cnn", "wrn", "mlp"):
        assert make_runtime(params.recipe(row)).compile == "none"
    params_dict["wrn"]["compile"] = "default"  # a recipe's own choice is kept
    assert make_runtime(params_from_dict(params_dict).recipe("wrn")).compile == "default"
