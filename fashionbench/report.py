"""The compare stage: one results table of exactly the runs params.yaml defines, an ensemble
row, figures, and the README's table (written by `python -m fashionbench.readme`).

Everything comes from what the evaluate stage keeps in git, so the table and figures are
rebuilt byte for byte on a clone without the DVC cache: reports/runs/<id>.json (recipe and
architecture in words, parameters, epochs, time, hardware, scale, curves),
metrics/eval/<id>.json (plain, TTA and batch-statistics accuracy), plots/confusion/<id>.csv
(each test image's label and prediction: per-class accuracy, the confusion figure) and
predictions/<id>.npz (test probabilities: the ensemble), plots/reliability/<id>.csv and
reports/robustness/<id>.json (calibration and corrupted-set figures). A run params.yaml defines but nobody
has run at this scale is a row that says so, with the command that runs it; a file no
current run names is never read.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from fashionbench.dataset import FASHION_MNIST
from fashionbench.errors import UserError
from fashionbench.io import atomic_path, save_figure, write_json, write_text
from fashionbench.params import RUN_RECORDS, Plan, evaluate_stage
from fashionbench.calibration import ECE_BINS, calibration
from fashionbench.scores import class_accuracy, classification_metrics

ENSEMBLE = "ensemble"
CURVES = ("train/loss", "val/loss", "train/acc", "val/acc")  # DVCLive names from training
FIGURES = ("accuracy_vs_parameters", "accuracy_vs_train_time", "class_accuracy", "learning_curves",
           "best_confusion", "best_mistakes", "reliability", "robustness")  # plots/compare/<name>.png

# What the source reports give for each row (the last epoch where they say which), shown
# beside our numbers. The seed credits its SVC recipe as written (with a scaler: our
# rbf_scaled) with the 0.8999 that only the unscaled recipe reaches.
SEED_REPORTED = {
    "svm-rbf": "0.8999", "svm-rbf_scaled": "0.8999 (claimed)", "svm-hog_seed": "0.8940",
    "svm-hog": "0.8940 (seed's HOG row)", "cnn": "0.9320", "resnet7": "0.9300",
    "resnet9": "- (CIFAR-10 lab)", "resnet18": "0.950 (2nd report)", "resnet34": "0.949 (2nd report)",
    "mlp": "0.851 (2nd report)", "mlp512": "~0.896 val (NumPy report)", "wrn": "0.9573 (WRN-40-4)",
    "wrn28": "0.9558 (WRN-28-2)", "se_wrn": "0.9602 (SE-WRN-40-4)", "se_wrn64": "0.9582 (SE-WRN-64-8)",
    "wrn32": "0.9579 (3rd report; TTA 0.9607)", "wrn32_mish": "0.9601 (3rd report; TTA 0.9621)",
}

# How long a row nobody has run at full scale would take: seconds per epoch on the 2-core
# AVX512-BF16 EPYC (family 25 model 17, bf16, both cores; `python -m fashionbench.runner time
# <row> --images 1024`; ResNet-9's from its 20-epoch run) and on one H100 (this engine's
# defaults, bench/results-gpu-h100.md: WRN-40-4 at batch 128 10.4 s, the SE-WRN-40-4 row 9.1 s;
# None: not measured). SE-WRN-64-8's are SE-WRN-40-4's scaled by their training FLOPs per image
# (34.86 / 4.92 GFLOP = 7.08x, torch's FlopCounterMode), not measured: one warm-up of ten
# batches of 256 would take minutes here.
NOT_RUN_CPU = "the 2-core AVX512-BF16 EPYC in bf16"
NOT_RUN_EPOCH_S = {"resnet7": (95, None), "resnet9": (316, None), "resnet18": (451, None),
                   "resnet34": (826, None), "wrn": (1825, 10.4), "wrn28": (477, None),
                   "se_wrn": (1118, 9.1), "se_wrn64": (7919, 64.4), "wrn32": (2443, None),
                   "wrn32_mish": (2878, None)}
# The rbf_scaled fit: 2595 s on one core of the same EPYC.
NOT_RUN_ESTIMATE = {"svm-rbf_scaled": "a ~43 min libsvm fit on one core, plus ~10 min predict",
                    "speedrun_cpu": "at most 10 min a seed on the 2-core CPU: its time_budget_s"}


RUN_COLUMNS = ("id", "row", "seed", "accuracy", "macro_f1", "tta_accuracy", "tta_shift", "batchstat_accuracy",
               "parameters", "recipe", "epochs", "train_size", "train_s", "hardware",
               "calibrated", "ece", "ece_ts", "brier", "brier_ts", "temperature",
               "robust", "corruption_accuracy", "corruption_means")
# Calibration and corrupted-set figures: a run evaluated before they existed has none (its
# row says "not evaluated", never a number); a row shows the mean over the seeds that have them.
EVALUATED_MEAN = ("ece", "ece_ts", "brier", "brier_ts", "temperature", "corruption_accuracy")
NOT_EVALUATED = "not evaluated"
SUMMED = ("accuracy", "macro_f1")                          # mean ± sample std over seeds
ALL_OR_NONE = ("tta_accuracy", "batchstat_accuracy")       # mean only when every seed has one
COMPACT = ("accuracy", "accuracy_std", "macro_f1", "tta_accuracy", "batchstat_accuracy",
           "parameters", "train_s", "ece", "ece_ts", "corruption_accuracy")  # metrics/compare.json, per row


# ---------------------------------------------------------------- gathering


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is unreadable ({err}): re-run the stage that writes it "
                        f"(`dvc repro -f` of its train or evaluate stage)") from None


def _load_predictions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of a predictions file; unreadable is a UserError naming it."""
    try:
        with np.load(path) as saved:
            return saved["labels"], saved["probs"]
    except Exception as err:  # truncated or foreign file
        raise UserError(f"{path} is unreadable ({type(err).__name__}): re-run its evaluate stage "
                        f"(`dvc repro -f evaluate_<row>@<row>-<seed>` or `evaluate_svm@<recipe>`)") from None


