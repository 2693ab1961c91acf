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


def test_a_cpu_run_with_compile_auto_gives_the_weights_it_gave_uncompiled(params_dict):
    from dataclasses import replace

    import numpy as np

    from fashionbench.data import Split
    from fashionbench.train import fit

    params_dict["train_defaults"] |= {"device": "cpu", "precise_bn": 0}
    params_dict["mlp"] |= {"epochs": 2, "warmup_epochs": 1.0, "arch": {"hidden": [8], "dropout": 0.0}}
    recipe = params_from_dict(params_dict).recipe("mlp")
    rng = np.random.default_rng(0)
    train = Split(rng.integers(0, 256, (256, 28, 28), dtype=np.uint8), np.repeat(np.arange(10), 26)[:256])
    weights = [fit("mlp", recipe.arch, replace(recipe, compile=mode), train, None, mean=0.3, std=0.35,
                   seed=0, progress=False).model.state_dict() for mode in ("auto", "none")]
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


# ---------------------------------------------------------------- a session, end to end on the CPU

import json
import os
import shutil
import subprocess

import numpy as np
import yaml

from fashionbench import gpu_session, runner
from fashionbench.data import Split, save_prepared
from tests.conftest import REPO, invoke, with_train_stats

SMALL = ["--max-files", "4", "--max-file-mib", "0.03", "--max-total-mib", "0.1"]  # tiny transfers
SESSION = ["mlp", "cnn", "--minutes", "5", "--parallel", "2", "--card", "cpu", "--startup-s", "1",
           "--compile-s", "0", "--eval-s", "5", "--pack-s", "5", "--margin", "0", "--min-epochs", "1",
           "--transfers", "20", "--records-mib", "0.01", *SMALL]
DVC_ENV = {**os.environ, "DVC_NO_ANALYTICS": "1"}


def tiny_params() -> dict:
    """The repository's params.yaml with a two-epoch MLP and CNN, trained and evaluated on the CPU."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["quick"] = False
    raw["train_defaults"] |= {"device": "cpu", "precision": "fp32", "checkpoint_every": 1, "precise_bn": 64}
    raw["mlp"] |= {"epochs": 2, "arch": {"hidden": [16], "dropout": 0.0}}
    raw["cnn"] |= {"epochs": 2, "arch": {"dropout": 0.0, "widths": [4, 8], "convs": 1, "batch_norm": False,
                                         "hidden": 16}}
    raw["seeds"] |= {"mlp": [0], "cnn": [0]}
    raw["evaluate"] |= {"device": "cpu", "gallery_size": 4, "gradcam_images": 2}
    if "corrupt" in raw:  # the corrupted test set every evaluation also scores: two, mild
        raw["corrupt"] |= {"subset_size": 10, "corruptions": raw["corrupt"]["corruptions"][:2], "severities": [1]}
    return raw


def corrupted_set(folder, raw, test):
    """data/corrupted from the tiny test split, where the pipeline has a corrupt stage."""
    if "corrupt" not in raw:
        return
    from fashionbench import corrupt

    cfg = raw["corrupt"]
    built = corrupt.build(test.images, test.labels, cfg["subset_size"], cfg["seed"], tuple(cfg["corruptions"]),
                          tuple(cfg["severities"]), "corrupt.subset_size")
    corrupt.save(built, folder / "data/corrupted")


def make_repo(folder):
    """A DVC repository of this checkout's code and pipeline, tiny params and tiny prepared data."""
    folder.mkdir(parents=True)
    for rel in ("fashionbench", "stages"):
        shutil.copytree(REPO / rel, folder / rel, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(REPO / "dvc.yaml", folder / "dvc.yaml")
    raw = tiny_params()
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    rng = np.random.default_rng(0)
    train = Split(rng.integers(0, 256, (200, 28, 28), dtype=np.uint8), np.repeat(np.arange(10), 20))
    test = Split(rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), np.repeat(np.arange(10), 5))
    save_prepared(with_train_stats(train, None, test), folder / "data/prepared")
    corrupted_set(folder, raw, test)
    (folder / "data/params-checked").write_text("checked\n")
    (folder / "bench").mkdir()
    speeds = {row: {"none": {"s_per_epoch": 1.0, "processes": 1, "source": "stated for the test"}}
              for row in ("mlp", "cnn")}
    (folder / "bench/gpu-epoch-seconds.json").write_text(json.dumps({"cards": {"cpu": speeds}}))
    return folder


