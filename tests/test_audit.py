"""Audited faults, one test each: every test fails on the code before its fix."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import fashionbench.train as train_module
from fashionbench import predict, runner
from fashionbench.cli import user_errors
from fashionbench.data import Split, save_prepared
from fashionbench.models import build_model, save_trained
from fashionbench.models.mlp import MLPArch
from fashionbench.params import params_from_dict
from fashionbench.train import RunLockedError, fit
from tests.conftest import REPO, idx_bytes, invoke, with_train_stats


@pytest.fixture
def make_root(tmp_path, write_params, monkeypatch):
    """A repository root with a tiny params.yaml (the MLP, 2 epochs on the CPU) and prepared
    data; each call makes a separate root, all sharing one checkpoint root."""
    def edit(p):
        p["quick"] = False
        p["train_defaults"] |= {"device": "cpu", "checkpoint_every": 1, "precision": "fp32"}
        p["mlp"] |= {"epochs": 2, "arch": {"hidden": [16], "dropout": 0.0}}
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


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_same_seed_trained_twice_gives_a_byte_identical_model_file(make_root):
    first, second = make_root("first"), make_root("second")
    for root in (first, second):
        result = train(root)
        assert result.exit_code == 0, result.output
    model = "models/mlp/seed0/model.pt"
    assert md5(first / model) == md5(second / model)


# ---------------------------------------------------------------- the run lock and the checkpoint root


def tiny_recipe(params_dict, epochs=2):
    """The MLP row at 16 hidden units, `epochs` epochs on the CPU, checkpointed every epoch."""
    params_dict["quick"] = False
    params_dict["mlp"] |= {"epochs": epochs, "batch_size": 16, "device": "cpu", "checkpoint_every": 1,
                           "precision": "fp32", "arch": {"hidden": [16], "dropout": 0.0}}
    return params_from_dict(params_dict).recipe("mlp")


def tiny_fit(recipe, checkpoints, **kwargs):
    rng = np.random.default_rng(0)
    train_split = Split(rng.integers(0, 256, (32, 28, 28), dtype=np.uint8), np.arange(32) % 10)
    return fit(recipe.model, recipe.arch, recipe, train_split, None, mean=0.5, std=0.3, seed=0,
               checkpoint_dir=checkpoints, progress=False, **kwargs)


class Interrupted(Exception):
    """Stands in for a kill after epoch 1's checkpoint."""


def stop_after_epoch_1(metrics):
    if metrics["epoch"] == 1:
        raise Interrupted


HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("held", flush=True)
sys.stdin.read()
"""


def test_a_second_trainer_is_refused_at_once_naming_the_holder_and_keeps_its_pid(params_dict, tmp_path,
                                                                                 monkeypatch):
    recipe, checkpoints = tiny_recipe(params_dict), tmp_path / "checkpoints"
    with pytest.raises(Interrupted):
        tiny_fit(recipe, checkpoints, on_epoch=stop_after_epoch_1)
    [folder] = list(checkpoints.iterdir())
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder / "lock")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        set_up = []  # the optimiser's first build imports torch._dynamo: seconds
        monkeypatch.setattr(train_module, "make_optimizer", lambda *a: set_up.append(a) or 1 / 0)
        with pytest.raises(RunLockedError, match=rf"PID {holder.pid}\b.*`kill {holder.pid}`"):
            tiny_fit(recipe, checkpoints)
        assert set_up == []  # refused before the slow set-up
        assert (folder / "lock").read_text() == f"{holder.pid}\n"  # the holder's PID is still there
    finally:
        holder.communicate("")
    monkeypatch.undo()
    assert len(tiny_fit(recipe, checkpoints).history) == 2  # released: the run resumes and finishes


def test_finished_runs_leave_no_folder_and_old_unreadable_checkpoints_are_cleaned(params_dict, tmp_path):
    recipe, checkpoints = tiny_recipe(params_dict), tmp_path / "checkpoints"
    old = time.time() - 3600
    abandoned = checkpoints / "0123456789abcdef"  # an unfinished run: resumable, kept
    set_aside = checkpoints / "fedcba9876543210"  # an unreadable checkpoint an earlier run set aside
    for folder, name in ((abandoned, "checkpoint.pt"), (set_aside, "checkpoint.pt.unreadable")):
        folder.mkdir(parents=True)
        (folder / name).write_bytes(b"x")
        os.utime(folder / name, (old, old))
        os.utime(folder, (old, old))
    tiny_fit(recipe, checkpoints)
    assert sorted(p.relative_to(checkpoints).as_posix() for p in checkpoints.rglob("*")) == [
        "0123456789abcdef", "0123456789abcdef/checkpoint.pt"]


# ---------------------------------------------------------------- stages stop with their dvc

FAKE_DVC = """#!{python}
import os, subprocess, sys
# as dvc runs a stage's cmd: in a shell, with DVC_STAGE naming the stage
sys.exit(subprocess.call(sys.argv[1], shell=True, env={{**os.environ, "DVC_STAGE": "train_svm@rbf"}}))
"""

SVM_STAGE = """
import os, runpy, signal, sys, time
from pathlib import Path
import fashionbench.classical as classical