def _load_confusion(path: Path, classes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predicted) of a confusion CSV (actual,predicted as class names)."""
    index = {name: k for k, name in enumerate(classes)}
    try:
        with open(path, newline="") as f:
            pairs = [(index[r["actual"]], index[r["predicted"]]) for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError) as err:
        raise UserError(f"{path} is unreadable ({type(err).__name__}: {err}): re-run its evaluate stage "
                        f"(`dvc repro -f evaluate_<row>@<row>-<seed>` or `evaluate_svm@<recipe>`)") from None
    labels, predicted = np.array(pairs, dtype=np.int64).reshape(-1, 2).T
    return labels, predicted


def _recipe(row: str, train: dict) -> str:
    if row.startswith("svm-"):
        return train.get("recipe", "-")
    return f"{train.get('architecture', row)}; {train.get('recipe', '-')}"


def _hardware(train: dict) -> str | None:
    hardware = train.get("hardware")
    if not hardware:
        return train.get("device")
    threads = train.get("threads")
    plural = "s" if threads != 1 else ""
    precision = train.get("precision")  # recorded since runs began to say it
    return (f"{train.get('device', 'cpu')}: {hardware}" + (f", {threads} thread{plural}" if threads else "")
            + (f", {precision}" if precision else ""))


def _run_record(run_id: str, row: str, seed: int | None, ev: dict, train: dict,
                classes: tuple[str, ...], labels: np.ndarray, predicted: np.ndarray) -> dict:
    return {"id": run_id, "row": row, "seed": seed, "accuracy": ev["accuracy"],
            "macro_f1": ev["macro_f1"], "tta_accuracy": ev.get("tta_accuracy"),
            "tta_shift": ev.get("tta_shift", 0),  # px of the shifted TTA views; 0 = flips only
            "batchstat_accuracy": ev.get("batchstat_accuracy"),
            "parameters": train.get("parameters"), "recipe": _recipe(row, train),
            "epochs": train.get("epochs"), "train_size": train.get("train_size"),
            "train_s": train.get("fit_time_s", train.get("wall_time_s")),
            "hardware": _hardware(train)} | _evaluated(ev) | class_accuracy(labels, predicted, classes)


def _evaluated(ev: dict) -> dict:
    """A run's calibration and corrupted-set figures from its metrics (None where absent;
    `calibrated` and `robust` say whether it has them: an SVM's "before" figures are None)."""
    cal, rob = ev.get("calibration") or {}, ev.get("robustness") or {}
    return {"calibrated": bool(cal),
            **{k: cal.get(k) for k in ("ece", "ece_ts", "brier", "brier_ts", "temperature")},
            "robust": bool(rob), "corruption_accuracy": rob.get("mean_accuracy"),
            "corruption_means": rob.get("corruptions")}


