"""The runner: a run trained in pieces equals one trained at once, its outputs are the train
stage's, and they travel split and come back joined."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fashionbench import runner
from fashionbench.data import Split, save_prepared
from tests.conftest import REPO, invoke, with_train_stats

EPOCHS = 3


@pytest.fixture
def make_root(tmp_path, write_params, monkeypatch):
    """A repository root with a tiny params.yaml (the MLP, EPOCHS epochs on the CPU) and
    prepared data; each call makes a separate root with its own checkpoints."""
    def edit(p):
        p["quick"] = False
        # fp32: bf16 autocast rounds a half batch's gradient differently from the whole batch's
        p["train_defaults"] |= {"device": "cpu", "checkpoint_every": 1, "precision": "fp32"}
        p["mlp"] |= {"epochs": EPOCHS, "arch": {"hidden": [16], "dropout": 0.0}}
    params = write_params(edit).read_text()
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (200, 28, 28), dtype=np.uint8), np.repeat(np.arange(10), 20))

    def make(name):
        root = tmp_path / name
        (root / "data").mkdir(parents=True)
        (root / "params.yaml").write_text(params)
        save_prepared(with_train_stats(split, None, split), root / "data/prepared")
        return root
    monkeypatch.setenv("FASHIONBENCH_CHECKPOINTS", str(tmp_path / "checkpoints"))
    return make


def train(root, *args):
    return invoke(runner.train, ["mlp", "--root", root, *args])


def state(root):
    return torch.load(root / "models/mlp/seed0/model.pt", weights_only=True)["state_dict"]


def test_pieces_resume_to_the_same_weights_as_one_run(make_root, tmp_path, monkeypatch):
    pieces = make_root("pieces")
    for epoch in (1, 2):
        result = train(pieces, "--epochs", "1")
        assert result.exit_code == runner.NOT_DONE_EXIT, result.output
        assert f"stopped after epoch {epoch} of {EPOCHS}" in result.output
        assert not (pieces / "models/mlp/seed0/model.pt").exists()  # written by the last piece only
    result = train(pieces, "--epochs", "1")
    assert result.exit_code == 0 and "done" in result.output, result.output

    monkeypatch.setenv("FASHIONBENCH_CHECKPOINTS", str(tmp_path / "other-checkpoints"))
    whole = make_root("whole")
    assert train(whole).exit_code == 0
    for key, tensor in state(whole).items():
        assert torch.equal(tensor, state(pieces)[key]), key  # bit-identical on the CPU
    for name in ("train/loss", "train/acc", "lr"):
        tsv = f"plots/train/mlp-seed0/plots/metrics/{name}.tsv"
        assert (pieces / tsv).read_text() == (whole / tsv).read_text()
        assert len((pieces / tsv).read_text().splitlines()) == EPOCHS + 1  # header + one per epoch


def test_outputs_are_the_train_stages(make_root):
    root = make_root("run")
    assert train(root).exit_code == 0
    record = (root / "metrics/train/mlp-seed0.json").read_text()
    assert '"run": "mlp-seed0"' in record and '"epochs": 3' in record
    assert (root / "plots/train/mlp-seed0/metrics.json").is_file()
    assert [p.as_posix() for p in runner.outputs("mlp", 0)] == [
        "models/mlp/seed0/model.pt", "metrics/train/mlp-seed0.json", "plots/train/mlp-seed0"]


def test_split_transfer_and_place(make_root, tmp_path):
    root, out = make_root("gpu"), tmp_path / "out"
    assert train(root, "--out", out, "--split-mib", "0.01").exit_code == 0
    parts = sorted((out / "models/mlp/seed0").iterdir())
    assert len(parts) > 1 and all(p.stat().st_size <= 0.01 * 2**20 for p in parts)
    home = tmp_path / "home"
    result = invoke(runner.place, [out, "--root", home])
    assert result.exit_code == 0 and "dvc commit" in result.output, result.output
    for rel in ("models/mlp/seed0/model.pt", "metrics/train/mlp-seed0.json",
                "plots/train/mlp-seed0/plots/metrics/train/loss.tsv"):
        assert (home / rel).read_bytes() == (root / rel).read_bytes(), rel

    parts[-1].unlink()  # a part lost in transfer
    broken = tmp_path / "broken"
    result = invoke(runner.place, [out, "--root", broken])
    assert result.exit_code == 2 and "model.pt" in result.output and "Traceback" not in result.output


def test_place_refuses_a_missing_folder(tmp_path):
    result = invoke(runner.place, [tmp_path / "nowhere"])
    assert result.exit_code == 2 and "nowhere" in result.output


def test_time_measures_an_epoch_and_the_epochs_that_fit(make_root):
    root = make_root("timing")
    result = invoke(runner.time_row, ["mlp", "--root", root, "--minutes", "1", "--images", "64", "--json"])
    assert result.exit_code == 0, result.output
    timing = json.loads(result.output)
    assert timing["row"] == "mlp" and timing["device"] == "cpu" and timing["s_per_epoch"] > 0
    assert timing["epochs_fit"] == int(60 // timing["s_per_epoch"])
    assert not (root / "models").exists()  # a measurement trains nothing it keeps

    result = invoke(runner.time_row, ["mpl", "--root", root])
    assert result.exit_code == 2 and "mpl" in result.output and "Traceback" not in result.output


def torchrun(root, *args):
    """The runner under torchrun: 2 CPU processes (gloo), as `torchrun --nproc_per_node 2`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fashionbench.runner", "train", "mlp", "--root", str(root), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)


def batch(root, size):
    path = root / "params.yaml"
    path.write_text(path.read_text().replace("batch_size: 128", f"batch_size: {size}", 1))


def test_ddp_two_processes_follow_one_with_the_same_global_batch_and_resume(make_root, tmp_path, monkeypatch):
    single = make_root("single")
    batch(single, 40)  # 5 steps per epoch
    assert train(single).exit_code == 0

    monkeypatch.setenv("FASHIONBENCH_CHECKPOINTS", str(tmp_path / "ddp-checkpoints"))
    ddp = make_root("ddp")
    batch(ddp, 40)
    piece = torchrun(ddp, "--epochs", "1")  # every process stops at rank 0's budget
    assert piece.returncode != 0 and "stopped after epoch 1 of 3" in piece.stdout, piece.stderr[-2000:]
    assert not (ddp / "models/mlp/seed0/model.pt").exists()
    whole = torchrun(ddp)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert whole.stdout.count("done, 3 epochs") == 1  # only rank 0 reports and writes
    for key, tensor in state(single).items():
        torch.testing.assert_close(state(ddp)[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    record = json.loads((ddp / "metrics/train/mlp-seed0.json").read_text())
    assert record["train_images_per_s"] > 0 and record["epochs"] == EPOCHS
    tsv = "plots/train/mlp-seed0/plots/metrics/train/loss.tsv"
    assert len((ddp / tsv).read_text().splitlines()) == EPOCHS + 1


def test_ddp_refuses_a_batch_that_does_not_split(make_root):
    root = make_root("odd")
    batch(root, 25)
    result = torchrun(root)
    assert result.returncode != 0 and "batch_size 25 does not split over 2 processes" in result.stdout + result.stderr