def run_session(root, work, out, *extra):
    return invoke(gpu_session.run, [*SESSION, "--root", root, "--device", "cpu", "--work", work,
                                    "--data", work.parent / "carry", "--out", out, *extra])


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """One session of two tiny rows side by side: a first call stopped by its budget after one
    epoch, then a second that resumes, evaluates and lays out; later transfers fetched by `send`."""
    base = tmp_path_factory.mktemp("session")
    root, work = make_repo(base / "device"), base / "work"
    packed = invoke(gpu_session.pack_data, ["--root", root, "--out", base / "carry"])  # what travels
    assert packed.exit_code == 0, packed.output
    first = run_session(root, work, base / "out1", "--piece-epochs", "1")
    second = run_session(root, work, base / "out2")
    manifest = json.loads((base / "out2" / gpu_session.MANIFEST).read_text())
    transfers = [base / "out2"]
    for index in range(2, manifest["transfers"] + 1):
        sent = invoke(gpu_session.send, [work, "--transfer", index, "--out", base / f"t{index}"])
        assert sent.exit_code == 0, sent.output
        transfers.append(base / f"t{index}")
    return {"base": base, "root": root, "work": work, "first": first, "second": second,
            "manifest": manifest, "transfers": transfers}


def test_a_budget_stop_keeps_checkpoints_and_a_second_run_resumes(session):
    first, second, work = session["first"], session["second"], session["work"]
    assert first.exit_code == runner.NOT_DONE_EXIT, first.output
    assert "mlp-seed0: stopped at the budget" in first.output and "cnn-seed0: stopped" in first.output
    first_manifest = json.loads((session["base"] / "out1" / gpu_session.MANIFEST).read_text())
    assert {r["state"] for r in first_manifest["runs"]} == {"stopped"}
    assert not any(gpu_session.MODEL in f["name"] for f in first_manifest["files"])  # nothing finished
    assert second.exit_code == 0, second.output
    assert "resuming session" in second.output
    for name in ("mlp-seed0", "cnn-seed0"):
        log = (work / "logs" / f"{name}.train.log").read_text()
        assert "resuming from" in log and "at epoch 1 of 2" in log, log  # the checkpoint, not epoch 0
        curve = work / "runs" / name / "plots/train" / name / "plots/metrics/train/loss.tsv"
        assert len(curve.read_text().splitlines()) == 3  # header + epochs 1 and 2, once each


def test_the_data_travels_compressed_and_is_the_same_data(session):
    import zipfile

    carry, prepared = session["base"] / "carry", session["root"] / "data"
    with zipfile.ZipFile(carry / "prepared/arrays.npz") as packed:
        assert {i.compress_type for i in packed.infolist()} == {zipfile.ZIP_DEFLATED}
    for name in [p.name for p in prepared.iterdir() if p.is_dir()]:
        assert gpu_session.data_digest(carry / name) == gpu_session.data_digest(prepared / name)
    assert session["manifest"]["data"]["data/prepared"] == gpu_session.data_digest(prepared / "prepared")


def test_the_two_rows_train_side_by_side(session):
    state = json.loads((session["work"] / "session.json").read_text())
    spans = [[(c["started_s"], c["started_s"] + c["seconds"]) for c in state["runs"][name]["calls"]
              if c["stage"] == "train"][0] for name in ("mlp-seed0", "cnn-seed0")]
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, spans  # the first calls' training overlapped in time


def test_every_transfer_is_within_the_limits_and_lists_every_file(session):
    manifest = session["manifest"]
    assert manifest["transfers"] == len(session["transfers"]) > 1  # the small limits forced several
    for folder in session["transfers"]:
        files = list(folder.iterdir())
        assert len(files) <= 4 and sum(f.stat().st_size for f in files) <= 0.1 * 2**20, folder
        assert all(f.stat().st_size <= 0.03 * 2**20 for f in files), folder
    names = {f["name"] for f in manifest["files"]}
    assert any(gpu_session.PART in n for n in names)  # a file over 0.03 MiB travelled in parts
    for entry in manifest["files"]:
        assert {"size", "sha256", "run", "seed", "transfer"} <= set(entry)
    models = [f for f in manifest["files"] if gpu_session.MODEL in f["name"]]
    assert {(f["run"], f["seed"]) for f in models} == {("mlp-seed0", 0), ("cnn-seed0", 0)}
    assert {r["state"] for r in manifest["runs"]} == {"evaluated"}


