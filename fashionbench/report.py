"""The compare stage: one results table of exactly the runs params.yaml defines, an ensemble
row, figures, and the README's table (written by `python -m fashionbench.readme`).

Everything comes from what the runs recorded: metrics/train/<id>.json (recipe and
architecture in words, parameters, epochs, time, hardware, scale), metrics/eval/<id>.json
(plain, TTA and batch-statistics accuracy) and predictions/<id>.npz (per-class scores,
ensemble). A run params.yaml defines but nobody has run at this scale is a row that says so,
with the command that runs it; a file no current run names is never read.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fashionbench.dataset import CLASS_NAMES
from fashionbench.errors import UserError
from fashionbench.io import save_figure, write_json, write_text
from fashionbench.params import Plan

ENSEMBLE = "ensemble"
CURVES = ("train/loss", "val/loss", "train/acc", "val/acc")  # DVCLive names from training

# What the source reports give for each row (the last epoch where they say which), shown
# beside our numbers. The seed credits its SVC recipe as written (with a scaler: our
# rbf_scaled) with the 0.8999 that only the unscaled recipe reaches.
SEED_REPORTED = {
    "svm-rbf": "0.8999", "svm-rbf_scaled": "0.8999 (claimed)", "svm-hog_seed": "0.8940",
    "svm-hog": "0.8940 (seed's HOG row)", "cnn": "0.9320", "resnet7": "0.9300",
    "mlp": "0.851 (2nd report)", "wrn": "0.9573 (WRN-40-4)", "se_wrn": "0.9602 (SE-WRN-40-4)",
}

# How long a row nobody has run at full scale would take: seconds per epoch on the 2-core
# development CPU (AMD EPYC, fp32; ResNet-7 measured, the WRNs from their ~1 GMAC per image
# forward) and on the seed report's GPU (its 15 s/epoch for SE-WRN-40-4; None: not known);
# the rbf_scaled fit was timed at 54 min on one core.
NOT_RUN_EPOCH_S = {"resnet7": (480, None), "wrn": (1020, 15), "se_wrn": (1100, 15)}
NOT_RUN_ESTIMATE = {"svm-rbf_scaled": "a ~54 min libsvm fit on one core, plus ~10 min predict"}


@dataclass(frozen=True)
class RunResult:
    """One evaluated run (or one seed's ensemble) with what training recorded about it."""

    id: str
    row: str                  # deep row (cnn, ...), "svm-<recipe>" or "ensemble"
    seed: int | None
    accuracy: float
    macro_f1: float
    class_accuracy: dict[str, float]
    train: dict = field(default_factory=dict)   # metrics/train/<id>.json
    tta_accuracy: float | None = None
    batchstat_accuracy: float | None = None


# ---------------------------------------------------------------- gathering


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is unreadable ({err}): re-run the stage that writes it "
                        f"(`dvc repro -f` of its train or evaluate stage)") from None


def scores_from_predictions(path: Path) -> tuple[dict[str, float], float, float]:
    """(per-class accuracy, accuracy, macro F1) from a predictions/<id>.npz file."""
    return _scores(*_load_predictions(path))