def load_runs(root: Path, plan: Plan) -> tuple[pd.DataFrame, list[str]]:
    """One row per run `plan` defines that has been trained and evaluated at the plan's scale
    (RUN_COLUMNS, then per-class accuracy), and the ids of those that have not."""
    records, missing = [], []
    for run_id, row, seed in plan.runs():
        ev_path, train_path = root / "metrics/eval" / f"{run_id}.json", root / RUN_RECORDS / f"{run_id}.json"
        confusion = root / "plots/confusion" / f"{run_id}.csv"
        if not (ev_path.is_file() and train_path.is_file() and confusion.is_file()):
            missing.append(run_id)
            continue
        ev, train = _read_json(ev_path), _read_json(train_path)
        if "accuracy" not in ev or "macro_f1" not in ev:
            raise UserError(f"{ev_path} lacks accuracy or macro_f1: re-run its evaluate stage")
        if bool(train.get("quick")) != plan.quick:
            missing.append(run_id)  # a result of the other scale: not this table's
            continue
        records.append(_run_record(run_id, row, seed, ev, train, plan.classes,
                                   *_load_confusion(confusion, plan.classes)))
    return pd.DataFrame.from_records(records, columns=[*RUN_COLUMNS, *plan.classes]), missing


def ensemble_runs(root: Path, members: tuple[str, ...], runs: pd.DataFrame, classes: tuple[str, ...],
                  calibration_seed: int, test_size_key: str) -> pd.DataFrame:
    """Per seed, the mean of the members' plain test probabilities (two or more members).
    Seeds that every member ran are the ensemble's seeds; only where none is complete does a
    partial ensemble stand in (its recipe names the absent members). A member run whose
    predictions are not in git (trained before they were kept there) is absent. Calibration
    is measured on the mean probabilities as the evaluate stage measures a run's (the same
    halves of the test set, `calibration_seed`); the corrupted set is not, since the members'
    predictions on it are not kept."""
    records = []
    kept = runs["row"].isin(members) & runs["id"].map(lambda i: (root / "predictions" / f"{i}.npz").is_file())
    by_seed = [(seed, parts) for seed, parts in runs[kept].groupby("seed", sort=True)
               if len(parts) >= 2]
    complete = [(seed, parts) for seed, parts in by_seed if set(parts["row"]) == set(members)]
    for seed, parts in complete or by_seed:
        loaded = [_load_predictions(root / "predictions" / f"{run_id}.npz") for run_id in parts["id"]]
        labels, probs = loaded[0][0], np.mean([p for _, p in loaded], axis=0)
        recipe = "mean plain probabilities of " + ", ".join(parts["row"])
        for reason, absent in (("not run", [m for m in members if m not in set(runs["row"])]),
                               ("predictions not in git", [m for m in members if m in set(runs["row"])
                                                           and m not in set(parts["row"])])):
            if absent:
                recipe += f" ({', '.join(absent)}: {reason})"
        metrics = classification_metrics(labels, probs.argmax(axis=1), len(classes))
        figures, _ = calibration(probs, labels, calibration_seed, test_size_key)
        records.append({"id": f"{ENSEMBLE}-seed{int(seed)}", "row": ENSEMBLE, "seed": int(seed), **metrics,
                        "parameters": parts["parameters"].sum(), "recipe": recipe,
                        "train_s": parts["train_s"].sum(),
                        "hardware": _distinct(parts["hardware"])}
                       | _evaluated({"calibration": figures})
                       | class_accuracy(labels, probs.argmax(axis=1), classes))
    return pd.DataFrame.from_records(records, columns=runs.columns)


# ---------------------------------------------------------------- the table


