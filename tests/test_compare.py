"""The compare stage on synthetic runs, the README table against metrics/compare.json, the CI gate."""

import json

import numpy as np
import pytest

from fashionbench import gate, report
from fashionbench.evaluate import classification_metrics
from fashionbench.params import load_params
from stages.compare import main as compare_main
from tests.conftest import REPO, invoke

LABELS = np.repeat(np.arange(10), 10)





def probs_with_errors(wrong: int, seed: int) -> np.ndarray:
    """Test probabilities (100, 10) whose argmax is wrong on `wrong` seeded images."""
    rng = np.random.default_rng(seed)
    pred = LABELS.copy()
    flip = rng.choice(len(LABELS), wrong, replace=False)
    pred[flip] = (pred[flip] + 1) % 10
    probs = rng.uniform(0, 0.05, (len(LABELS), 10))
    probs[np.arange(len(LABELS)), pred] = 0.8
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


def add_run(root, run_id, model, probs, train, seed=None):
    """metrics/eval, predictions and metrics/train files as the evaluate and train stages write them."""
    metrics = classification_metrics(LABELS, probs.argmax(axis=1), probs)
    record = {"id": run_id, "model": model, "tta": model != "svm"} | metrics
    if seed is not None:
        record["seed"] = seed
    for folder, data in (("metrics/eval", record), ("metrics/train", train)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / f"{run_id}.json").write_text(json.dumps(data))
    (root / "predictions").mkdir(exist_ok=True)
    np.savez(root / "predictions" / f"{run_id}.npz", probs=probs, labels=LABELS)


def deep_train(parameters, seconds, quick=True, epochs=2):
    return {"parameters": parameters, "wall_time_s": seconds, "device": "cpu", "quick": quick,
            "epochs": epochs}


@pytest.fixture
def runs(tmp_path):
    """Two seeds of cnn and wrn, one mlp, one SVM; DVCLive curves for cnn-seed0."""
    for seed in (0, 1):
        add_run(tmp_path, f"cnn-seed{seed}", "cnn", probs_with_errors(10 + 2 * seed, seed),
                deep_train(824_458, 60.0 + seed), seed)
        add_run(tmp_path, f"wrn-seed{seed}", "wrn", probs_with_errors(8, 10 + seed),
                deep_train(1_000, 100.0), seed)
    add_run(tmp_path, "mlp-seed0", "mlp", probs_with_errors(20, 5), deep_train(101_770, 10.0), 0)
    add_run(tmp_path, "svm-rbf", "svm", probs_with_errors(15, 6), {"fit_time_s": 233.0, "quick": False})
    curves = tmp_path / "plots/train/cnn-seed0/plots/metrics"
    for curve in report.CURVES:
        path = curves / f"{curve}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        name = curve.split("/")[1]
        path.write_text(f"timestamp\tstep\t{name}\n1\t0\t0.5\n2\t1\t0.7\n")
    (tmp_path / "README.md").write_text(f"# x\n\n## Results\n\n{report.README_START}\nold\n"
                                        f"{report.README_END}\n\n## After\n")
    return tmp_path


def test_table_with_seeds_and_ensemble(runs):
    params = load_params(REPO / "params.yaml")
    table = report.compare(params, runs)
    assert list(table) == ["svm-rbf", "cnn", "mlp", "wrn", "ensemble"]
    cnn = table["cnn"]
    assert cnn["runs"] == 2 and cnn["seeds"] == "0, 1"
    assert cnn["accuracy"] == pytest.approx(np.mean([0.90, 0.88]))
    assert cnn["accuracy_std"] == pytest.approx(np.std([0.90, 0.88], ddof=1), abs=1e-5)
    assert cnn["scale"] == "quick" and cnn["parameters"] == 824_458 and cnn["train_s"] == 60.5
    assert "hflip 0.5" in cnn["recipe"] and "2 epochs" in cnn["recipe"] and "flip TTA" in cnn["recipe"]
    assert table["svm-rbf"]["parameters"] is None and table["svm-rbf"]["scale"] == "full"
    assert "pixels /255; rbf C=10 gamma=0.01" in table["svm-rbf"]["recipe"]
    # The ensemble of the listed models present (cnn and wrn; mlp is not listed), per seed.
    accs = []
    for s in (0, 1):
        mean = (np.load(runs / f"predictions/cnn-seed{s}.npz")["probs"]
                + np.load(runs / f"predictions/wrn-seed{s}.npz")["probs"]) / 2
        accs.append(np.mean(mean.argmax(axis=1) == LABELS))
    ensemble = table["ensemble"]
    assert ensemble["runs"] == 2 and ensemble["accuracy"] == pytest.approx(np.mean(accs), abs=1e-5)
    assert ensemble["recipe"] == "mean probabilities of cnn, wrn; flip TTA"
    assert ensemble["parameters"] == 825_458 and ensemble["train_s"] == pytest.approx(160.5)
    lines = report.results_table(table).splitlines()
    assert lines[0].startswith("| model | params | recipe | test accuracy | macro F1 |")
    cnn_line = next(line for line in lines if line.startswith("| cnn |"))
    assert f"{cnn['accuracy']:.4f} ± {cnn['accuracy_std']:.4f} (2 seeds)" in cnn_line
    assert "| 824,458 |" in cnn_line and "| 60.5 s |" in cnn_line
    for name in ("accuracy_vs_parameters", "accuracy_vs_train_time", "class_accuracy", "learning_curves"):
        assert (runs / "plots/compare" / f"{name}.png").stat().st_size > 0
    assert json.loads((runs / "metrics/compare.json").read_text()) == table
    assert "## Per-class accuracy" in (runs / "reports/results.md").read_text()