def _load_predictions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predicted classes) of a predictions file; unreadable is a UserError naming it."""
    try:
        with np.load(path) as saved:
            return saved["labels"], saved["probs"].argmax(axis=1)
    except Exception as err:  # truncated or foreign file
        raise UserError(f"{path} is unreadable ({type(err).__name__}): re-run its evaluate stage "
                        f"(`dvc repro -f evaluate@<row>-<seed>` or `evaluate_svm@<recipe>`)") from None


def _scores(labels: np.ndarray, pred: np.ndarray) -> tuple[dict[str, float], float, float]:
    recall, f1 = [], []
    for c in range(len(CLASS_NAMES)):
        tp = float(np.sum((pred == c) & (labels == c)))
        actual, predicted = float(np.sum(labels == c)), float(np.sum(pred == c))
        recall.append(tp / actual if actual else 0.0)
        f1.append(2 * tp / (actual + predicted) if actual + predicted else 0.0)
    return dict(zip(CLASS_NAMES, recall)), float(np.mean(pred == labels)), float(np.mean(f1))


def load_runs(root: Path, plan: Plan) -> tuple[list[RunResult], list[str]]:
    """The runs `plan` defines that have been trained and evaluated at the plan's scale, and
    the ids of those that have not."""
    runs, missing = [], []
    for run_id, row, seed in plan.runs():
        ev_path, train_path = root / "metrics/eval" / f"{run_id}.json", root / "metrics/train" / f"{run_id}.json"
        predictions = root / "predictions" / f"{run_id}.npz"
        if not (ev_path.is_file() and train_path.is_file() and predictions.is_file()):
            missing.append(run_id)
            continue
        ev, train = _read_json(ev_path), _read_json(train_path)
        if "accuracy" not in ev or "macro_f1" not in ev:
            raise UserError(f"{ev_path} lacks accuracy or macro_f1: re-run its evaluate stage")
        if bool(train.get("quick")) != plan.quick:
            missing.append(run_id)  # a result of the other scale: not this table's
            continue
        class_accuracy, _, _ = scores_from_predictions(predictions)
        runs.append(RunResult(run_id, row, seed, ev["accuracy"], ev["macro_f1"], class_accuracy,
                              train, ev.get("tta_accuracy"), ev.get("batchstat_accuracy")))
    return runs, missing


def ensemble_runs(root: Path, members: tuple[str, ...], runs: list[RunResult]) -> list[RunResult]:
    """Per seed, the mean of the members' plain test probabilities (two or more members)."""
    out = []
    for seed in sorted({r.seed for r in runs if r.row in members}):
        parts = [r for r in runs if r.row in members and r.seed == seed]
        if len(parts) < 2:
            continue
        arrays = [np.load(root / "predictions" / f"{p.id}.npz") for p in parts]
        probs = np.mean([a["probs"] for a in arrays], axis=0)
        class_accuracy, accuracy, macro_f1 = _scores(arrays[0]["labels"], probs.argmax(axis=1))
        absent = [m for m in members if m not in {p.row for p in parts}]
        recipe = "mean plain probabilities of " + ", ".join(p.row for p in parts)
        if absent:
            recipe += f" ({', '.join(absent)}: not run)"
        train = {"recipe": recipe, "parameters": sum(p.train.get("parameters", 0) for p in parts),
                 "wall_time_s": sum(_train_s(p) or 0 for p in parts), "quick": parts[0].train.get("quick"),
                 "hardware": _join(p.train.get("hardware") for p in parts),
                 "device": _join(p.train.get("device") for p in parts)}
        out.append(RunResult(f"{ENSEMBLE}-seed{seed}", ENSEMBLE, seed, accuracy, macro_f1,
                             class_accuracy, train))
    return out


def _train_s(run: RunResult) -> float | None:
    return run.train.get("fit_time_s", run.train.get("wall_time_s"))


def _join(values) -> str | None:
    present = sorted({v for v in values if v})
    return ", ".join(present) or None


# ---------------------------------------------------------------- the table


def _mean_std(values: list[float]) -> tuple[float, float]:
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return round(float(np.mean(values)), 5), round(std, 5)


def _optional_mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else round(float(np.mean(values)), 5)


def _recipe(run: RunResult) -> str:
    train = run.train
    if run.row.startswith("svm-") or run.row == ENSEMBLE:
        return train.get("recipe", "-")
    return f"{train.get('architecture', run.row)}; {train.get('recipe', '-')}"


