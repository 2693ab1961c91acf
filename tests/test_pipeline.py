"""End-to-end: real `dvc repro`, `dvc exp run` and `dvc queue` in a copy of this repository.

A module-scoped fixture copies the working tree's tracked files into a fresh git repository,
drops the committed results (dvc.lock, metrics, plots, reports), writes a tiny quick-scale
params.yaml, runs `dvc repro` once and commits what it produced. Every test then works on its
own `cp -a` copy of that repository (and of its checkpoints folder), so no test sees another's
experiments; FASHIONBENCH_CHECKPOINTS always points into the test's temporary folder.

Each stage is a Python process that imports torch, so a run costs seconds per stage even at
this scale. The experiments start in the background, two at a time in their own copies, as
soon as the baseline is committed; the other tests run meanwhile and the experiment tests (at
the end of the file) wait for their own run. Only the experiments of the selected tests are
started (`-k` runs just what it needs). A setting that reaches every row is not trained on
every row: `dvc status` shows which stages it makes stale, and two cheap rows are trained.

Which stages a command ran is read from DVC's own output ("Running stage 'x':" against
"Stage 'x' didn't change, skipping" / "Stage 'x' is cached"); the tests also check stages they
expect DVC to skip, so a change in that wording fails them instead of passing them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from fashionbench.params import load_plan
from tests.conftest import REAL_SOURCE, REPO

pytestmark = [pytest.mark.slow, pytest.mark.real_data]
DEEP_ROWS = load_plan(REPO / "params.yaml").deep  # every deep row of the repository

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
RAN = re.compile(r"Running stage '([^']+)'")
SKIPPED = re.compile(r"Stage '([^']+)' (?:didn't change|is cached)")
MLP_EPOCHS = 2  # the one row that trains two epochs: it writes a checkpoint a re-run could resume
TIMEOUT_S = 1800  # per command; generous because the development machine is often busy


def tiny_params(raw: dict) -> dict:
    """The repository's params.yaml at a scale where the whole DAG runs in a few minutes."""
    raw["quick"] = True
    raw["seeds"] = {row: [0] for row in raw["seeds"]}
    raw["quick_scale"] = {"train_size": 200, "validation_size": 50, "test_size": 100,
                          "epochs": MLP_EPOCHS, "epoch_images": {"default": 200},
                          "tsne_size": 60, "pca_size": 60, "corrupt_size": 20}
    raw["download"]["sources"] = [str(REAL_SOURCE)]
    raw["stats"] |= {"tsne_size": 60, "tsne_perplexity": 10.0, "pca_size": 60, "sprite_per_class": 2}
    raw["svm"] = {"rbf": {"C": 10.0, "gamma": 0.01},
                  "fast": {"features": "pca+hog", "pca_components": 20, "solver": "nystroem",
                           "nystroem_components": 50, "cg_iterations": 10, "C": 200.0, "gamma": 0.25}}
    raw["model"] |= {"depth": 10, "widen": 1}
    raw["train_defaults"] |= {"precise_bn": 64, "epochs": 1, "device": "cpu"}
    for row in DEEP_ROWS:
        raw[row]["epochs"] = 1
        raw[row].pop("warmup_epochs", None)  # a one-epoch run has no room for a warmup
        if raw[row]["model"] == "wrn" and "depth" in raw[row]["arch"]:  # rows that set their own shape
            raw[row]["arch"] |= {"depth": 10, "widen": 1}
    raw["mlp"]["epochs"] = MLP_EPOCHS
    raw["resnet7"]["arch"]["width"] = 8
    for row in ("resnet18", "resnet34"):
        raw[row]["arch"]["blocks"] = [1, 1, 1, 1]
    raw["evaluate"] |= {"device": "cpu", "gallery_size": 4, "gradcam_images": 2}
    # Every recipe of the repository sets its own lr; here mlp inherits train_defaults' lr,
    # so `-S train_defaults.lr` has a row to reach (cnn keeps its own, as in the repository).
    raw["mlp"].pop("lr")
    return raw