def long_fit(*args, **kwargs):
    if {native}:  # a fit in native code: the main thread runs no Python until it returns
        signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGTERM}})
    Path("fitting").write_text("")
    time.sleep(120)

classical.train_variant = long_fit
Path("stage.pid").write_text(str(os.getpid()))
while not Path("go").exists():  # the test says when the stage goes on
    time.sleep(0.05)
sys.argv = ["train_svm", "rbf"]
runpy.run_module("stages.train_svm", run_name="__main__")
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(path, parent, seconds=60):
    deadline = time.monotonic() + seconds
    while not path.is_file() and time.monotonic() < deadline and parent.poll() is None:
        time.sleep(0.05)
    assert path.is_file(), parent.communicate()[1][-2000:]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("when", ["fitting", "fitting in native code", "still importing"])
def test_svm_stage_stops_when_its_dvc_is_killed(tmp_path, write_params, when):
    write_params()
    split = Split(np.zeros((20, 28, 28), dtype=np.uint8) + np.arange(20)[:, None, None], np.arange(20) % 10)
    save_prepared(with_train_stats(split, None, split), tmp_path / "data/prepared")
    dvc = tmp_path / "bin/dvc"
    dvc.parent.mkdir()
    dvc.write_text(FAKE_DVC.format(python=sys.executable))
    dvc.chmod(0o755)
    (tmp_path / "stage.py").write_text(SVM_STAGE.format(native=when == "fitting in native code"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([str(dvc), f"{sys.executable} stage.py"], cwd=tmp_path, env=env,
                              stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "stage.pid", parent)
    stage = int((tmp_path / "stage.pid").read_text())
    if when != "still importing":  # dvc is killed while the fit runs, else before the stage's own code
        (tmp_path / "go").touch()
        wait_for(tmp_path / "fitting", parent)
    parent.kill()  # SIGKILL: dvc gets no chance to stop its stage
    parent.wait()
    (tmp_path / "go").touch()
    killed = time.monotonic()
    while alive(stage) and time.monotonic() < killed + 15:
        time.sleep(0.1)
    if alive(stage):
        os.kill(stage, signal.SIGKILL)  # no orphan outlives the test
        pytest.fail("the SVM stage outlived the dvc process that started it")
    assert time.monotonic() - killed < 8
    assert "is gone; stopping" in parent.stderr.read()
    assert (tmp_path / "fitting").exists() == (when != "still importing")  # a late stage fits nothing


# ---------------------------------------------------------------- preprocess: disk full, a truncated raw file


@pytest.fixture
def tiny_repo(tmp_path, write_params):
    """A repository folder with params.yaml and four small raw IDX files (300 train, 50 test)."""
    repo = tmp_path / "repo"
    (repo / "data/raw").mkdir(parents=True)
    params = write_params(lambda p: p.update(quick=False) or p["preprocess"].update(validation_size=50,
                                                                                   subset_size=0))
    params.rename(repo / "params.yaml")
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (300, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(300) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (50, 28, 28)),
              "t10k-labels-idx1-ubyte": np.arange(50) % 10}
    for name, array in arrays.items():
        (repo / "data/raw" / name).write_bytes(idx_bytes(array))
    return repo


def preprocess(repo, limit_kib=None):
    """`python -m stages.preprocess` in `repo`, under `ulimit -f limit_kib` when given."""
    command = f"exec {sys.executable} -m stages.preprocess"
    if limit_kib is not None:
        command = f"ulimit -f {limit_kib} && {command}"
    return subprocess.run(["bash", "-c", command], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)


def test_disk_full_while_preprocess_writes_is_one_line_and_keeps_the_old_files(tiny_repo):
    prepared = tiny_repo / "data/prepared"
    prepared.mkdir()
    old = {"arrays.npz": b"the previous arrays", "norm.json": b'{"mean": 0.286}\n'}
    for name, content in old.items():
        (prepared / name).write_bytes(content)
    result = preprocess(tiny_repo, limit_kib=100)  # the new arrays are 270 KiB
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "data/prepared/arrays.npz" in result.stderr and "ulimit -f" in result.stderr, result.stderr
    assert {p.name: p.read_bytes() for p in prepared.iterdir()} == old  # no temporary file left either


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EIO])
def test_disk_full_and_kin_are_one_line_naming_the_file_and_others_keep_their_traceback(code):
    def stage():
        with user_errors():
            raise OSError(code, os.strerror(code), "data/prepared/arrays.npz")
    result = invoke(stage)
    if code == errno.EIO:  # not one a user fixes by freeing space or changing a limit or mode
        assert isinstance(result.exception, OSError) and result.exit_code == 1
        return
    assert result.exit_code == 2 and not isinstance(result.exception, OSError), result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith("error: data/prepared/arrays.npz: ") and os.strerror(code) in line, line