def _distinct(values: pd.Series) -> str | None:
    """Every machine a row's seeds ran on, once each."""
    return ", ".join(sorted(set(values.dropna()))) or None


def _all_or_none(values: pd.Series) -> float:
    return values.mean() if values.notna().all() else np.nan


def _count_true(values: pd.Series) -> int:
    """How many of `values` are True (missing values, as an ensemble's, are not)."""
    return sum(1 for v in values if isinstance(v, (bool, np.bool_)) and v)


def _mean_of_dicts(values: pd.Series) -> dict | None:
    """Key by key mean of the dicts among `values` (None where there is none)."""
    dicts = [v for v in values if isinstance(v, dict)]
    return {k: float(np.mean([d[k] for d in dicts])) for k in dicts[0]} if dicts else None


def summarise(runs: pd.DataFrame, missing: list[str], plan: Plan) -> pd.DataFrame:
    """One row per table row: mean and sample std over its seeds; rows with no run at this
    scale carry the command that runs them. Index: the row names, in params.yaml's order."""
    groups = runs.groupby("row", sort=False)
    table = groups.agg(runs=("id", "size"), **{k: (k, "mean") for k in SUMMED},
                       **{f"{k}_std": (k, "std") for k in SUMMED},
                       **{k: (k, _all_or_none) for k in ALL_OR_NONE},
                       **{k: (k, "first") for k in ("parameters", "recipe", "epochs", "train_size")},
                       hardware=("hardware", _distinct),
                       tta_shift=("tta_shift", "max"),
                       train_s=("train_s", "mean"),
                       **{k: (k, "mean") for k in EVALUATED_MEAN},   # NaN-skipping: evaluated seeds
                       calibrated_runs=("calibrated", _count_true),
                       robust_runs=("robust", _count_true),
                       corruptions=("corruption_means", _mean_of_dicts))
    table["worst_corruption"] = [min(d, key=d.get) if d else None for d in table["corruptions"]]
    table["worst_accuracy"] = [min(d.values()) if d else np.nan for d in table["corruptions"]]
    table[[f"{k}_std" for k in SUMMED]] = table[[f"{k}_std" for k in SUMMED]].fillna(0.0)
    table = table.join(groups[list(plan.classes)].mean())
    table["seeds"] = groups["seed"].agg(lambda s: [int(v) for v in s.dropna()])
    table["not_run_ids"] = [[m for m in missing if plan.row_of(m) == row] for row in table.index]
    not_run = [row for row in plan.rows() if row not in table.index]
    table = pd.concat([table, pd.DataFrame([_not_run(row, missing, plan) for row in not_run],
                                           index=pd.Index(not_run, name="row"))])
    table["scale"] = "quick" if plan.quick else "full"
    reported = SEED_REPORTED if plan.dataset == FASHION_MNIST.name else {}  # the reports' dataset
    table["seed_reported"] = [reported.get(row, "-") for row in table.index]
    order = [row for row in [*plan.rows(), ENSEMBLE] if row in table.index]
    return table.loc[order]


def _not_run(row: str, missing: list[str], plan: Plan) -> dict:
    run_ids = [m for m in missing if plan.row_of(m) == row]
    stages = " ".join(evaluate_stage(r) for r in run_ids)
    estimate = NOT_RUN_ESTIMATE.get(row, "time not measured")
    if row in NOT_RUN_EPOCH_S and row in plan.epochs and plan.dataset == FASHION_MNIST.name:
        cpu_s, gpu_s = NOT_RUN_EPOCH_S[row]
        epochs = plan.epochs[row]
        estimate = f"{epochs} epochs: ~{epochs * cpu_s / 3600:.1f} h on {NOT_RUN_CPU}"
        if gpu_s is not None:
            estimate += f", ~{epochs * gpu_s / 3600:.1f} h on one H100"
    return {"runs": 0, "not_run": True, "command": f"dvc repro {stages}", "estimate": estimate}


def _plain(value):
    """JSON-ready: numpy scalars to Python, NaN to None, 5 decimals for fractions."""
    if isinstance(value, (list, dict, str)) or value is None:
        return value
    if pd.isna(value):
        return None
    if isinstance(value, (float, np.floating)):
        return int(value) if float(value).is_integer() and abs(value) >= 1 else round(float(value), 5)
    return value.item() if isinstance(value, np.generic) else value