def summarise(runs: list[RunResult], missing: list[str], plan: Plan) -> dict:
    """metrics/compare.json: one entry per row, mean and sample std over its seeds; rows with
    no run at this scale carry the command that runs them."""
    table = {}
    for row in plan.rows() + [ENSEMBLE]:
        group = [r for r in runs if r.row == row]
        if not group:
            if row != ENSEMBLE:
                table[row] = _not_run(row, [m for m in missing if plan.row_of(m) == row], plan)
            continue
        first = group[0]
        accuracy, accuracy_std = _mean_std([r.accuracy for r in group])
        macro_f1, macro_f1_std = _mean_std([r.macro_f1 for r in group])
        times = [t for t in (_train_s(r) for r in group) if t is not None]
        table[row] = {
            "runs": len(group), "seeds": [r.seed for r in group if r.seed is not None],
            "not_run_ids": [m for m in missing if plan.row_of(m) == row],
            "parameters": first.train.get("parameters"), "recipe": _recipe(first),
            "accuracy": accuracy, "accuracy_std": accuracy_std,
            "macro_f1": macro_f1, "macro_f1_std": macro_f1_std,
            "tta_accuracy": _optional_mean([r.tta_accuracy for r in group]),
            "batchstat_accuracy": _optional_mean([r.batchstat_accuracy for r in group]),
            "epochs": first.train.get("epochs"), "train_size": first.train.get("train_size"),
            "train_s": round(float(np.mean(times)), 1) if times else None,
            "hardware": _hardware(first.train),
            "scale": "quick" if plan.quick else "full",
            "seed_reported": SEED_REPORTED.get(row, "-"),
            "class_accuracy": {c: round(float(np.mean([r.class_accuracy[c] for r in group])), 5)
                               for c in CLASS_NAMES},
        }
    return table


def _hardware(train: dict) -> str | None:
    hardware = train.get("hardware")
    if not hardware:
        return train.get("device")
    threads = train.get("threads")
    plural = "s" if threads != 1 else ""
    return f"{train.get('device', 'cpu')}: {hardware}" + (f", {threads} thread{plural}" if threads else "")


def _not_run(row: str, run_ids: list[str], plan: Plan) -> dict:
    stages = " ".join(f"evaluate@{r.replace('-seed', '-')}" if not row.startswith("svm-")
                      else f"evaluate_svm@{row[4:]}" for r in run_ids)
    estimate = NOT_RUN_ESTIMATE.get(row, "time not measured")
    if row in NOT_RUN_EPOCH_S and row in plan.epochs:
        cpu_s, gpu_s = NOT_RUN_EPOCH_S[row]
        epochs = plan.epochs[row]
        estimate = f"{epochs} epochs: ~{epochs * cpu_s / 3600:.1f} h on the 2-core CPU with both cores"
        if gpu_s is not None:
            estimate += f", ~{epochs * gpu_s / 3600:.1f} h on the seed's GPU"
    return {"runs": 0, "not_run": True, "command": f"dvc repro {stages}", "estimate": estimate,
            "scale": "quick" if plan.quick else "full", "seed_reported": SEED_REPORTED.get(row, "-")}


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


def results_table(table: dict) -> str:
    """The Markdown results table, a pure function of metrics/compare.json."""
    lines = ["| row | params | recipe | test accuracy | macro F1 | flip TTA | epochs | train time "
             "| trained on | scale | source report |", "|---|---:|---|---|---|---|---:|---:|---|---|---|"]
    for row, e in table.items():
        if e.get("not_run"):
            lines.append(f"| {row} | - | **not run at {e['scale']} scale**: `{e['command']}` "
                         f"({e['estimate']}) | - | - | - | - | - | - | {e['scale']} | {e['seed_reported']} |")
            continue
        params = f"{e['parameters']:,}" if e.get("parameters") else "-"
        tta = f"{e['tta_accuracy']:.4f}" if e.get("tta_accuracy") is not None else "-"
        epochs = e["epochs"] if e.get("epochs") else "-"
        lines.append(f"| {row} | {params} | {e['recipe']} | {_with_spread(e, 'accuracy')} | "
                     f"{_with_spread(e, 'macro_f1')} | {tta} | {epochs} | {_duration(e['train_s'])} | "
                     f"{e['hardware'] or '-'} | {e['scale']} | {e['seed_reported']} |")
    return "\n".join(lines) + "\n"


def class_accuracy_table(table: dict) -> str:
    """Per-class test accuracy (recall) of every row that ran, as Markdown."""
    lines = ["| row | " + " | ".join(CLASS_NAMES) + " |", "|---|" + "---:|" * len(CLASS_NAMES)]
    for row, e in table.items():
        if not e.get("not_run"):
            lines.append(f"| {row} | " + " | ".join(f"{e['class_accuracy'][c]:.3f}" for c in CLASS_NAMES) + " |")
    return "\n".join(lines) + "\n"