def test_truncated_raw_file_names_the_path_and_the_download_stage(tiny_repo):
    raw = tiny_repo / "data/raw/train-images-idx3-ubyte"
    raw.write_bytes(raw.read_bytes()[:5000])
    result = preprocess(tiny_repo)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = result.stderr.strip().splitlines()
    assert "data/raw/train-images-idx3-ubyte" in line and "`dvc repro download`" in line, line
    assert not (tiny_repo / "data/prepared").exists()


# ---------------------------------------------------------------- the runner: export, place, numbers


def snapshot(root):
    """Every file under `root` (temporary ones included) and its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def forge(out, rel, content):
    """Replace exported file `rel` by `content` and list it so in the manifest, as a consistent
    export of a broken file would be (one part if the file was split)."""
    manifest = json.loads((out / "manifest.json").read_text())
    [entry] = [e for e in manifest["files"] if e["path"] == rel]
    digest = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    if entry.get("parts"):
        for part in entry["parts"]:
            (out / part["path"]).unlink()
        (out / f"{rel}.part000").write_bytes(content)
        entry["parts"] = [{"path": f"{rel}.part000"} | digest]
    else:
        (out / rel).write_bytes(content)
    entry |= digest
    (out / "manifest.json").write_text(json.dumps(manifest))


RECORD, MODEL, PARTS = "metrics/train/mlp-seed0.json", "models/mlp/seed0/model.pt", "models/mlp/seed0/model.pt.part"
BREAKS = {  # what a transfer or a bad run does to an export -> what the error must name
    "part000 missing": (lambda out: (out / f"{PARTS}000").unlink(), [], f"{PARTS}000"),
    "last part missing": (lambda out: sorted((out / MODEL).parent.iterdir())[-1].unlink(), [], f"{PARTS}00"),
    "a part cut short": (lambda out: (out / f"{PARTS}002").write_bytes((out / f"{PARTS}002").read_bytes()[:99]),
                         [], f"{PARTS}002 has 99 bytes"),
    "a part changed": (lambda out: (out / f"{PARTS}001").write_bytes(b"\0" * (out / f"{PARTS}001").stat().st_size),
                       [], f"{PARTS}001 is not the file exported"),
    "run record broken in transfer": (lambda out: (out / RECORD).write_text('{"run": "mlp-se'), [], RECORD),
    "run record broken by the run": (lambda out: forge(out, RECORD, b'{"run": "mlp-se'), [],
                                     f"{RECORD} is not valid JSON"),
    "record of another run": (lambda out: forge(out, RECORD, b'{"run": "mlp-seed1", "seed": 1}'), [],
                              f"{RECORD} is the record of 'mlp-seed1'"),
    "model that does not load": (lambda out: forge(out, MODEL, b"PK\3\4 not a model"), [],
                                 f"{MODEL} (joined from 1 parts) is not a model"),
    "manifest missing": (lambda out: (out / "manifest.json").unlink(), [], "manifest.json is missing"),
    "another seed than asked": (lambda out: None, ["--seed", "1"], "holds run mlp-seed0, not mlp-seed1"),
    "another row than asked": (lambda out: None, ["--row", "cnn"], "holds run mlp-seed0, not cnn-seed0"),
}


def test_place_with_a_bad_export_changes_nothing_and_names_what_is_wrong(make_root, tmp_path):
    gpu, out, home = make_root("gpu"), tmp_path / "out", make_root("home")
    assert train(gpu, "--out", out, "--split-mib", "0.01").exit_code == 0
    assert len(list((out / MODEL).parent.glob("model.pt.part*"))) > 3
    assert train(home).exit_code == 0  # the workspace's own good outputs of the same run
    (home / RECORD).write_text((home / RECORD).read_text().replace('"epochs"', '"home": 1, "epochs"'))
    before = snapshot(home)
    for case, (damage, args, named) in BREAKS.items():
        broken = tmp_path / case.replace(" ", "-")
        shutil.copytree(out, broken)
        damage(broken)
        result = invoke(runner.place, [broken, "--root", home, *args])
        assert result.exit_code == 2 and "Traceback" not in result.output, (case, result.output)
        assert named in result.output and result.output.startswith("error: "), (case, result.output)
        assert snapshot(home) == before, case  # nothing replaced, no temporary file left
    result = invoke(runner.place, [out, "--root", home, "--row", "mlp", "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert snapshot(home) != before and (home / MODEL).read_bytes() == (gpu / MODEL).read_bytes()
    assert (home / RECORD).read_bytes() == (gpu / RECORD).read_bytes()


def test_train_with_a_negative_split_size_is_refused_before_training(make_root, tmp_path):
    root, out = make_root("run"), tmp_path / "out"
    result = train(root, "--out", out, "--split-mib", "-1")
    assert result.exit_code == 2 and "--split-mib" in result.output and "done" not in result.output, result.output
    assert not out.exists() and not (root / "models").exists()
    assert train(root).exit_code == 0
    with pytest.raises(runner.ExportError, match="part size -1 bytes"):
        runner.export(root, runner.outputs("mlp", 0), out, -1)
    assert not out.exists()


@pytest.mark.parametrize("args, option", [
    (["time", "mlp", "--images", "-5"], "--images"),
    (["time", "mlp", "--images", "0"], "--images"),
    (["time", "mlp", "--minutes", "-1"], "--minutes"),
    (["train", "mlp", "--minutes", "-1"], "--minutes"),
    (["train", "mlp", "--minutes", "0"], "--minutes"),
    (["train", "mlp", "--seed", "-1"], "--seed"),
    (["train", "mlp", "--seed", str(2**32)], "--seed"),
    (["train", "mlp", "--epochs", "-1"], "--epochs"),
    (["place", "out", "--seed", "-1"], "--seed"),
])
def test_runner_refuses_out_of_range_numbers_where_it_parses_them(make_root, args, option):
    root = make_root("run")
    result = CliRunner().invoke(runner.app, [*args, "--root", str(root)])
    assert result.exit_code == 2 and option in result.output, result.output
    assert "Invalid value" in result.output and "per epoch" not in result.output and "done" not in result.output
    assert not (root / "models").exists()


# ---------------------------------------------------------------- predict: huge images, unknown rows


def write_png(path, width, height, *, bit_depth=8, colour=3, row=None):
    """A PNG written chunk by chunk, every row `row` (bytes) or zeros: a huge image in a few KB
    (colour 0: grey, 3: palette with a grey ramp)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = row if row is not None else bytes(-(-width * bit_depth // 8))
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(b"\0" + row) for _ in range(height)) + packer.flush()
    chunks = [chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0))]
    chunks += [chunk(b"PLTE", bytes(c for v in range(256) for c in (v, v, v)))] if colour == 3 else []
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(chunks + [chunk(b"IDAT", idat), chunk(b"IEND", b"")]))
    return path