def records(table: pd.DataFrame, classes: tuple[str, ...]) -> dict:
    """reports/results.json: every row of the table with everything the report shows."""
    out = {}
    for row, entry in table.iterrows():
        values = {k: _plain(v) for k, v in entry.items() if k not in classes}
        if entry.get("not_run") is True:
            values = {k: v for k, v in values.items() if v is not None and v != []}
        else:
            values = {k: v for k, v in values.items() if k not in ("not_run", "command", "estimate")}
            values["class_accuracy"] = {c: _plain(entry[c]) for c in classes}
        out[str(row)] = values
    return out


def compact(table: dict) -> dict:
    """metrics/compare.json: per row that ran, the few numbers a reader compares (what
    `dvc metrics diff` and `dvc exp show` list)."""
    return {row: {k: e[k] for k in COMPACT if e.get(k) is not None and not (k.endswith("_std") and e["runs"] < 2)}
            for row, e in table.items() if not e.get("not_run")}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _with_spread(entry: dict, key: str) -> str:
    text = f"{entry[key]:.4f}"
    if entry["runs"] > 1:
        text += f" ± {entry[key + '_std']:.4f} ({entry['runs']} seeds)"
    if entry.get("not_run_ids"):
        text += f" ({', '.join(entry['not_run_ids'])} not run)"
    return text


def _evaluated_note(e: dict, count: str) -> str:
    return f" ({e[count]} of {e['runs']} seeds)" if e[count] < e["runs"] else ""


def _calibration_cells(e: dict) -> dict:
    """ECE and Brier "model → temperature-scaled", and the temperature; "n/a" before scaling
    for SVM score softmaxes (no probabilities); NOT_EVALUATED where no seed has them."""
    if not e.get("calibrated_runs"):
        return dict.fromkeys(CALIBRATION_COLUMNS, NOT_EVALUATED)
    note = _evaluated_note(e, "calibrated_runs")

    def pair(key: str) -> str:
        before = "n/a" if e.get(key) is None else f"{e[key]:.4f}"
        return f"{before} → {e[key + '_ts']:.4f}{note}"

    return {"ECE model → TS": pair("ece"), "Brier model → TS": pair("brier"),
            "temperature": f"{e['temperature']:.3f}{note}"}


def _robustness_cells(e: dict) -> dict:
    if not e.get("robust_runs"):
        return dict.fromkeys(ROBUSTNESS_COLUMNS, NOT_EVALUATED)
    note = _evaluated_note(e, "robust_runs")
    return {"corruption accuracy": f"{e['corruption_accuracy']:.4f}{note}",
            "worst corruption": f"{e['worst_corruption']} {e['worst_accuracy']:.4f}"}


CALIBRATION_COLUMNS = ("ECE model → TS", "Brier model → TS", "temperature")
ROBUSTNESS_COLUMNS = ("corruption accuracy", "worst corruption")


def _display_row(row: str, e: dict) -> dict:
    if e.get("not_run"):
        return {"row": row, "recipe": f"**not run at {e['scale']} scale**: `{e['command']}` ({e['estimate']})",
                "scale": e["scale"], "source report": e["seed_reported"]}
    return {"row": row, "params": f"{e['parameters']:,}" if e.get("parameters") else "-",
            "recipe": e["recipe"], "test accuracy": _with_spread(e, "accuracy"),
            "macro F1": _with_spread(e, "macro_f1"),
            "flip TTA": _tta_cell(e),
            "epochs": str(e["epochs"]) if e.get("epochs") else "-", "train time": _duration(e.get("train_s")),
            "trained on": e.get("hardware") or "-", "scale": e["scale"], "source report": e["seed_reported"],
            **_calibration_cells(e), **_robustness_cells(e)}


def _tta_cell(e: dict) -> str:
    if e.get("tta_accuracy") is None:
        return "-"
    shift = e.get("tta_shift")  # None or NaN where no run recorded one (older runs, the ensemble)
    shifted = isinstance(shift, (int, float)) and shift > 0
    return f"{e['tta_accuracy']:.4f}" + (f" (+ {shift:g} px shifts)" if shifted else "")