def test_readme_table_is_rewritten_between_markers(runs):
    table = report.compare(load_params(REPO / "params.yaml"), runs)
    text = (runs / "README.md").read_text()
    assert text.startswith("# x\n\n## Results\n\n") and text.endswith("\n\n## After\n")
    assert "old" not in text and report.readme_table(runs / "README.md") == report.readme_block(table)


def test_readme_without_markers_gets_a_results_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    report.update_readme(readme, {})
    assert readme.read_text().startswith("# x\n\n## Results\n\n" + report.README_START)


def test_one_ensemble_member_gives_no_ensemble_row(tmp_path):
    add_run(tmp_path, "cnn-seed0", "cnn", probs_with_errors(10, 0), deep_train(1, 1.0), 0)
    add_run(tmp_path, "mlp-seed0", "mlp", probs_with_errors(10, 1), deep_train(1, 1.0), 0)
    runs = report.load_runs(tmp_path)
    assert report.ensemble_runs(tmp_path, ("cnn", "wrn"), runs) == []


def test_compare_without_evaluations_names_the_stage(tmp_path, write_params, monkeypatch):
    params = write_params()
    monkeypatch.chdir(tmp_path)
    result = invoke(compare_main, ["--params", params])
    assert result.exit_code == 2 and "dvc repro evaluate" in result.output


def test_readme_table_matches_compare_json():
    compare_json = REPO / "metrics/compare.json"
    if not compare_json.is_file():
        pytest.skip("the compare stage has not run")
    table = json.loads(compare_json.read_text())
    assert report.readme_table(REPO / "README.md") == report.readme_block(table), \
        "README.md's results table is stale: run `dvc repro compare`"


# ---------------------------------------------------------------- the CI gate


DIFF = {
    "metrics/eval/cnn-seed0.json": {
        "accuracy": {"old": 0.90, "new": 0.85, "diff": -0.05},
        "macro_f1": {"old": 0.90, "new": 0.50, "diff": -0.40},
        "per_class.Coat.recall": {"old": 0.9, "new": 0.1, "diff": -0.8},
    },
    "metrics/compare.json": {
        "wrn.accuracy": {"old": 0.93, "new": 0.92, "diff": -0.01},
        "se_wrn.accuracy": {"old": 0.94, "new": None},
        "mlp.accuracy": {"old": None, "new": 0.85},
        "cnn.recipe": {"old": "a", "new": "b"},
    },
}


def test_gate_lists_each_drop_beyond_tolerance():
    problems = gate.accuracy_drops(DIFF, tolerance=0.02)
    assert problems == [
        "metrics/compare.json: se_wrn.accuracy was 0.9400 and is now missing",
        "metrics/eval/cnn-seed0.json: accuracy 0.9000 -> 0.8500 (-0.0500)",
    ]
    assert gate.accuracy_drops(DIFF, tolerance=0.06) == problems[:1]


def test_gate_cli_exit_codes(tmp_path):
    diff = tmp_path / "diff.json"
    diff.write_text(json.dumps(DIFF))
    params = REPO / "params.yaml"
    result = invoke(gate.main, ["--diff", diff, "--params", params])
    assert result.exit_code == 1
    assert "cnn-seed0.json: accuracy 0.9000 -> 0.8500" in result.output
    diff.write_text(json.dumps({"metrics/compare.json": DIFF["metrics/compare.json"] | {
        "se_wrn.accuracy": {"old": 0.94, "new": 0.93, "diff": -0.01}}}))
    result = invoke(gate.main, ["--diff", diff, "--params", params])
    assert result.exit_code == 0 and result.output.startswith("ok:")
