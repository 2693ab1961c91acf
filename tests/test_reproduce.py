"""The README's first command: re-train rows of the committed table, beside the record."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fashionbench import reproduce
from fashionbench.params import load_plan
from tests.conftest import REPO

PLAN = load_plan(REPO / "params.yaml")
RESULTS = json.loads((REPO / "reports/results.json").read_text())
IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def run_of(accuracy: float, committed: float, train_s: float = 60.0, recorded: float | None = 30.0):
    return reproduce.Reproduced("mlp-seed0", accuracy, committed, train_s, recorded)


@pytest.mark.parametrize("accuracy, inside", [(0.8953, True), (0.8993, True), (0.8903, True),
                                              (0.9004, False), (0.8902, False)])
def test_verdict_states_the_difference_and_the_tolerance(accuracy, inside):
    line = reproduce.verdict(run_of(accuracy, 0.8953), tolerance=0.005)
    assert f"{accuracy - 0.8953:+.4f}" in line and "±0.005" in line
    assert ("within" in line) == inside and ("OUTSIDE" in line) == (not inside)


def test_speed_ratio_is_this_machines_time_over_the_records():
    done = [run_of(0.9, 0.9, 60.0, 30.0), run_of(0.9, 0.9, 100.0, 50.0), run_of(0.9, 0.9, 5.0, None)]
    assert reproduce.speed_ratio(done) == pytest.approx(160.0 / 80.0)
    assert reproduce.speed_ratio([]) is None


def test_every_row_is_listed_once_with_its_command_and_time():
    lines = reproduce.row_lines(PLAN, RESULTS, ratio=2.0)
    listed = [line.split()[0] for line in lines[1:]]
    assert listed == [row for row in PLAN.rows() if row in RESULTS]
    by_row = dict(zip(listed, lines[1:]))
    assert "dvc repro evaluate_svm@fast" in by_row["svm-fast"]
    assert "dvc repro evaluate_mlp " in by_row["mlp"]
    mlp_s = RESULTS["mlp"]["train_s"]
    assert reproduce._duration(2.0 * mlp_s) in by_row["mlp"]          # scaled to this machine
    assert "on a GPU" in by_row["wrn"] and "not run at full scale" in by_row["resnet34"]


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A git repository of this checkout's tracked files whose only data source is empty."""
    root = tmp_path / "repo"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, listed.decode().split("\0")):
        if (REPO / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    (tmp_path / "empty").mkdir()
    raw["download"]["sources"] = [str(tmp_path / "empty")]  # no Debian package, no network
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "clone"]):
        subprocess.run(["git", *args], cwd=root, check=True, env={**os.environ, **IDENTITY})
    return root


def reproduce_in(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fashionbench.reproduce", *args], cwd=root, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)


def status(root: Path) -> str:
    return subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=root, capture_output=True,
                          text=True, check=True).stdout


def test_without_data_it_says_how_to_get_it_and_writes_nothing(clone):
    before = status(clone)
    done = reproduce_in(clone)
    assert done.returncode != 0
    assert "To get the data" in done.stderr and "apt-get install dataset-fashion-mnist" in done.stderr
    assert "Traceback" not in done.stderr
    assert status(clone) == before  # nothing written in the repository


def test_a_dirty_workspace_is_refused_unless_asked(clone):
    (clone / "params.yaml").write_text((clone / "params.yaml").read_text() + "\n# edited\n")
    done = reproduce_in(clone)
    assert done.returncode != 0 and "uncommitted changes to params.yaml" in done.stderr
    assert "--allow-dirty" in done.stderr and "Traceback" not in done.stderr
    assert "To get the data" in reproduce_in(clone, "--allow-dirty").stderr  # asked: it goes on


def test_a_run_params_yaml_does_not_define_is_named(clone):
    raw = yaml.safe_load((clone / "params.yaml").read_text())
    raw["seeds"]["mlp"] = [1]  # an experiment's seed list: compare.reproduce's mlp-seed0 is gone
    (clone / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    done = reproduce_in(clone, "--allow-dirty")
    assert done.returncode != 0 and "compare.reproduce names mlp-seed0" in done.stderr
    assert "Traceback" not in done.stderr
