"""The compare stage on a fake repository tree, the README block, the CI gate and the quick run."""

import dataclasses
import json
import shutil
import subprocess

import numpy as np
import pytest

from fashionbench import gate, quick, readme, report
from fashionbench.dataset import FASHION_MNIST
from fashionbench.errors import UserError
from fashionbench.params import Plan, load_plan
from fashionbench.scores import classification_metrics
from stages.compare import main as compare_main
from tests.conftest import REPO, invoke

LABELS = np.repeat(np.arange(10), 10)
PNG = b"\x89PNG\r\n\x1a\n"

PLAN = Plan(quick=True, seeds={"cnn": (0, 1), "mlp": (0, 1), "wrn": (0, 1)}, svm=("rbf", "hog_seed"), deep=("cnn", "mlp", "wrn"),
            epochs={"cnn": 30, "mlp": 30, "wrn": 600}, ensemble=("cnn", "wrn"), tolerance=0.02,
            reproduce=("svm-rbf", "mlp-seed0"), reproduce_tolerance=0.005, dataset="fashion-mnist",
            train_images=60_000, classes=FASHION_MNIST.classes)
SEED_0 = {row: (0,) for row in PLAN.deep}


def wrong_in(probs: np.ndarray) -> np.ndarray:
    return probs.argmax(axis=1) != LABELS


def probs_with_errors(wrong: int, seed: int) -> np.ndarray:
    """Test probabilities (100, 10) whose argmax is wrong on `wrong` seeded images."""
    rng = np.random.default_rng(seed)
    pred = LABELS.copy()
    flip = rng.choice(len(LABELS), wrong, replace=False)
    pred[flip] = (pred[flip] + 1) % 10
    probs = rng.uniform(0, 0.05, (len(LABELS), 10))
    probs[np.arange(len(LABELS)), pred] = 0.8
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


def deep_train(row, seed, parameters, seconds, quick=True, device="cpu", hardware="AMD EPYC 7B13"):
    """metrics/train/<row>-seed<N>.json as the train stage writes it (reports/runs/ keeps it)."""
    return {"run": f"{row}-seed{seed}", "model": row, "architecture": f"{row.upper()} net",
            "recipe": "adamw onecycle; hflip 0.5; 2 epochs", "parameters": parameters, "epochs": 2,
            "train_size": 4000, "val_size": 500, "wall_time_s": seconds, "device": device,
            "hardware": hardware, "threads": 2 if device == "cpu" else 0, "seed": seed, "quick": quick}


def svm_train(variant, seconds, quick=True):
    """metrics/train/svm-<variant>.json as the train_svm stage writes it (reports/runs/ keeps it)."""
    return {"variant": variant, "recipe": f"{variant} recipe in words", "fit_time_s": seconds,
            "train_size": 4000, "seed": 0, "quick": quick, "device": "cpu",
            "hardware": "AMD EPYC 7B13", "threads": 2}


def add_run(root, run_id, probs, train, **evaluated):
    """The git-tracked files the evaluate stage writes for one run: metrics/eval,
    reports/runs (the training record), plots/confusion, predictions and the gallery."""
    pred = probs.argmax(axis=1)
    accuracy = float(np.mean(pred == LABELS))
    macro_f1 = classification_metrics(LABELS, pred, 10)["macro_f1"]
    record = {"accuracy": accuracy, "macro_f1": macro_f1} | evaluated
    gallery = root / "plots/eval" / run_id / "mistakes.png"
    gallery.parent.mkdir(parents=True, exist_ok=True)
    gallery.write_bytes(PNG + run_id.encode())
    for folder, content in (("metrics/eval", record), ("reports/runs", train)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / f"{run_id}.json").write_text(json.dumps(content))
    (root / "plots/confusion").mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{FASHION_MNIST.classes[a]},{FASHION_MNIST.classes[b]}\n" for a, b in zip(LABELS, pred))
    (root / "plots/confusion" / f"{run_id}.csv").write_text("actual,predicted\n" + rows)
    (root / "predictions").mkdir(exist_ok=True)
    np.savez(root / "predictions" / f"{run_id}.npz", probs=probs, labels=LABELS, kind=np.array("softmax"))
    return accuracy