PEAK = """
import resource, sys
from fashionbench.predict import load_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = load_image(sys.argv[1])
print(image.shape, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_predict_refuses_a_huge_image_in_one_line_and_decodes_a_large_one_once(tmp_path):
    model = tmp_path / "models/mlp/seed0/model.pt"
    arch = MLPArch(hidden=(16,), dropout=0.0)
    save_trained(model, build_model("mlp", arch), "mlp", arch, mean=0.3, std=0.3, seed=0, epochs=1, hflip=0.0)
    huge = write_png(tmp_path / "huge.png", 14000, 14000, bit_depth=1, colour=0)  # a few KB
    assert huge.stat().st_size < 100_000
    result = invoke(predict.main, [huge, "--model", model])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    [line] = result.output.strip().splitlines()
    assert "huge.png is 14000x14000 pixels" in line and f"{predict.MAX_PIXELS / 1e6:.0f} megapixels" in line

    # 64 megapixels, within the limit: one byte a pixel decoded (64 MB), then reduced in strips
    large = write_png(tmp_path / "large.png", 8000, 8000)
    peak = subprocess.run([sys.executable, "-c", PEAK, str(large)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    shape, grown = peak.stdout.split(")")
    assert shape == "(28, 28" and int(grown) < 1.5 * 8000 * 8000, peak.stdout + peak.stderr[-2000:]

    # reduced while decoded, a large image still gives its small original exactly
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    small[0], small[-1], small[:, 0], small[:, -1] = 0, 0, 0, 0  # light on dark: kept as it is
    Image.fromarray(np.kron(small, np.ones((100, 100), dtype=np.uint8))).save(tmp_path / "2800.png")
    np.testing.assert_array_equal(predict.load_image(tmp_path / "2800.png"), small)


def test_predict_with_an_unknown_row_names_the_rows_that_exist(tmp_path, write_params, monkeypatch):
    write_params()
    monkeypatch.chdir(tmp_path)
    image = tmp_path / "shoe.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(image)
    result = invoke(predict.main, [image, "--model", "foo"])
    assert result.exit_code == 2 and "train_foo" not in result.output, result.output
    assert "no deep row 'foo'" in result.output and "cnn" in result.output and "svm-rbf" in result.output
    result = invoke(predict.main, [image, "--model", "cnn-seed7"])
    assert result.exit_code == 2 and "train_cnn@7" not in result.output and "cnn-seed0" in result.output
    result = invoke(predict.main, [image, "--model", "cnn"])  # a row params.yaml trains: its stage
    assert result.exit_code == 2 and "`dvc repro train_cnn@0`" in result.output, result.output
