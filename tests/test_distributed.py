"""Data parallelism and GPU claims, in one process: each rank trains on its own slice of the
global batch (the torchrun end-to-end test is in test_runner.py), and concurrent training
processes take different GPUs."""

import fcntl
import logging

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fashionbench import distributed
from fashionbench.distributed import Group
from fashionbench.train import Runtime, make_optimizer, make_scheduler, train_one_epoch
from tests.test_train import recipe_of, synthetic


class Recorder(nn.Module):
    """A linear classifier that remembers every batch it is given."""

    def __init__(self):
        super().__init__()
        self.fc, self.seen = nn.Linear(28 * 28, 10), []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.fc(x.flatten(1))


@pytest.fixture
def one_process_group(tmp_path):
    """A real gloo group of one process, so a Group claiming world 2 can all_reduce."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def batches_seen(params_dict, group: Group) -> list[torch.Tensor]:
    recipe = recipe_of(params_dict, "mlp", batch_size=8)
    split = synthetic(32)
    model = Recorder()
    optimizer = make_optimizer(model, recipe, torch.device("cpu"))
    scheduler = make_scheduler(optimizer, recipe, 4)
    images, labels = torch.from_numpy(split.images).unsqueeze(1), torch.from_numpy(split.labels)
    gen = torch.Generator().manual_seed(0)
    result = train_one_epoch(model, optimizer, scheduler, images, labels, recipe, gen, mean=0.3, std=0.3,
                             runtime=Runtime(torch.device("cpu")), group=group)
    assert result["images"] == 32  # the global count, whatever the slice
    return model.seen


def test_each_rank_trains_on_its_half_of_the_same_global_batch(params_dict, one_process_group):
    whole = batches_seen(params_dict, Group())
    halves = [batches_seen(params_dict, Group(rank, 2)) for rank in (0, 1)]
    assert [len(b) for b in whole] == [8] * 4 and [len(b) for b in halves[0]] == [4] * 4
    for step, batch in enumerate(whole):
        # the same augmented global batch on every rank; rank r holds its r-th half
        assert torch.equal(torch.cat([halves[0][step], halves[1][step]]), batch)


def test_a_batch_that_does_not_split_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(distributed.DistributedError, match="batch_size 128 does not split over 3"):
        distributed.start(torch.device("cpu"), 128)


@pytest.fixture
def four_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("FASHIONBENCH_GPU_LOCKS", str(tmp_path / "locks"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed, "gpu_ids", lambda: ["gpu-a", "gpu-b", "gpu-c", "gpu-d"])
    yield tmp_path / "locks"
    distributed.release_gpus()


def hold(folder, gpu):
    """Another process's claim: a lock on its own open file."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / f"{gpu}.lock", "w")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def test_a_process_takes_the_first_gpu_no_other_holds_and_keeps_it(four_gpus):
    others = [hold(four_gpus, "gpu-a"), hold(four_gpus, "gpu-c")]
    assert distributed.claim_gpu() == 1  # gpu-b: a, held elsewhere, is skipped
    assert distributed.claim_gpu() == 1  # asked again, the same process keeps its GPU
    distributed.release_gpus()
    others[0].close()  # gpu-a's process ended
    assert distributed.claim_gpu() == 0


def test_when_every_gpu_is_held_the_first_is_shared_with_a_warning(four_gpus, caplog):
    others = [hold(four_gpus, gpu) for gpu in ("gpu-a", "gpu-b", "gpu-c", "gpu-d")]
    with caplog.at_level(logging.WARNING):
        assert distributed.claim_gpu() == 0
    assert "all 4 GPUs are held" in caplog.text
    assert others


def test_under_torchrun_the_gpu_is_the_local_rank(four_gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.claim_gpu() == 3