def run(args: list[str], cwd: Path, env: dict, timeout: float = TIMEOUT_S,
        check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    done.output = done.stdout + done.stderr
    if check:
        assert done.returncode == 0, f"`{' '.join(args)}` exited {done.returncode}:\n{done.output}"
    return done


class Repo:
    """One copy of the prepared repository, its checkpoints folder and its commands' environment."""

    def __init__(self, root: Path):
        self.root = root
        self.checkpoints = root.parent / "checkpoints"
        self.env = {**os.environ, **GIT_IDENTITY, "FASHIONBENCH_CHECKPOINTS": str(self.checkpoints),
                    "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(root.parent / "dvc-site")}

    @classmethod
    def copy_of(cls, prepared: Path, folder: Path) -> Repo:
        """A `cp -a` copy of the prepared repository and its checkpoints, inside `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("repo", "checkpoints"):
            subprocess.run(["cp", "-a", str(prepared.parent / name), str(folder / name)], check=True)
        return cls(folder / "repo")

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(["dvc", *args], self.root, self.env, check=check)

    def git(self, *args: str) -> str:
        return run(["git", *args], self.root, self.env).stdout

    def python(self, *args: str) -> subprocess.CompletedProcess:
        return run(["python", *args], self.root, self.env)

    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def write_params(self, raw: dict) -> None:
        (self.root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    def read_json(self, path: str) -> dict:
        return json.loads((self.root / path).read_text())

    def exp_json(self, name: str, path: str) -> dict:
        """`path` as experiment `name` recorded it (refs/exps/.../<name>)."""
        refs = [r for r in self.git("for-each-ref", "--format=%(refname)", "refs/exps").split()
                if r.rsplit("/", 1)[-1] == name]
        assert len(refs) == 1, f"experiment {name}: refs {refs}"
        return self.json_at(refs[0], path)

    def head_json(self, path: str) -> dict:
        """`path` as the baseline commit records it."""
        return self.json_at("HEAD", path)

    def json_at(self, rev: str, path: str) -> dict:
        """A JSON output as commit `rev` records it: from git, or for a cached output (the
        training stages'), from the DVC cache by the hash in that commit's dvc.lock."""
        lock = yaml.safe_load(self.git("show", f"{rev}:dvc.lock"))
        for stage in lock["stages"].values():
            for out in stage.get("outs", []):
                if out["path"] == path:
                    cached = self.root / ".dvc/cache/files/md5" / out["md5"][:2] / out["md5"][2:]
                    if cached.is_file():
                        return json.loads(cached.read_text())
        return json.loads(self.git("show", f"{rev}:{path}"))


def stages_ran(output: str) -> set[str]:
    return set(RAN.findall(output))


def stages_skipped(output: str) -> set[str]:
    return set(SKIPPED.findall(output))


def deep_trains(stages: set[str]) -> set[str]:
    return {s for s in stages if s.startswith("train_") and not s.startswith("train_svm")}


def all_deep_trains(seed: int = 0) -> set[str]:
    return {f"train_{row}@{seed}" for row in DEEP_ROWS}


# ---------------------------------------------------------------- the prepared repository


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A committed git+DVC repository of this checkout with the tiny pipeline run once
    (<base>/repo), and the checkpoints folder that run used (<base>/checkpoints)."""
    if shutil.which("dvc") is None:
        pytest.skip("dvc is not installed")
    if not REAL_SOURCE.is_dir():
        pytest.skip("real Fashion-MNIST files absent (apt-get install dataset-fashion-mnist)")
    base = tmp_path_factory.mktemp("pipeline")
    root = base / "repo"
    root.mkdir()
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                             check=True).stdout.decode().split("\0")
    for rel in filter(None, tracked):
        if (REPO / rel).is_file():  # tracked but deleted in the working tree: not copied
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    # Start empty: no lock, no results of the real runs (DVC rewrites predictions/.gitignore).
    (root / "dvc.lock").unlink(missing_ok=True)
    (root / "predictions" / ".gitignore").unlink(missing_ok=True)
    for folder in ("metrics", "plots", "reports"):
        shutil.rmtree(root / folder, ignore_errors=True)
    repo = Repo(root)
    repo.write_params(tiny_params(repo.params()))
    repo.git("init", "-q")
    repo.git("add", "-A")
    repo.git("commit", "-qm", "tiny pipeline")
    done = repo.dvc("repro")
    assert stages_ran(done.output) >= all_deep_trains() | {"compare", "train_svm@fast"}, done.output
    repo.git("add", "-A")
    repo.git("commit", "-qm", "tiny results")
    assert repo.git("status", "--porcelain") == ""
    repo.checkpoints.mkdir(exist_ok=True)
    return root


@pytest.fixture
def repo(prepared: Path, tmp_path: Path) -> Repo:
    """A private copy of the prepared repository."""
    return Repo.copy_of(prepared, tmp_path)


# The experiments, started in the background: test -> (experiment name, -S settings, targets).
# A setting that reaches many rows is checked twice: `dvc status` says which stages it makes
# stale (DVC's own decision, for every row), and a run of two cheap targets shows the value
# arriving in their recipes; re-training every row would only repeat DVC's mechanics.
EXPERIMENTS = {
    "test_model_shape_override_reruns_only_the_wrn_family": (
        "wrn16", ["model.depth=16", "model.widen=1"], ["train_wrn@0"]),
    "test_inherited_key_in_train_defaults_reruns_every_deep_row": (
        "lr-all", ["train_defaults.lr=0.0005"], ["train_mlp@0", "train_cnn@0"]),
    # A key the section lists is set with -S; one it inherits needs DVC's `+` (it adds the key).
    "test_keys_set_on_one_recipe_rerun_only_that_row": (
        "cnn-keys", ["cnn.lr=0.0005", "+cnn.batch_size=64"], []),
    # two cheap rows: every row's stages are one matrix over its own seed list
    "test_seed_list_override_leaves_no_old_seed_in_the_table": (
        "seed1", ["seeds.cnn=[1]", "seeds.mlp=[1]"], []),
}


def _experiment(prepared: Path, folder: Path, name: str, settings: list[str], targets: list[str]):
    repo = Repo.copy_of(prepared, folder)
    command = ["exp", "run", "--name", name]
    for setting in settings:
        command += ["-S", setting]
    return repo, repo.dvc(*command, *targets, check=False)


@pytest.fixture(scope="module", autouse=True)
def experiments(request: pytest.FixtureRequest, prepared: Path,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, Future]:
    """`dvc exp run --name <name> -S ... [targets]` of each selected experiment test, in the
    background, two at a time, each in its own copy: test name -> Future of (Repo, CompletedProcess)."""
    selected = {item.name for item in request.session.items}
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {test: pool.submit(_experiment, prepared, tmp_path_factory.mktemp(name), name, *spec)
               for test, (name, *spec) in EXPERIMENTS.items() if test in selected}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def experiment(experiments: dict[str, Future], request: pytest.FixtureRequest):
    """This test's experiment: (its repository copy, name, the finished `dvc exp run`)."""
    repo, done = experiments[request.node.name].result()
    name, settings, targets = EXPERIMENTS[request.node.name]
    assert done.returncode == 0, \
        f"dvc exp run {' '.join(settings + targets)} exited {done.returncode}:\n{done.output}"
    return repo, name, done


def stale_after(repo: Repo, settings: dict[str, object]) -> set[str]:
    """Write `settings` (dotted key -> value) to `repo`'s params.yaml; the stages `dvc status`
    then reports changed: what `dvc exp run -S` would re-run first (check_params aside)."""
    raw = repo.params()
    for key, value in settings.items():
        *path, last = key.split(".")
        section = raw
        for part in path:
            section = section[part]
        section[last] = value
    repo.write_params(raw)
    return set(json.loads(repo.dvc("status", "--json").stdout)) - {"check_params"}


# ---------------------------------------------------------------- workspace commands


def test_removed_svm_recipe_leaves_the_table(repo):
    raw = repo.params()
    del raw["svm"]["rbf"]
    repo.write_params(raw)
    done = repo.dvc("repro", "compare")
    assert "compare" in stages_ran(done.output), done.output
    table = repo.read_json("metrics/compare.json")
    assert "svm-rbf" not in table and "svm-fast" in table, list(table)
    results = (repo.root / "reports/results.md").read_text()
    assert not re.search(r"^\| svm-rbf +\|", results, re.M) and re.search(r"^\| svm-fast +\|", results, re.M), results


def test_fresh_clone_without_cache_rebuilds_the_record_byte_for_byte(repo, tmp_path):
    """git holds the record: a clone with no DVC cache plans `dvc repro`, and regenerates the
    table, the ensemble and every figure from git-tracked files alone, identical to the commit."""
    clone = Repo(tmp_path / "clone")
    run(["git", "clone", "-q", str(repo.root), str(clone.root)], tmp_path, repo.env)
    assert not (clone.root / ".dvc/cache").exists()
    # DVC's dry run hashes each stage's inputs, so it stops at the first input another stage
    # makes; up to there it plans, from the marker git holds (treeverse/dvc#9021)
    dry = clone.dvc("repro", "--dry", "download")
    assert "download" in stages_ran(dry.output), dry.output
    stale = json.loads(clone.dvc("status", "--json").stdout)
    assert "train_mlp@0" in stale, stale  # it would re-train: nothing is cached
    for path in ("reports/results.json", "plots/compare", "metrics/compare.json"):
        target = clone.root / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    done = clone.dvc("repro", "-s", "compare")
    assert stages_ran(done.output) == {"compare"}, done.output
    assert clone.git("status", "--porcelain") == ""  # every file as committed, dvc.lock included
    table = clone.read_json("reports/results.json")
    assert table["ensemble"]["runs"] >= 1 and not table["mlp"].get("not_run"), table


def test_forced_rerun_trains_from_epoch_zero(repo):
    # The checkpoints folder is the one the baseline's training used: had that finished run
    # left a checkpoint behind, this identical run (same fingerprint) would resume from it.
    runs_before = sorted(p.name for p in repo.checkpoints.iterdir())
    assert runs_before == []  # a finished run removes its folder (named by its fingerprint)
    before = repo.read_json("metrics/train/mlp-seed0.json")
    done = repo.dvc("repro", "-f", "-s", "train_mlp@0")
    # the same run (fingerprint) as the baseline's: a checkpoint left there would be found
    assert sorted(p.name for p in repo.checkpoints.iterdir()) == runs_before
    assert stages_ran(done.output) == {"train_mlp@0"}, done.output
    assert "resuming" not in done.output, done.output
    after = repo.read_json("metrics/train/mlp-seed0.json")
    assert after["epochs"] == MLP_EPOCHS
    assert after["wall_time_s"] != before["wall_time_s"]
    for curve in ("train/loss", "val/acc"):
        tsv = repo.root / "plots/train/mlp-seed0/plots/metrics" / f"{curve}.tsv"
        steps = [int(line.split("\t")[0]) for line in tsv.read_text().strip().splitlines()[1:]]
        assert steps == list(range(MLP_EPOCHS)), tsv.read_text()
    assert not list(repo.checkpoints.rglob("checkpoint.pt"))  # finished: nothing left to resume


def run_with_a_bad_key(repo: Repo):
    """`dvc repro` with train_defaults.lrr: 1; (its result, models/cnn/seed0/model.pt, its bytes)."""
    model = repo.root / "models/cnn/seed0/model.pt"
    saved = model.read_bytes()
    raw = repo.params()
    raw["train_defaults"]["lrr"] = 1
    repo.write_params(raw)
    return repo.dvc("repro", check=False), model, saved


def test_bad_key_stops_repro_before_any_output_is_deleted(repo):
    done, model, saved = run_with_a_bad_key(repo)
    assert done.returncode != 0, done.output
    assert stages_ran(done.output) == {"check_params"}, done.output
    assert "lrr" in done.output and "did you mean 'lr'?" in done.output, done.output
    assert model.is_file() and model.read_bytes() == saved
    assert (repo.root / "metrics/compare.json").is_file()


def test_bad_key_message_names_the_key_as_written(repo):
    done, _, _ = run_with_a_bad_key(repo)
    assert done.returncode != 0, done.output
    assert "params.yaml: train_defaults.lrr: unknown key" in done.output, done.output


def test_non_boolean_quick_is_refused(repo):
    # check_params alone decides this: any stage that reads `quick` runs after it. (Targeting
    # it keeps the test cheap when `quick` is wrongly accepted and everything would re-run.)
    done = repo.dvc("exp", "run", "-S", "quick=yes", "check_params", check=False)
    written = [line for line in (repo.root / "params.yaml").read_text().splitlines()
               if line.startswith("quick:")]
    assert done.returncode != 0, f"params.yaml has {written} (PyYAML reads " \
        f"{[yaml.safe_load(line) for line in written]}); dvc said:\n{done.output}"
    assert re.search(r"params\.yaml: quick: must be bool", done.output), done.output


def test_quick_check_leaves_the_workspace_clean(repo):
    # The baseline `--update-baseline` would write: the quick run's table, which is the
    # committed metrics/compare.json here (quick is already on, so every stage is cached).
    shutil.copy(repo.root / "metrics/compare.json", repo.root / "reports/quick-baseline.json")
    repo.git("add", "reports/quick-baseline.json")
    repo.git("commit", "-qm", "quick baseline")
    lock = (repo.root / "dvc.lock").read_bytes()
    done = repo.python("-m", "fashionbench.quick")
    assert re.search(r"^\| svm-fast +\|", done.stdout, re.M), done.output  # the quick run's table
    assert re.search(r"^Row +Metric +baseline +quick run +Change$", done.stdout, re.M), done.output
    for row in ("svm-rbf", "svm-fast", *DEEP_ROWS, "ensemble"):
        assert re.search(rf"^{row} +accuracy +([0-9.]+) +\1 +\+0\.0000$", done.stdout, re.M), done.output
    assert "ok: no row's accuracy dropped" in done.stdout, done.output
    assert repo.git("status", "--porcelain") == ""
    assert (repo.root / "dvc.lock").read_bytes() == lock
    assert re.search(r"refs/exps/.*/quick-\d{8}-\d{6}$",
                     repo.git("for-each-ref", "--format=%(refname)", "refs/exps"), re.M)


def test_remote_shares_results_and_the_run_cache(repo, tmp_path):
    # A configuration trained once is restored from the run-cache, not trained again: every
    # output of a training stage is cached (DVC keeps no run-cache for a stage with a
    # `cache: false` output). An experiment trains C=100; going back to the baseline's C
    # restores the baseline's run.
    baseline_c = repo.params()["svm"]["fast"]["C"]
    tried = repo.dvc("exp", "run", "-S", "svm.fast.C=100", "evaluate_svm@fast")
    assert "train_svm@fast" in stages_ran(tried.output), tried.output
    back = repo.dvc("exp", "run", "-S", f"svm.fast.C={baseline_c}", "evaluate_svm@fast")
    assert "train_svm@fast" in stages_skipped(back.output), back.output
    assert "train_svm@fast" not in stages_ran(back.output), back.output

    # Share: a local-directory remote (any DVC remote works the same), pushed after a run.
    repo.dvc("remote", "add", "-d", "shared", str(tmp_path / "storage"))
    repo.git("commit", "-qam", "shared remote")
    repo.dvc("push", "--run-cache")
    clone = Repo(tmp_path / "clone")
    run(["git", "clone", "-q", str(repo.root), str(clone.root)], tmp_path, clone.env)
    assert not (clone.root / "models/cnn/seed0/model.pt").exists()  # git has only pointers
    clone.dvc("pull", "--run-cache")
    for rel in ("models/cnn/seed0/model.pt", "metrics/train/cnn-seed0.json"):
        assert (clone.root / rel).read_bytes() == (repo.root / rel).read_bytes(), rel
    assert "Data and pipelines are up to date" in clone.dvc("status").output
    nothing = clone.dvc("repro")
    assert stages_ran(nothing.output) == set(), nothing.output

    # An unreachable remote: the error names what is missing; the workspace keeps its files.
    clone.dvc("remote", "modify", "shared", "url", str(tmp_path / "gone"))
    clone.dvc("cache", "dir", str(tmp_path / "empty-cache"))
    (clone.root / "models/cnn/seed0/model.pt").unlink()
    failed = clone.dvc("pull", check=False)
    assert failed.returncode != 0 and "models/cnn/seed0/model.pt" in failed.output, failed.output
    assert (clone.root / "models/mlp/seed0/model.pt").is_file()


def test_runner_pieces_then_dvc_commit_leave_the_stage_up_to_date(repo):
    # A run trained where DVC is absent (the runner), in pieces, then recorded by DVC.
    raw = repo.params()
    raw["mlp"]["lr"] = 0.003
    repo.write_params(raw)
    assert "train_mlp@0" in repo.dvc("status").output
    command = ["python", "-m", "fashionbench.runner", "train", "mlp", "--seed", "0"]
    piece = run([*command, "--epochs", "1"], repo.root, repo.env, check=False)
    assert piece.returncode == 3 and f"stopped after epoch 1 of {MLP_EPOCHS}" in piece.output, piece.output
    done = run([*command, "--epochs", "1"], repo.root, repo.env)
    assert "done" in done.output, done.output
    assert "lr 0.003," in repo.read_json("metrics/train/mlp-seed0.json")["recipe"]
    repo.dvc("commit", "-f", "train_mlp@0")
    assert "up to date" in repo.dvc("status", "train_mlp@0").output


# ---------------------------------------------------------------- experiments (background)


def test_model_shape_override_reruns_only_the_wrn_family(repo, experiments, request):
    from fashionbench.models import build_model, count_parameters
    from fashionbench.models.wrn import WRNConfig

    family = ("wrn", "se_wrn", "wrn32", "wrn32_mish")  # the rows that read `model:`; wrn28 and
    # se_wrn64 set every shape key in their own sections
    assert stale_after(repo, {"model.depth": 16, "model.widen": 1}) == {f"train_{row}@0" for row in family}
    ran_in, name, done = experiment(experiments, request)
    assert deep_trains(stages_ran(done.output)) == {"train_wrn@0"}, done.output

    wrn_16_1 = build_model("wrn", WRNConfig(
        depth=16, widen=1, dropout=ran_in.params()["model"]["dropout"], block="post", se_reduction=0,
        drop_path=0.0, drop_path_mode="sample", activation="relu"))
    metrics = ran_in.exp_json(name, "metrics/train/wrn-seed0.json")
    assert metrics["parameters"] == count_parameters(wrn_16_1)
    assert metrics["architecture"].startswith("WRN-16-1 ")
    assert ran_in.head_json("metrics/train/wrn-seed0.json")["parameters"] != metrics["parameters"]


def test_inherited_key_in_train_defaults_reruns_every_deep_row(repo, experiments, request):
    assert stale_after(repo, {"train_defaults.lr": 0.0005}) == all_deep_trains()  # and no SVM
    ran_in, name, done = experiment(experiments, request)
    assert deep_trains(stages_ran(done.output)) == {"train_mlp@0", "train_cnn@0"}, done.output
    # mlp inherits lr and takes the new value; a recipe that sets its own lr keeps it
    assert "lr 0.002," in ran_in.head_json("metrics/train/mlp-seed0.json")["recipe"]
    assert "lr 0.0005," in ran_in.exp_json(name, "metrics/train/mlp-seed0.json")["recipe"]
    assert "lr 0.002," in ran_in.exp_json(name, "metrics/train/cnn-seed0.json")["recipe"]


def test_keys_set_on_one_recipe_rerun_only_that_row(experiments, request):
    repo, name, done = experiment(experiments, request)
    cnn = yaml.safe_load(repo.git("show", "HEAD:params.yaml"))["cnn"]
    assert "lr" in cnn and "batch_size" not in cnn  # one explicit key, one inherited
    ran, skipped = stages_ran(done.output), stages_skipped(done.output)
    assert deep_trains(ran) == {"train_cnn@0"}, done.output
    assert {"evaluate_cnn@cnn-0", "compare"} <= ran, done.output
    assert all_deep_trains() - {"train_cnn@0"} <= skipped, done.output
    assert "lr 0.002, batch 128;" in repo.head_json("metrics/train/cnn-seed0.json")["recipe"]
    assert "lr 0.0005, batch 64;" in repo.exp_json(name, "metrics/train/cnn-seed0.json")["recipe"]


def test_seed_list_override_leaves_no_old_seed_in_the_table(experiments, request):
    repo, name, done = experiment(experiments, request)
    assert deep_trains(stages_ran(done.output)) == {"train_cnn@1", "train_mlp@1"}, done.output
    assert (repo.root / "metrics/train/cnn-seed0.json").is_file()  # seed 0's files are still there
    table = repo.exp_json(name, "reports/results.json")
    for row in DEEP_ROWS:
        seeds = [1] if row in ("cnn", "mlp") else [0]
        assert table[row]["runs"] == 1 and table[row]["seeds"] == seeds, (row, table[row])


def test_grid_search_queues_one_experiment_per_value_and_trains_no_deep_model(repo):
    # The README's grid search: one queued experiment per value, run by two workers.
    repo.dvc("exp", "run", "--queue", "-S", "svm.fast.C=100,300")
    # The workers are forked daemons that keep inherited pipes open: give them none.
    subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=repo.root, env=repo.env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while any(s in (status := repo.dvc("queue", "status").stdout) for s in ("Queued", "Running")):
            assert time.monotonic() < deadline, status
            time.sleep(2)
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=repo.root, env=repo.env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert "Failed" not in status, status
    names = [line.split()[1] for line in status.splitlines() if line.rstrip().endswith("Success")]
    assert len(names) == 2, status
    trained_c = set()
    for name in names:
        log = repo.dvc("queue", "logs", name).output
        ran = stages_ran(log)
        assert {s for s in ran if s.startswith("train_")} == {"train_svm@fast"}, log
        assert {"evaluate_svm@fast", "compare"} <= ran, log
        assert all_deep_trains() <= stages_skipped(log), log
        trained_c.add(repo.exp_json(name, "metrics/train/svm-fast.json")["C"])
    assert trained_c == {100, 300}  # each grid point trained with its own value
