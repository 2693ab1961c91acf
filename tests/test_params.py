"""params.yaml loading: the repository's file is valid, and every kind of mistake names its key."""

import pytest

from fashionbench.params import ParamsError, load_params, params_from_dict
from tests.conftest import REPO, invoke


def test_repository_params_load():
    params = load_params(REPO / "params.yaml")
    assert params.download.sources
    assert set(params.svm)  # at least one SVM recipe


def test_quick_run_overrides_the_sections(params_dict):
    params_dict["quick"] = False
    full = params_from_dict(params_dict)
    params_dict["quick"] = True
    quick = params_from_dict(params_dict)
    assert quick.preprocess.subset_size == params_dict["quick_run"]["preprocess"]["subset_size"]
    assert full.preprocess.subset_size == params_dict["preprocess"]["subset_size"]
    assert quick.model.depth < full.model.depth


def expect_error(params_dict, key: str, fragment: str) -> None:
    with pytest.raises(ParamsError) as caught:
        params_from_dict(params_dict)
    assert caught.value.key == key
    assert fragment in str(caught.value)


def test_misspelt_key_is_named_with_a_suggestion(params_dict):
    params_dict["preprocess"]["vaildation_size"] = params_dict["preprocess"].pop("validation_size")
    expect_error(params_dict, "preprocess.vaildation_size", "did you mean 'validation_size'")


def test_unknown_section(params_dict):
    params_dict["preprocesss"] = {}
    expect_error(params_dict, "preprocesss", "unknown key")


def test_missing_key(params_dict):
    del params_dict["stats"]["tsne_size"]
    expect_error(params_dict, "stats.tsne_size", "missing")


def test_wrong_type(params_dict):
    params_dict["preprocess"]["seed"] = "zero"
    expect_error(params_dict, "preprocess.seed", "must be int")


def test_bool_is_not_a_number(params_dict):
    params_dict["download"]["timeout"] = True
    expect_error(params_dict, "download.timeout", "must be float")


def test_negative_size(params_dict):
    params_dict["quick"] = False
    params_dict["preprocess"]["subset_size"] = -5
    expect_error(params_dict, "preprocess.subset_size", ">= 0")


def test_validation_larger_than_train(params_dict):
    params_dict["quick"] = False
    params_dict["preprocess"]["validation_size"] = 70000
    expect_error(params_dict, "preprocess.validation_size", "60000")


def test_subset_larger_than_what_is_left(params_dict):
    params_dict["quick"] = False
    params_dict["preprocess"]["validation_size"] = 10000
    params_dict["preprocess"]["subset_size"] = 55000
    expect_error(params_dict, "preprocess.subset_size", "50000")


def test_quick_run_override_of_an_unknown_key(params_dict):
    params_dict["quick"] = True
    params_dict["quick_run"]["cnn"]["epoch"] = 1
    expect_error(params_dict, "quick_run.cnn.epoch", "did you mean 'epochs'")


def test_literal_choice(params_dict):
    params_dict["download"]["sources"] = []
    expect_error(params_dict, "download.sources", "at least one")


def test_stage_stops_before_any_work_on_a_params_error(tmp_path, write_params):
    from stages.preprocess import main

    params = write_params(lambda raw: raw["preprocess"].update(validation_size=70000, subset_size=0)
                          or raw.update(quick=False))
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "arrays.npz").write_bytes(b"previous output")
    result = invoke(main, ["--params", params, "--out", out])
    assert result.exit_code == 2
    assert "preprocess.validation_size" in result.output
    assert (out / "arrays.npz").read_bytes() == b"previous output"



def test_dvc_repro_stops_at_check_params_before_any_stage_runs(tmp_path):
    """Under DVC a bad key stops the pipeline before any stage deletes its outputs."""
    import subprocess

    import yaml

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    raw = yaml.safe_load((clone / "params.yaml").read_text())
    raw["model"]["depth"] = 41
    (clone / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    result = subprocess.run(["dvc", "repro"], cwd=clone, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "model.depth: 41 is impossible" in output
    assert "Running stage 'check_params'" in output
    assert "Running stage 'download'" not in output