def remove_run(root, run_id):
    for path in (root / "metrics/eval" / f"{run_id}.json", root / "reports/runs" / f"{run_id}.json",
                 root / "plots/confusion" / f"{run_id}.csv", root / "predictions" / f"{run_id}.npz"):
        path.unlink()


@pytest.fixture
def tree(tmp_path):
    """Every run of PLAN: two seeds of cnn, mlp and wrn, two SVM recipes; curves for cnn-seed0.
    Returns the root."""
    for seed in (0, 1):
        add_run(
            tmp_path, f"cnn-seed{seed}", probs_with_errors(10 + 2 * seed, seed),
            deep_train("cnn", seed, 824_458, 60.0 + seed), tta_accuracy=0.91 + 0.01 * seed)
        add_run(
            tmp_path, f"mlp-seed{seed}", probs_with_errors(20, 5 + seed),
            deep_train("mlp", seed, 101_770, 10.0))
        add_run(
            tmp_path, f"wrn-seed{seed}", probs_with_errors(8, 10 + seed),
            deep_train("wrn", seed, 1_000, 100.0), tta_accuracy=0.95, batchstat_accuracy=0.5)
    add_run(tmp_path, "svm-rbf", probs_with_errors(15, 6), svm_train("rbf", 233.0))
    add_run(tmp_path, "svm-hog_seed", probs_with_errors(12, 7), svm_train("hog_seed", 50.0))
    record = tmp_path / "reports/runs/cnn-seed0.json"
    curves = {curve: [[0.0, 0.5], [1.0, 0.7]] for curve in report.CURVES}
    record.write_text(json.dumps(json.loads(record.read_text()) | {"curves": curves}))
    return tmp_path


def acc(root, run_id) -> float:
    """The accuracy the evaluate stage recorded for `run_id` in the fake tree."""
    return json.loads((root / "metrics/eval" / f"{run_id}.json").read_text())["accuracy"]


def cells(table: dict, row: str) -> set[str]:
    return {cell.strip() for cell in line_of(table, row).split("|")}


def line_of(table: dict, row: str) -> str:
    return next(line for line in report.results_table(table).splitlines() if line.split("|")[1].strip() == row)


# ---------------------------------------------------------------- the table


def test_two_seeds_give_mean_and_sample_std(tree):
    table = report.compare(PLAN, 0, tree)
    assert list(table) == ["svm-rbf", "svm-hog_seed", "cnn", "mlp", "wrn", "ensemble"]
    cnn = table["cnn"]
    accs = [acc(tree, "cnn-seed0"), acc(tree, "cnn-seed1")]
    assert accs[0] != accs[1]
    assert cnn["runs"] == 2 and cnn["seeds"] == [0, 1]
    assert cnn["accuracy"] == pytest.approx(np.mean(accs), abs=1e-5)
    assert cnn["accuracy_std"] == pytest.approx(np.std(accs, ddof=1), abs=1e-5)
    assert cnn["tta_accuracy"] == pytest.approx(0.915) and cnn["batchstat_accuracy"] is None
    assert cnn["train_s"] == 60.5 and cnn["parameters"] == 824_458 and cnn["scale"] == "quick"
    assert cnn["recipe"] == "CNN net; adamw onecycle; hflip 0.5; 2 epochs"
    assert cnn["hardware"] == "cpu: AMD EPYC 7B13, 2 threads"
    assert table["mlp"]["tta_accuracy"] is None  # no TTA for rows trained without flips
    assert table["wrn"]["batchstat_accuracy"] == 0.5
    assert line_of(table, "cnn").count("± ") == 2  # accuracy and macro F1
    assert f"{cnn['accuracy']:.4f} ± {cnn['accuracy_std']:.4f} (2 seeds)" in line_of(table, "cnn")
    assert {"824,458", "60.5 s", "0.9150"} <= cells(table, "cnn")  # parameters, time, flip TTA
    svm = table["svm-rbf"]
    assert svm["runs"] == 1 and svm["seeds"] == [] and svm["parameters"] is None
    assert svm["recipe"] == "rbf recipe in words" and svm["train_s"] == 233.0
    assert "±" not in line_of(table, "svm-rbf")