def test_place_then_dvc_commit_leaves_the_stages_up_to_date(session, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(session["root"], home)
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=home, env=DVC_ENV, check=True)
    result = invoke(gpu_session.place, [*session["transfers"], "--root", home, "--record-speeds"])
    assert result.exit_code == 0, result.output
    stages = ["train_mlp@0", "train_cnn@0", "evaluate_mlp@mlp-0", "evaluate_cnn@cnn-0"]
    assert f"dvc commit -f {' '.join(stages)}" in result.output
    runs = session["work"] / "runs"
    for name, row in (("mlp-seed0", "mlp"), ("cnn-seed0", "cnn")):
        for rel in (f"models/{row}/seed0/model.pt", f"metrics/train/{name}.json", f"metrics/eval/{name}.json",
                    f"predictions/{name}.npz", f"plots/confusion/{name}.csv"):
            assert (home / rel).read_bytes() == (runs / name / rel).read_bytes(), rel
    speeds = json.loads((home / "bench/gpu-epoch-seconds.json").read_text())["cards"]["cpu"]
    assert speeds["mlp"]["none"]["processes"] == 2 and "gpu_session" in speeds["mlp"]["none"]["source"]
    subprocess.run(["dvc", "commit", "-f", *stages], cwd=home, env=DVC_ENV, check=True, capture_output=True)
    status = subprocess.run(["dvc", "status", *stages], cwd=home, env=DVC_ENV, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout + status.stderr


def snapshot(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and ".dvc" not in p.parts}


@pytest.fixture
def placing(session, tmp_path):
    """Copies of the transfers and of the repository, and a check that a refused place wrote nothing."""
    copies = []
    for index, folder in enumerate(session["transfers"]):
        copies.append(tmp_path / f"transfer{index + 1}")
        shutil.copytree(folder, copies[-1])
    home = tmp_path / "home"
    shutil.copytree(session["root"], home)
    (home / "models/mlp/seed0").mkdir(parents=True)
    (home / "models/mlp/seed0/model.pt").write_bytes(b"an earlier model")

    def refused(*folders):
        before = snapshot(home)
        result = invoke(gpu_session.place, [*folders, "--root", home])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert snapshot(home) == before  # nothing placed, nothing overwritten
        return result.output
    return copies, refused


def part_of(folder, kind):
    return next(p for p in sorted(folder.iterdir()) if kind in p.name)


def test_place_refuses_a_missing_part(placing):
    copies, refused = placing
    lost = next(p for folder in copies for p in sorted(folder.iterdir()) if gpu_session.PART in p.name)
    lost.unlink()
    assert f"{lost}: missing" in refused(*copies)


def test_place_refuses_a_damaged_file(placing):
    copies, refused = placing
    damaged = next(p for folder in copies for p in sorted(folder.iterdir()) if gpu_session.MODEL in p.name)
    content = bytearray(damaged.read_bytes())
    content[len(content) // 2] ^= 0xFF  # same size, one byte wrong
    damaged.write_bytes(bytes(content))
    assert f"{damaged}: SHA-256 differs" in refused(*copies)


def test_place_refuses_a_file_of_another_session(placing):
    copies, refused = placing
    stray = copies[0] / "wrn-seed0.model.fbz.part000"
    stray.write_bytes(b"from another session")
    assert f"{stray}: not in session" in refused(*copies)


def test_place_refuses_a_missing_transfer_and_a_mixed_session(placing):
    copies, refused = placing
    assert "transfer 2 is missing" in refused(copies[0], *copies[2:])
    other = json.loads((copies[1] / gpu_session.MANIFEST).read_text()) | {"session": "another-session"}
    (copies[1] / gpu_session.MANIFEST).write_text(json.dumps(other))
    assert "another-session" in refused(*copies)


def test_place_refuses_params_that_do_not_say_what_trained(session, placing, tmp_path):
    copies, refused = placing
    home = tmp_path / "home"
    raw = yaml.safe_load((home / "params.yaml").read_text())
    raw["mlp"]["epochs"] = 3
    (home / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert "set mlp.epochs: 2" in refused(*copies)


# ---------------------------------------------------------------- the plan

from fashionbench.params import read_yaml  # noqa: E402

CARDS = {"h200": {
    "wrn32": {"reduce-overhead": {"s_per_epoch": 3.0, "processes": 1, "source": "test"}},
    "resnet9": {"none": {"s_per_epoch": 2.5, "processes": 2, "source": "test"}},
    "resnet18": {"reduce-overhead": {"s_per_epoch": 2.0, "processes": 1, "source": "test"}},
    "cnn": {"reduce-overhead": {"s_per_epoch": 1.0, "processes": 1, "source": "test"}}}}


def repo_params():
    raw = read_yaml(REPO / "params.yaml")
    return raw, params_from_dict(raw)


def request(rows, minutes=9.0, **changes):
    fields = dict(rows=tuple(rows), seeds=None, minutes=minutes, parallel=3, card="h200", slowdown=0.25,
                  margin=0.2, min_epochs=10, epochs={}, stated={}, startup_s=15.0, compile_s=45.0,
                  eval_s=30.0, pack_s=30.0, check_compile="", check_epochs=5, weights="auto", transfers=1,
                  limits=gpu_session.Limits(), records_mib=0.5)
    return gpu_session.Request(**(fields | changes))


def plan_of(rows, **changes):
    raw, params = repo_params()
    return gpu_session.make_plan(raw, params, CARDS, request(rows, **changes))


def test_a_recipe_that_fits_is_kept_whole_and_one_that_does_not_is_shortened_with_its_schedule():
    plan = plan_of(["cnn", "wrn32"], seeds=(0,))
    cnn, wrn32 = (next(r for r in plan.runs if r.row == row) for row in ("cnn", "wrn32"))
    assert cnn.epochs == cnn.published and "cnn.epochs" not in cnn.overrides
    factor = 1 + 0.25 * (plan.lanes - 1)
    room = (9 * 60 - 30 - (15 + 45 + 30)) * (1 - 0.2)  # its lane: start, compile, evaluate, margin
    assert wrn32.published == 400 and wrn32.epochs == int(room / (3.0 * factor))
    assert wrn32.overrides["wrn32.epochs"] == wrn32.epochs
    assert wrn32.overrides["wrn32.warmup_epochs"] == pytest.approx(10 * wrn32.epochs / 400, abs=1e-4)
    assert plan.settings == {k: v for k, v in wrn32.overrides.items() if k != "seeds.wrn32"}
    assert wrn32.est_s <= 9 * 60 - 30


def test_the_seeds_of_a_row_share_its_epochs_and_the_plan_prints_as_a_table():
    plan = plan_of(["wrn32"], seeds=(0, 1, 2), epochs={"wrn32": 600})
    assert {r.epochs for r in plan.runs} == {plan.runs[0].epochs} and plan.runs[0].published == 600
    assert plan.runs[0].overrides["seeds.wrn32"] == [0, 1, 2]
    text = gpu_session.format_plan(plan)
    assert "est. min" in text and "-S 'wrn32.epochs=" in text
    rows = [line.split() for line in text.splitlines() if line.startswith("wrn32 ")]
    assert [r[1:4] for r in rows] == [[str(seed), str(plan.runs[0].epochs), "600"] for seed in (0, 1, 2)]


def test_the_compile_check_is_a_pair_at_equal_epochs_and_seed_side_by_side():
    plan = plan_of(["cnn"], check_compile="resnet18", check_epochs=4)
    pair = [r for r in plan.runs if r.check]
    assert [(r.name, r.mode) for r in pair] == [("resnet18-seed0-compiled", "reduce-overhead"),
                                                ("resnet18-seed0-eager", "none")]
    assert {r.epochs for r in pair} == {4} and pair[0].lane != pair[1].lane
    assert pair[0].overrides["resnet18.compile"] == "reduce-overhead"
    assert pair[1].seconds == pytest.approx(2.0 * gpu_session.GRAPH_GAIN)  # eager from the graphs figure


def test_weights_become_bf16_only_where_fp32_does_not_fit_the_transfers():
    small = plan_of(["cnn"], seeds=(0,))
    assert [r.weights for r in small.runs] == ["fp32"]
    big = plan_of(["resnet18", "wrn32"], seeds=(0,))  # 42.7 + 34.2 MiB in fp32: over 64 MiB
    assert {r.row: r.weights for r in big.runs} == {"resnet18": "bf16", "wrn32": "fp32"}
    assert big.batches == 1


@pytest.mark.parametrize("rows, changes, words", [
    (["resnet99"], {}, ["unknown row 'resnet99'", "did you mean 'resnet9'"]),
    (["cnn"], {"minutes": 9.5}, ["--minutes 9.5", "at most 9"]),
    (["wrn32"], {"minutes": 3.0, "min_epochs": 60}, ["wrn32 cannot fit 3 min", "minimum 60"]),
    (["cnn"], {"minutes": 1.0, "startup_s": 60.0}, ["hold no training for cnn-seed0"]),
    (["mlp", "wrn"], {}, ["no seconds per epoch for mlp, wrn on h200", "python -m fashionbench.runner time"]),
    (["resnet18"], {"seeds": (0, 1, 2), "transfers": 1, "weights": "fp32"}, ["--transfers 3"]),
])
def test_a_plan_that_cannot_work_is_refused_in_one_line(rows, changes, words):
    with pytest.raises(gpu_session.UserError) as err:
        plan_of(rows, **changes)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_the_commands_refuse_before_any_work(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    for command, args, words in [
        (gpu_session.plan, ["cnn", "--minutes", "12", "--root", REPO], "at most 9"),
        (gpu_session.plan, ["cnn", "--minutes", "5", "--epochs", "cnn:40", "--root", REPO], "ROW=NUMBER"),
        (gpu_session.run, ["nope", "--minutes", "5", "--device", "cpu", "--root", REPO, "--out", out,
                           "--work", work], "unknown row 'nope'"),
    ]:
        result = invoke(command, args)
        assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists() and not work.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present here")
def test_run_refuses_a_machine_without_cuda(tmp_path):
    result = invoke(gpu_session.run, ["cnn", "--minutes", "5", "--root", REPO, "--out", tmp_path / "out"])
    assert result.exit_code == 2 and "torch sees no GPU" in result.output, result.output
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- speeds, transfers and models


def test_speeds_come_from_the_table_alone_on_the_card():
    find = gpu_session.find_speed
    assert find(CARDS, "h200", "resnet9", "none", 0.25, {}).seconds == pytest.approx(2.5 / 1.25)  # 2 side by side
    eager = find(CARDS, "h200", "resnet9", "reduce-overhead", 0.25, {})
    assert eager.seconds == pytest.approx(2.0) and "upper bound" in eager.source
    assert find(CARDS, "h100", "resnet9", "none", 0.25, {}) is None
    stated = gpu_session.Speed(7.0, "stated")
    assert find(CARDS, "h200", "resnet9", "none", 0.25, {"resnet9": stated}) is stated
    assert gpu_session.card_name("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_session.card_name("NVIDIA H200") == "h200"


def test_packing_keeps_every_transfer_within_its_limits():
    limits = gpu_session.Limits(files=3, file_mib=1.0, total_mib=2.5)
    files = gpu_session._parts([("a", 3 * 2**20 + 5), ("b", 100), ("c", 2**20)], limits)
    assert [n for n, _ in files] == ["a.part000", "a.part001", "a.part002", "a.part003", "b", "c"]
    batches = gpu_session.pack(files, limits, reserve=1000)
    assert sorted(n for b in batches for n, _ in b) == sorted(n for n, _ in files)
    for batch in batches:
        assert len(batch) <= 2 and sum(s for _, s in batch) <= 2.5 * 2**20 - 1000  # 1 file kept for the manifest


def saved_model(path, channels_last):
    from fashionbench.models import save_trained
    from fashionbench.train import model_for

    raw, _ = repo_params()
    raw["cnn"]["arch"] |= {"widths": [16, 32]}
    params = params_from_dict(raw)
    recipe = params.recipe("cnn")
    torch.manual_seed(0)
    model = model_for(recipe.model, recipe.arch, recipe, params.dataset)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    save_trained(path, model, recipe.model, recipe.arch, mean=0.3, std=0.35, seed=0, epochs=1,
                 hflip=0.5, dataset=params.dataset)
    return path


def test_a_model_travels_compressed_and_comes_back_byte_for_byte(tmp_path):
    model = saved_model(tmp_path / "model.pt", channels_last=False)
    gpu_session.encode_model(model, tmp_path / "m.fbz")
    content, digest = gpu_session.decode_model(tmp_path / "m.fbz")
    assert content == model.read_bytes() and digest == gpu_session.sha256_file(model)


def test_bf16_weights_travel_at_a_third_and_rebuild_the_rounded_model_exactly(tmp_path):
    from fashionbench.models import load_trained

    original = saved_model(tmp_path / "original.pt", channels_last=True)
    rounded = shutil.copyfile(original, tmp_path / "model.pt")
    assert gpu_session.round_to_bf16(rounded) > 0
    before = torch.load(original, weights_only=True)["state_dict"]
    after = torch.load(rounded, weights_only=True)["state_dict"]
    for key, value in before.items():
        if value.dtype == torch.float32 and value.numel() >= gpu_session.ROUNDED_MIN:
            assert after[key].stride() == value.stride()  # the memory layout is kept
            torch.testing.assert_close(after[key], value, rtol=2**-8, atol=0)
            assert torch.equal(after[key], after[key].bfloat16().float())
        else:
            assert torch.equal(after[key], value), key  # biases and small tensors exactly
    load_trained(rounded)
    gpu_session.encode_model(rounded, tmp_path / "m.fbz")
    assert (tmp_path / "m.fbz").stat().st_size < 0.4 * rounded.stat().st_size
    content, digest = gpu_session.decode_model(tmp_path / "m.fbz")
    assert content == rounded.read_bytes() and digest == gpu_session.sha256_file(rounded)