def batch_norm_table(table: dict) -> str:
    """Eval-mode (running statistics after precise-BN) against batch-statistics accuracy."""
    lines = ["| row | eval mode | batch statistics | difference |", "|---|---:|---:|---:|"]
    for row, e in table.items():
        if e.get("batchstat_accuracy") is not None:
            lines.append(f"| {row} | {e['accuracy']:.4f} | {e['batchstat_accuracy']:.4f} | "
                         f"{e['accuracy'] - e['batchstat_accuracy']:+.4f} |")
    return "\n".join(lines) + "\n"


def results_markdown(table: dict) -> str:
    """reports/results.md: the table, per-class accuracy, batch-norm check and figures."""
    figures = "\n".join(f"![{name}](../plots/compare/{name}.png)" for name in
                        ("accuracy_vs_parameters", "accuracy_vs_train_time", "class_accuracy",
                         "learning_curves"))
    return ("# Results\n\nTest accuracy on the official test images, final epoch, plain single "
            "view; flip TTA separately, for rows trained with flips only. Mean ± sample std where "
            "several seeds ran. Scale `quick` means the quick check (subsets, one epoch), never "
            "a result.\n\n"
            f"{results_table(table)}\n## Per-class accuracy\n\n{class_accuracy_table(table)}\n"
            "## Batch-norm statistics\n\nTest accuracy with the running statistics (after the "
            "precise-BN pass over training images) and with each test batch's own statistics; "
            f"equal within noise when the running statistics match the final weights.\n\n"
            f"{batch_norm_table(table)}\n## Figures\n\n{figures}\n")


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
    values = np.array([[table[r]["class_accuracy"][c] for c in CLASS_NAMES] for r in rows])
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 2))
    ax.imshow(values, cmap="viridis", vmin=min(0.5, values.min()), vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="black" if v > 0.85 else "white")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title("per-class test accuracy")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def read_curve(path: Path) -> tuple[list[float], list[float]]:
    """(steps, values) of a DVCLive .tsv (columns step, <name>, maybe timestamp)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [float(r["step"]) for r in rows], [float(r[path.stem]) for r in rows]


def _learning_curves(root: Path, run_ids: list[str], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, curve in zip(axes.flat, CURVES):
        for run_id in run_ids:
            tsv = root / "plots/train" / run_id / "plots/metrics" / f"{curve}.tsv"
            if tsv.is_file():
                steps, values = read_curve(tsv)
                ax.plot(steps, values, marker="o" if len(steps) < 3 else None, label=run_id)
        ax.set(title=curve, xlabel="epoch", ylabel=curve.rsplit("/", 1)[-1])
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_figure(fig, path, dpi=100)


def write_figures(root: Path, table: dict, runs: list[RunResult], out: Path) -> None:
    """The four comparison figures as PNGs under `out`."""
    _scatter(table, "parameters", "parameters (log)", "test accuracy against model size",
             out / "accuracy_vs_parameters.png")
    _scatter(table, "train_s", "train time, s (log)", "test accuracy against training time",
             out / "accuracy_vs_train_time.png")
    _class_heatmap(table, out / "class_accuracy.png")
    deep = [r.id for r in runs if not r.row.startswith("svm-") and r.row != ENSEMBLE]
    _learning_curves(root, deep, out / "learning_curves.png")


# ---------------------------------------------------------------- the stage


def compare(plan: Plan, root: Path = Path(".")) -> dict:
    """Write metrics/compare.json, reports/results.md and plots/compare/."""
    runs, missing = load_runs(root, plan)
    if not runs:
        raise UserError("no run that params.yaml defines has been evaluated at this scale: "
                        "run `dvc repro` first")
    runs += ensemble_runs(root, plan.ensemble, runs)
    table = summarise(runs, missing, plan)
    write_json(root / "metrics/compare.json", table)
    write_text(root / "reports/results.md", results_markdown(table))
    write_figures(root, table, runs, root / "plots/compare")
    return table