def test_class_accuracy_comes_from_the_recorded_predictions(tree):
    table = report.compare(PLAN, 0, tree)
    for row, runs in (("svm-rbf", ["svm-rbf"]), ("cnn", ["cnn-seed0", "cnn-seed1"])):
        expected = {}
        for c, name in enumerate(FASHION_MNIST.classes):
            per_run = [1 - np.mean(wrong_in(np.load(tree / f"predictions/{r}.npz")["probs"])[LABELS == c])
                       for r in runs]
            expected[name] = pytest.approx(np.mean(per_run), abs=1e-5)
        assert table[row]["class_accuracy"] == expected
    assert "per_class" not in json.loads((tree / "metrics/eval/cnn-seed0.json").read_text())


def test_compare_writes_its_files(tree):
    table = report.compare(PLAN, 0, tree)
    assert json.loads((tree / "reports/results.json").read_text()) == table
    compact = json.loads((tree / "metrics/compare.json").read_text())
    assert compact == report.compact(table) and set(compact) == {r for r, e in table.items() if not e.get("not_run")}
    # per row only the numbers a reader compares: no words, no per-class scores, no std of one seed
    assert set(compact["cnn"]) == {"accuracy", "accuracy_std", "macro_f1", "tta_accuracy", "parameters", "train_s"}
    assert set(compact["svm-rbf"]) == {"accuracy", "macro_f1", "train_s"}
    assert compact["wrn"]["batchstat_accuracy"] == 0.5
    results = (tree / "reports/results.md").read_text()
    assert report.results_table(table) in results
    assert "## Per-class accuracy" in results and "| cnn " in results.split("## Per-class accuracy")[1]
    batch_norm = results.split("## Batch-norm statistics")[1].split("## Figures")[0]
    assert "| wrn " in batch_norm and "| cnn " not in batch_norm
    for name in report.FIGURES:
        assert (tree / "plots/compare" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    # the most accurate single-model row (wrn: 8 mistakes a seed) shows its first seed's gallery
    assert report.best_run(table, report.load_runs(tree, PLAN)[0]) == "wrn-seed0"
    assert (tree / "plots/compare/best_mistakes.png").read_bytes() == PNG + b"wrn-seed0"


def test_leftover_files_of_a_seed_not_in_the_plan_are_ignored(tree):
    # seed 1's files stay from an earlier run with seeds [0, 1]; one is even unreadable now
    (tree / "metrics/eval/mlp-seed1.json").write_text("{not json")
    (tree / "predictions/cnn-seed1.npz").write_bytes(b"truncated")
    add_run(tree, "svm-old", probs_with_errors(0, 1), svm_train("old", 1.0))  # a removed recipe
    table = report.compare(dataclasses.replace(PLAN, seeds=SEED_0), 0, tree)
    assert "svm-old" not in table
    cnn = table["cnn"]
    assert cnn["runs"] == 1 and cnn["seeds"] == [0] and cnn["accuracy_std"] == 0.0
    assert cnn["accuracy"] == pytest.approx(acc(tree, "cnn-seed0"), abs=1e-5)
    assert cnn["train_s"] == 60.0 and cnn["tta_accuracy"] == pytest.approx(0.91)
    assert "±" not in line_of(table, "cnn")
    assert table["mlp"]["runs"] == 1
    assert table["ensemble"]["runs"] == 1 and table["ensemble"]["seeds"] == [0]


def test_removing_rows_from_params_is_fine(tree, write_params):
    """A recipe deleted from params.yaml (its files still there) is simply not in the table."""
    def edit(p):
        del p["mlp"], p["seeds"]["mlp"]
        p["quick"], p["seeds"] = True, {row: [0, 1] for row in p["seeds"]}
        p["svm"] = {k: v for k, v in p["svm"].items() if k != "hog"}
    plan = load_plan(write_params(edit))
    assert "mlp" not in plan.deep and "svm-hog" not in plan.rows()
    table = report.compare(plan, 0, tree)
    assert "mlp" not in table and "svm-hog" not in table
    assert table["cnn"]["runs"] == 2 and table["svm-rbf"]["runs"] == 1
    # the params rows this tree never ran are listed as such
    assert table["resnet7"]["not_run"] and table["svm-fast"]["not_run"]


def test_a_row_never_run_shows_its_command(tree):
    for seed in (0, 1):
        remove_run(tree, f"wrn-seed{seed}")
    remove_run(tree, "svm-hog_seed")
    table = report.compare(PLAN, 0, tree)
    assert list(table) == ["svm-rbf", "svm-hog_seed", "cnn", "mlp", "wrn"]  # one ensemble member left
    wrn = table["wrn"]
    assert wrn["not_run"] is True and wrn["runs"] == 0 and wrn["scale"] == "quick"
    assert wrn["command"] == "dvc repro evaluate_wrn@wrn-0 evaluate_wrn@wrn-1"
    assert "600 epochs" in wrn["estimate"]
    assert table["svm-hog_seed"]["command"] == "dvc repro evaluate_svm@hog_seed"
    line = line_of(table, "wrn")
    assert "not run at quick scale" in line and "`dvc repro evaluate_wrn@wrn-0 evaluate_wrn@wrn-1`" in line
    assert "| wrn " not in report.class_accuracy_table(table)
    markdown = (tree / "reports/results.md").read_text()
    assert "`dvc repro evaluate_svm@hog_seed`" in markdown


def test_one_seed_of_a_row_missing(tree):
    remove_run(tree, "wrn-seed1")
    table = report.compare(PLAN, 0, tree)
    assert table["wrn"]["runs"] == 1 and table["wrn"]["seeds"] == [0]
    # seed 1 has one ensemble member left: no ensemble for it
    assert table["ensemble"]["seeds"] == [0] and table["ensemble"]["runs"] == 1


@pytest.mark.parametrize("plan_quick", [True, False])
def test_a_run_of_the_other_scale_is_not_run(tree, plan_quick):
    """mlp's runs were recorded at full scale, every other run of the tree at quick scale."""
    plan = dataclasses.replace(PLAN, quick=plan_quick)
    for seed in (0, 1):
        path = tree / f"reports/runs/mlp-seed{seed}.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | {"quick": False}))
    if plan_quick:
        table = report.compare(plan, 0, tree)
        assert table["mlp"]["not_run"] and table["mlp"]["scale"] == "quick"
        assert table["mlp"]["command"] == "dvc repro evaluate_mlp@mlp-0 evaluate_mlp@mlp-1"
        assert table["cnn"]["runs"] == 2
    else:  # now only mlp is of this scale
        table = report.compare(plan, 0, tree)
        assert table["mlp"]["runs"] == 2 and table["mlp"]["scale"] == "full"
        assert all(table[row].get("not_run") for row in ("svm-rbf", "svm-hog_seed", "cnn", "wrn"))
        assert "not run at full scale" in line_of(table, "cnn")


def test_no_run_of_this_scale_is_an_error(tree):
    with pytest.raises(UserError, match="dvc repro"):
        report.compare(dataclasses.replace(PLAN, quick=False), 0, tree)
    assert not (tree / "metrics/compare.json").exists()


def test_the_ensemble_row_says_what_it_averages(tree):
    plan = dataclasses.replace(PLAN, ensemble=("cnn", "mlp", "wrn"))
    table = report.compare(plan, 0, tree)
    ensemble = table["ensemble"]
    assert ensemble["recipe"] == "mean plain probabilities of cnn, mlp, wrn"
    per_seed = []
    for s in (0, 1):
        mean = sum(np.load(tree / f"predictions/{row}-seed{s}.npz")["probs"] for row in ("cnn", "mlp", "wrn")) / 3
        per_seed.append(np.mean(mean.argmax(axis=1) == LABELS))
    assert ensemble["runs"] == 2 and ensemble["accuracy"] == pytest.approx(np.mean(per_seed), abs=1e-5)
    assert ensemble["parameters"] == 824_458 + 101_770 + 1_000
    assert ensemble["train_s"] == pytest.approx(60.5 + 10.0 + 100.0)
    assert ensemble["tta_accuracy"] is None  # plain probabilities: no TTA number
    # a listed member with no run at this scale is named as such
    for seed in (0, 1):
        remove_run(tree, f"mlp-seed{seed}")
    table = report.compare(plan, 0, tree)
    assert table["ensemble"]["recipe"] == "mean plain probabilities of cnn, wrn (mlp: not run)"
    assert "mean plain probabilities of cnn, wrn (mlp: not run)" in line_of(table, "ensemble")


def test_the_ensemble_keeps_to_the_seeds_every_member_ran(tree):
    """cnn and wrn ran seeds 0 and 1, mlp only seed 0: a seed-1 ensemble of two of the three
    members would mix different ensembles into one mean."""
    remove_run(tree, "mlp-seed1")
    table = report.compare(dataclasses.replace(PLAN, ensemble=("cnn", "mlp", "wrn")), 0, tree)
    assert table["ensemble"]["seeds"] == [0] and table["ensemble"]["runs"] == 1
    assert table["ensemble"]["recipe"] == "mean plain probabilities of cnn, mlp, wrn"


def test_a_row_names_every_machine_its_seeds_ran_on(tmp_path):
    for seed, card in ((0, "NVIDIA H100 80GB HBM3"), (1, "NVIDIA H200")):
        add_run(tmp_path, f"wrn-seed{seed}", probs_with_errors(5, seed),
                deep_train("wrn", seed, 10, 1.0, device="cuda", hardware=card))
    table = report.compare(PLAN, 0, tmp_path)
    assert table["wrn"]["hardware"] == "cuda: NVIDIA H100 80GB HBM3, cuda: NVIDIA H200"


def test_the_ensemble_names_the_hardware_its_members_used(tmp_path):
    for row in ("cnn", "wrn"):
        add_run(tmp_path, f"{row}-seed0", probs_with_errors(5, 1),
                deep_train(row, 0, 10, 1.0, device="cuda", hardware="NVIDIA H100 80GB HBM3"), seed=0)
    table = report.compare(dataclasses.replace(PLAN, seeds=SEED_0), 0, tmp_path)
    assert table["cnn"]["hardware"] == "cuda: NVIDIA H100 80GB HBM3"
    assert table["ensemble"]["hardware"] == "cuda: NVIDIA H100 80GB HBM3"


def test_compare_stage(tree, write_params, monkeypatch):
    params = write_params(lambda p: p.update(quick=True, seeds={row: [0, 1] for row in p["seeds"]}))
    monkeypatch.chdir(tree)
    result = invoke(compare_main, ["--params", params])
    assert result.exit_code == 0, result.output
    table = json.loads((tree / "reports/results.json").read_text())
    ran = [row for row, e in table.items() if not e.get("not_run")]
    assert result.output.strip() == (f"compare: {len(ran)} of {len(table)} rows ran, best wrn 0.9200; "
                                     "table in reports/results.md")  # one line: the table is in the file
    assert table["cnn"]["runs"] == 2 and table["se_wrn"]["not_run"]


def test_compare_stage_without_evaluations_names_the_fix(tmp_path, write_params, monkeypatch):
    params = write_params()
    monkeypatch.chdir(tmp_path)
    result = invoke(compare_main, ["--params", params])
    assert result.exit_code == 2 and "dvc repro" in result.output
    assert len(result.output.strip().splitlines()) == 1


# ---------------------------------------------------------------- the README block


def test_readme_block_update_and_check_round_trip(tree):
    table = report.compare(PLAN, 0, tree)
    metrics = tree / "reports/results.json"
    path = tree / "README.md"
    path.write_text(f"# x\n\n## Results\n\n{readme.START}\nold table\n{readme.END}\n\n## After\n")

    def cli(*args):
        return invoke(readme.main, ["--readme", path, "--results", metrics, *args])

    result = cli("--check")
    assert result.exit_code == 1 and "differs" in result.output and "python -m fashionbench.readme" in result.output
    result = cli()
    assert result.exit_code == 0 and "table updated" in result.output
    text = path.read_text()
    assert text.startswith("# x\n\n## Results\n\n") and text.endswith("\n\n## After\n")
    assert "old table" not in text
    assert readme.current_block(path) == readme.block(table)
    assert report.results_table(table) in readme.block(table)
    assert cli("--check").exit_code == 0
    assert "already up to date" in cli().output
    assert readme.update(path, table) is False
    # a new number makes the block stale again
    changed = json.loads(metrics.read_text())
    changed["cnn"]["accuracy"] = 0.5
    metrics.write_text(json.dumps(changed))
    assert cli("--check").exit_code == 1
    assert readme.update(path, changed) is True and "| 0.5000 ± " in path.read_text()


def test_readme_without_markers_or_metrics(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("# x\n")
    with pytest.raises(UserError, match="markers"):
        readme.update(path, {})
    assert path.read_text() == "# x\n"
    result = invoke(readme.main, ["--readme", path, "--results", tmp_path / "none.json"])
    assert result.exit_code == 2 and "dvc repro compare" in result.output


def new_layout(table: dict) -> bool:
    ran = [e for e in table.values() if not e.get("not_run")]
    return bool(ran) and all({"hardware", "tta_accuracy", "batchstat_accuracy", "class_accuracy",
                              "calibrated_runs", "robust_runs"} <= set(e)
                             and isinstance(e.get("seeds"), list) for e in ran)


def test_repository_readme_matches_reports_results_json():
    results_json = REPO / "reports/results.json"
    if not results_json.is_file():
        pytest.skip("reports/results.json is absent: run `dvc repro compare`")
    table = json.loads(results_json.read_text())
    if not new_layout(table):
        pytest.skip("reports/results.json predates the current compare layout: run `dvc repro compare`")
    assert readme.current_block(REPO / "README.md") == readme.block(table), \
        "README.md's results table is stale: run `python -m fashionbench.readme`"


# ---------------------------------------------------------------- the CI gate


def entry(accuracy, macro_f1=None, tta=None):
    """A row of metrics/compare.json as summarise writes it."""
    return {"runs": 1, "seeds": [0], "parameters": 1000, "recipe": "some recipe", "accuracy": accuracy,
            "accuracy_std": 0.0, "macro_f1": macro_f1 if macro_f1 is not None else accuracy,
            "macro_f1_std": 0.0, "tta_accuracy": tta, "batchstat_accuracy": None, "epochs": 1,
            "train_size": 4000, "train_s": 1.0, "hardware": "cpu: AMD EPYC 7B13, 2 threads",
            "scale": "quick", "seed_reported": "-", "class_accuracy": dict.fromkeys(FASHION_MNIST.classes, accuracy)}


NOT_RUN = {"runs": 0, "not_run": True, "command": "dvc repro evaluate@x-0", "estimate": "-",
           "scale": "quick", "seed_reported": "-"}
OLD = {"svm-rbf": entry(0.85), "cnn": entry(0.90, 0.89, 0.91), "mlp": entry(0.70), "wrn": entry(0.80),
       "se_wrn": NOT_RUN, "resnet7": NOT_RUN}
NEW = {"svm-rbf": entry(0.84), "cnn": entry(0.85, 0.84, 0.86), "mlp": NOT_RUN, "wrn": entry(0.83),
       "se_wrn": entry(0.60), "resnet7": NOT_RUN, "ensemble": entry(0.88)}


def test_gate_catches_a_planted_regression():
    assert gate.accuracy_drops(OLD, NEW, tolerance=0.02) == [
        "cnn: accuracy 0.9000 -> 0.8500 (-0.0500)",
        "mlp: accuracy was 0.7000 and is now missing",
    ]
    # a wider tolerance lets the cnn drop pass; the vanished row still fails
    assert gate.accuracy_drops(OLD, NEW, tolerance=0.06) == ["mlp: accuracy was 0.7000 and is now missing"]


def test_gate_ignores_changes_within_tolerance_and_rows_not_run():
    assert gate.accuracy_drops(OLD, OLD, tolerance=0.0) == []
    within = {"svm-rbf": entry(0.835), "cnn": entry(0.88), "mlp": entry(0.95), "wrn": entry(0.79),
              "se_wrn": NOT_RUN, "resnet7": entry(0.1)}
    assert gate.accuracy_drops(OLD, within, tolerance=0.02) == []
    # a baseline row that was never run has nothing to drop from
    assert gate.accuracy_drops({"se_wrn": NOT_RUN}, {"se_wrn": entry(0.1)}, tolerance=0.0) == []
    assert gate.accuracy_drops({"se_wrn": NOT_RUN}, {}, tolerance=0.0) == []


@pytest.mark.parametrize("before, after", [(0.85, 0.83), (0.9, 0.88), (0.7, 0.68), (0.912, 0.892)])
def test_a_drop_of_exactly_the_tolerance_passes(before, after):
    assert gate.accuracy_drops({"cnn": entry(before)}, {"cnn": entry(after)}, tolerance=0.02) == []
    assert gate.accuracy_drops({"cnn": entry(before)}, {"cnn": entry(after - 0.001)}, tolerance=0.02) != []


def test_diff_table_shows_old_new_and_change():
    lines = gate.diff_table(OLD, NEW).splitlines()
    assert lines[0].split() == ["Row", "Metric", "baseline", "quick", "run", "Change"]
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in lines[1:]}
    assert rows[("cnn", "accuracy")] == ["0.9000", "0.8500", "-0.0500"]
    assert rows[("cnn", "macro_f1")] == ["0.8900", "0.8400", "-0.0500"]
    assert rows[("cnn", "tta_accuracy")] == ["0.9100", "0.8600", "-0.0500"]
    assert rows[("wrn", "accuracy")] == ["0.8000", "0.8300", "+0.0300"]
    assert rows[("mlp", "accuracy")] == ["0.7000", "-", "-"]
    assert rows[("se_wrn", "accuracy")] == ["-", "0.6000", "-"]
    assert rows[("ensemble", "accuracy")] == ["-", "0.8800", "-"]
    assert ("resnet7", "accuracy") not in rows and ("wrn", "tta_accuracy") not in rows
    assert [key[0] for key in rows][:3] == ["svm-rbf", "svm-rbf", "cnn"]  # baseline order first
    assert gate.diff_table(OLD, NEW, "old", "new").splitlines()[0].split()[2:4] == ["old", "new"]


# ---------------------------------------------------------------- the quick run


def git(root, *args):
    subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args], cwd=root,
                   check=True, capture_output=True)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A committed git repository with params.yaml and a quick baseline; the cwd."""
    root = tmp_path / "ws"
    (root / "reports").mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "reports/quick-baseline.json").write_text(json.dumps(OLD))
    (root / "notes.txt").write_text("committed\n")
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "init")
    monkeypatch.chdir(root)
    return root


def never_run(name, overrides):
    pytest.fail("the quick run started despite the refusal")


def test_quick_refuses_a_dirty_workspace(workspace, monkeypatch):
    monkeypatch.setattr(quick, "run_experiment", never_run)
    (workspace / "notes.txt").write_text("changed\n")
    result = invoke(quick.main)
    assert result.exit_code == 2
    assert "uncommitted changes to notes.txt" in result.output and "--allow-dirty" in result.output
    # an untracked file alone does not count; the modified one does until committed
    (workspace / "notes.txt").write_text("committed\n")
    (workspace / "scratch.txt").write_text("untracked\n")
    monkeypatch.setattr(quick, "run_experiment", lambda name, overrides: OLD)
    assert invoke(quick.main).exit_code == 0


def test_quick_with_allow_dirty_runs(workspace, monkeypatch):
    (workspace / "params.yaml").write_text((workspace / "params.yaml").read_text() + "\n")
    calls = []
    monkeypatch.setattr(quick, "run_experiment", lambda name, overrides: calls.append(overrides) or OLD)
    result = invoke(quick.main, ["--allow-dirty", "-S", "model.depth=16"])
    assert result.exit_code == 0, result.output
    # each row with several seeds keeps its first; the user's -S come last and win
    several = {row: seeds for row, seeds in load_plan(workspace / "params.yaml").seeds.items() if len(seeds) > 1}
    assert several  # the repository's params.yaml has rows with several seeds
    assert calls == [[*(f"seeds.{row}=[{seeds[0]}]" for row, seeds in several.items()), "model.depth=16"]]


def test_quick_fails_on_a_regression_and_prints_the_diff(workspace, monkeypatch):
    regressed = json.loads(json.dumps(OLD))
    regressed["cnn"]["accuracy"] = 0.85
    monkeypatch.setattr(quick, "run_experiment", lambda name, overrides: regressed)
    result = invoke(quick.main)
    assert result.exit_code == 1, result.output
    assert gate.diff_table(OLD, regressed) in result.output
    diff_line = next(line for line in result.output.splitlines() if line.split()[:2] == ["cnn", "accuracy"])
    assert diff_line.split()[2:] == ["0.9000", "0.8500", "-0.0500"]
    assert "accuracy dropped by more than 0.02" in result.output
    assert "cnn: accuracy 0.9000 -> 0.8500 (-0.0500)" in result.output
    assert json.loads((workspace / "reports/quick-baseline.json").read_text()) == OLD  # untouched


def test_quick_passes_within_tolerance_and_updates_the_baseline(workspace, monkeypatch):
    better = json.loads(json.dumps(OLD))
    better["cnn"]["accuracy"] = 0.89
    monkeypatch.setattr(quick, "run_experiment", lambda name, overrides: better)
    result = invoke(quick.main)
    assert result.exit_code == 0 and "ok: no row's accuracy dropped" in result.output
    result = invoke(quick.main, ["--update-baseline"])
    assert result.exit_code == 0 and "wrote reports/quick-baseline.json" in result.output
    assert json.loads((workspace / "reports/quick-baseline.json").read_text()) == report.compact(better)


def test_quick_without_a_baseline_says_how_to_make_one(workspace, monkeypatch):
    git(workspace, "rm", "-q", "reports/quick-baseline.json")
    git(workspace, "commit", "-qm", "no baseline")
    monkeypatch.setattr(quick, "run_experiment", lambda name, overrides: OLD)
    result = invoke(quick.main)
    assert result.exit_code == 2 and "--update-baseline" in result.output


def test_tta_cell_names_shifted_views_only_where_a_row_used_them():
    from fashionbench.report import _tta_cell
    assert _tta_cell({"tta_accuracy": 0.943, "tta_shift": 1}) == "0.9430 (+ 1 px shifts)"
    assert _tta_cell({"tta_accuracy": 0.9386, "tta_shift": 0}) == "0.9386"
    assert _tta_cell({"tta_accuracy": 0.9, "tta_shift": float("nan")}) == "0.9000"  # the ensemble
    assert _tta_cell({"tta_accuracy": None}) == "-"