def results_table(table: dict) -> str:
    """The Markdown results table, a pure function of reports/results.json."""
    columns = ["row", "params", "recipe", "test accuracy", "macro F1", "flip TTA", *CALIBRATION_COLUMNS,
               *ROBUSTNESS_COLUMNS, "epochs", "train time", "trained on", "scale", "source report"]
    shown = pd.DataFrame([_display_row(row, e) for row, e in table.items()], columns=columns).fillna("-")
    return shown.to_markdown(index=False, colalign=["left"] * len(columns)) + "\n"


def class_accuracy_table(table: dict) -> str:
    """Per-class test accuracy (recall) of every row that ran, as Markdown."""
    ran = {row: e["class_accuracy"] for row, e in table.items() if not e.get("not_run")}
    frame = pd.DataFrame.from_dict(ran, orient="index")  # columns: the class names, in label order
    return frame.rename_axis("row").reset_index().to_markdown(index=False, floatfmt=".3f") + "\n"


def batch_norm_table(table: dict) -> str:
    """Eval-mode (running statistics after precise-BN) against batch-statistics accuracy."""
    rows = {row: {"eval mode": f"{e['accuracy']:.4f}", "batch statistics": f"{e['batchstat_accuracy']:.4f}",
                  "difference": f"{e['accuracy'] - e['batchstat_accuracy']:+.4f}"}
            for row, e in table.items() if e.get("batchstat_accuracy") is not None}
    frame = pd.DataFrame.from_dict(rows, orient="index",
                                   columns=["eval mode", "batch statistics", "difference"])
    return frame.rename_axis("row").reset_index().to_markdown(
        index=False, disable_numparse=True, colalign=["left", "right", "right", "right"]) + "\n"


def results_markdown(table: dict) -> str:
    """reports/results.md: the table, per-class accuracy, batch-norm check and figures."""
    figures = "\n".join(f"![{name}](../plots/compare/{name}.png)" for name in FIGURES)
    return ("# Results\n\nTest accuracy on the official test images, final epoch, plain single "
            "view; flip TTA separately, for rows trained with flips only (plus shifted views where "
            "the cell says so). Mean ± sample std where "
            "several seeds ran. Scale `quick` means the quick check (subsets, one epoch), never "
            f"a result.\n\n{CALIBRATION_NOTES}\n\n"
            f"{results_table(table)}\n## Per-class accuracy\n\n{class_accuracy_table(table)}\n"
            "## Batch-norm statistics\n\nTest accuracy with the running statistics (after the "
            "precise-BN pass over training images) and with each test batch's own statistics; "
            f"equal within noise when the running statistics match the final weights.\n\n"
            f"{batch_norm_table(table)}\n## Figures\n\n{figures}\n")


CALIBRATION_NOTES = (
    f"Calibration: ECE uses {ECE_BINS} equal-width bins of the top-1 confidence (Guo et al. 2017); "
    "Brier is the sum over classes of the squared error, averaged over images (0 best, 2 worst). "
    "Each is given for the model's probabilities → after temperature scaling (TS). Temperatures are "
    "fitted 2-fold on stratified halves of the test set, each half scored with the other half's "
    "temperature; the temperature column is the geometric mean of the two. SVM rows: a softmax of "
    "decision scores is no probability, so \"before\" is n/a, and temperature scaling is what makes "
    "it one. Robustness: plain accuracy on the corrupted test set (`dvc repro corrupt`: a stratified "
    "subset of the test images, `corrupt.subset_size`, under each of `corrupt.corruptions` at each "
    "of `corrupt.severities`, as MNIST-C and CIFAR-10-C), the mean over corruptions and severities, "
    "and the corruption of the lowest mean over its severities. \"not evaluated\": the run's "
    "evaluation predates these figures; re-run its evaluate stage where its model file is.")


# ---------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scatter(table: dict, key: str, xlabel: str, title: str, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row, e in table.items():
        if e.get(key) is None:
            continue
        ax.errorbar(e[key], e["accuracy"], yerr=e["accuracy_std"] or None, fmt="o", capsize=3)
        ax.annotate(row, (e[key], e["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xscale="log", xlabel=xlabel, ylabel="test accuracy", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def _class_heatmap(table: dict, path: Path) -> None:
    plt = _pyplot()
    rows = [r for r, e in table.items() if not e.get("not_run")]
    classes = list(table[rows[0]]["class_accuracy"])  # in label order
    values = np.array([[table[r]["class_accuracy"][c] for c in classes] for r in rows])
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 2))
    ax.imshow(values, cmap="viridis", vmin=min(0.5, values.min()), vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="black" if v > 0.85 else "white")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title("per-class test accuracy")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def _learning_curves(root: Path, run_ids: list[str], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    curves = {run_id: _read_json(root / RUN_RECORDS / f"{run_id}.json").get("curves", {}) for run_id in run_ids}
    for ax, curve in zip(axes.flat, CURVES):
        for run_id in run_ids:
            if curves[run_id].get(curve):
                steps, values = zip(*curves[run_id][curve])
                ax.plot(steps, values, marker="o" if len(steps) < 3 else None, label=run_id)
        ax.set(title=curve, xlabel="epoch", ylabel=curve.rsplit("/", 1)[-1])
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_figure(fig, path, dpi=100)


def _read_reliability(path: Path) -> dict[str, list[dict]]:
    """plots/reliability/<id>.csv by series ("model", "temperature-scaled")."""
    series: dict[str, list[dict]] = {}
    try:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                series.setdefault(r["probabilities"], []).append(
                    {"bin": int(r["bin"]), "confidence": float(r["confidence"]),
                     "accuracy": float(r["accuracy"]), "count": int(r["count"])})
    except (OSError, KeyError, ValueError) as err:
        raise UserError(f"{path} is unreadable ({type(err).__name__}: {err}): re-run its evaluate stage") from None
    return series


def _pooled(points: list[dict]) -> tuple[list[float], list[float]]:
    """Per bin over several runs: count-weighted mean confidence and accuracy."""
    bins: dict[int, list[float]] = {}
    for p in points:
        total = bins.setdefault(p["bin"], [0.0, 0.0, 0.0])
        total[0] += p["confidence"] * p["count"]
        total[1] += p["accuracy"] * p["count"]
        total[2] += p["count"]
    ordered = [bins[b] for b in sorted(bins)]
    return [c / n for c, _, n in ordered], [a / n for _, a, n in ordered]


def _panels(count: int, cols: int = 4, size: float = 2.9):
    plt = _pyplot()
    rows = max(1, -(-count // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + 0.6), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    return fig, axes


def _reliability(root: Path, table: dict, runs: pd.DataFrame, path: Path) -> None:
    """One reliability diagram per row (its seeds' bins pooled): the model's probabilities
    and the temperature-scaled ones, against the diagonal."""
    series: dict[str, dict[str, list[dict]]] = {}
    for run_id, row in zip(runs["id"], runs["row"]):
        csv_path = root / "plots/reliability" / f"{run_id}.csv"
        if row in table and csv_path.is_file():
            for name, points in _read_reliability(csv_path).items():
                series.setdefault(row, {}).setdefault(name, []).extend(points)
    rows = [row for row in table if row in series]
    fig, axes = _panels(max(len(rows), 1))
    for ax, row in zip(axes.flat, rows):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        for name, style in (("model", {"ls": "--", "marker": "o", "ms": 3, "color": "C0"}),
                            ("temperature-scaled", {"ls": "-", "marker": "s", "ms": 3, "color": "C1"})):
            if series[row].get(name):
                ax.plot(*_pooled(series[row][name]), label=name, **style)
        e = table[row]
        ece = "n/a" if e.get("ece") is None else f"{e['ece']:.3f}"
        ax.set(title=f"{row}: ECE {ece} → {e['ece_ts']:.3f}", xlim=(0, 1), ylim=(0, 1),
               xlabel="confidence", ylabel="accuracy")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    if not rows:
        axes.flat[0].text(0.5, 0.5, NOT_EVALUATED, ha="center", va="center")
    fig.suptitle(f"reliability: {ECE_BINS} equal-width confidence bins; temperature fitted on the other half "
                 "of the test set", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def _robustness(root: Path, table: dict, runs: pd.DataFrame, path: Path) -> None:
    """Accuracy against severity for each row (mean over corruptions and the row's seeds);
    severity 0 is the row's accuracy on the clean test set."""
    by_row: dict[str, list[dict]] = {}
    for run_id, row in zip(runs["id"], runs["row"]):
        record = root / "reports/robustness" / f"{run_id}.json"
        if row in table and record.is_file() and _read_json(record).get("severity_accuracy"):
            by_row.setdefault(row, []).append(_read_json(record)["severity_accuracy"])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for row in [r for r in table if r in by_row]:
        severities = sorted(by_row[row][0], key=int)
        accuracy = [np.mean([r[s] for r in by_row[row]]) for s in severities]
        ax.plot([0, *map(int, severities)], [table[row]["accuracy"], *accuracy], marker="o", label=row)
    if not by_row:
        ax.text(0.5, 0.5, NOT_EVALUATED, ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="severity (0: the clean test set)", ylabel="accuracy, mean over corruptions",
           title="accuracy on the corrupted test set")
    ax.grid(alpha=0.3)
    if by_row:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def best_run(table: dict, runs: pd.DataFrame) -> str | None:
    """The first seed's run of the most accurate single-model row (the ensemble has no gallery)."""
    ran = {row: e["accuracy"] for row, e in table.items() if not e.get("not_run") and row != ENSEMBLE}
    if not ran:
        return None
    return str(runs.loc[runs["row"] == max(ran, key=ran.get), "id"].iloc[0])


def _confusion(root: Path, run_id: str, path: Path, classes: tuple[str, ...]) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    labels, predicted = _load_confusion(root / "plots/confusion" / f"{run_id}.csv", classes)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    ConfusionMatrixDisplay.from_predictions(labels, predicted, display_labels=classes,
                                            xticks_rotation=45, colorbar=False, ax=ax)
    ax.set_title(f"{run_id}: test confusion matrix")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def write_figures(root: Path, table: dict, runs: pd.DataFrame, out: Path, classes: tuple[str, ...]) -> None:
    """The comparison figures as PNGs under `out` (FIGURES), the best row's included."""
    _scatter(table, "parameters", "parameters (log)", "test accuracy against model size",
             out / "accuracy_vs_parameters.png")
    _scatter(table, "train_s", "train time, s (log)", "test accuracy against training time",
             out / "accuracy_vs_train_time.png")
    _class_heatmap(table, out / "class_accuracy.png")
    deep = runs.loc[~runs["row"].str.startswith("svm-") & (runs["row"] != ENSEMBLE), "id"]
    _learning_curves(root, list(deep), out / "learning_curves.png")
    _reliability(root, table, runs, out / "reliability.png")
    _robustness(root, table, runs, out / "robustness.png")
    best = best_run(table, runs)
    if best is not None:
        _confusion(root, best, out / "best_confusion.png", classes)
        with atomic_path(out / "best_mistakes.png") as tmp:
            shutil.copyfile(root / "plots/eval" / best / "mistakes.png", tmp)


# ---------------------------------------------------------------- the stage


def compare(plan: Plan, calibration_seed: int, root: Path = Path(".")) -> dict:
    """Write reports/results.json and .md, metrics/compare.json and plots/compare/; return
    the table (reports/results.json's content). `calibration_seed`: params.yaml's
    evaluate.calibration_seed, for the ensemble's temperature."""
    runs, missing = load_runs(root, plan)
    if runs.empty:
        raise UserError("no run that params.yaml defines has been evaluated at this scale: "
                        "run `dvc repro` first")
    # the params.yaml key that sets the test set's size, as the evaluate stage names it
    test_size_key = "quick_scale.test_size" if plan.quick else "data.name"
    ensemble = ensemble_runs(root, plan.ensemble, runs, plan.classes, calibration_seed, test_size_key)
    runs = pd.concat([runs, ensemble], ignore_index=True)
    table = records(summarise(runs, missing, plan), plan.classes)
    write_json(root / "reports/results.json", table)
    write_json(root / "metrics/compare.json", compact(table))
    write_text(root / "reports/results.md", results_markdown(table))
    write_figures(root, table, runs, root / "plots/compare", plan.classes)
    return table
