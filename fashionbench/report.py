"""The compare stage: one results table across every evaluated run, an ensemble row, figures,
and the README's results table regenerated from metrics/compare.json."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fashionbench.classical import describe
from fashionbench.data import CLASS_NAMES
from fashionbench.errors import UserError
from fashionbench.evaluate import classification_metrics
from fashionbench.params import DEEP_MODELS, Params

ENSEMBLE = "ensemble"
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"
CURVES = ("train/loss", "val/loss", "train/acc", "val/acc")  # DVCLive names from training


@dataclass(frozen=True)
class RunResult:
    """One evaluated run (or one seed's ensemble) with what training recorded about it."""

    id: str
    row: str              # table row: a deep model (cnn, ...), "svm-<variant>" or "ensemble"
    seed: int | None
    accuracy: float
    macro_f1: float
    class_accuracy: dict[str, float]
    parameters: int | None = None
    train_s: float | None = None
    device: str | None = None
    quick: bool | None = None
    epochs: int | None = None
    tta: bool = False
    members: tuple[str, ...] = ()  # an ensemble's models


# ---------------------------------------------------------------- gathering


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _class_accuracy(metrics: dict) -> dict[str, float]:
    # Per-class accuracy on a test set is the class's recall.
    return {name: metrics["per_class"][name]["recall"] for name in CLASS_NAMES}


def load_runs(root: Path) -> list[RunResult]:
    """Every run under metrics/eval/, joined with its metrics/train/ record when present."""
    runs = []
    for path in sorted((root / "metrics/eval").glob("*.json")):
        ev, train = _read_json(path), _read_json(root / "metrics/train" / path.name)
        is_svm = ev["model"] == "svm"
        train_s = train.get("fit_time_s") if is_svm else train.get("wall_time_s")
        runs.append(RunResult(
            id=ev["id"], row=ev["id"] if is_svm else ev["model"], seed=ev.get("seed"),
            accuracy=ev["accuracy"], macro_f1=ev["macro_f1"], class_accuracy=_class_accuracy(ev),
            parameters=train.get("parameters"), train_s=train_s,
            device=train.get("device", "cpu" if is_svm else None), quick=train.get("quick"),
            epochs=train.get("epochs"), tta=bool(ev.get("tta", False))))
    return runs


def ensemble_runs(root: Path, members: tuple[str, ...], runs: list[RunResult]) -> list[RunResult]:
    """Per seed, the mean of the members' test probabilities (seeds with two or more members)."""
    by_id = {r.id: r for r in runs}
    seeds = sorted({r.seed for r in runs if r.row in members and r.seed is not None})
    out = []
    for seed in seeds:
        ids = [f"{m}-seed{seed}" for m in members
               if f"{m}-seed{seed}" in by_id and (root / "predictions" / f"{m}-seed{seed}.npz").is_file()]
        if len(ids) < 2:
            continue
        arrays = [np.load(root / "predictions" / f"{i}.npz") for i in ids]
        probs = np.mean([a["probs"] for a in arrays], axis=0)
        labels = arrays[0]["labels"]
        metrics = classification_metrics(labels, probs.argmax(axis=1), probs)
        parts = [by_id[i] for i in ids]
        out.append(RunResult(
            id=f"{ENSEMBLE}-seed{seed}", row=ENSEMBLE, seed=seed, accuracy=metrics["accuracy"],
            macro_f1=metrics["macro_f1"], class_accuracy=_class_accuracy(metrics),
            parameters=_total([p.parameters for p in parts]), train_s=_total([p.train_s for p in parts]),
            device=_join(p.device for p in parts), quick=_any_quick(p.quick for p in parts),
            tta=all(p.tta for p in parts), members=tuple(p.row for p in parts)))
    return out


def _total(values: list) -> float | None:
    return None if any(v is None for v in values) else sum(values)


def _join(values) -> str | None:
    present = sorted({v for v in values if v})
    return ", ".join(present) or None


def _any_quick(values) -> bool | None:
    values = list(values)
    return None if all(v is None for v in values) else any(bool(v) for v in values)


# ---------------------------------------------------------------- recipes in words


def _augment_words(aug) -> str:
    words = [f"crop pad {aug.crop_pad}" if aug.crop_pad else "",
             f"translate {aug.translate:g}" if aug.translate else "",
             f"hflip {aug.hflip:g}" if aug.hflip else "",
             f"jitter {aug.jitter:g} p {aug.jitter_p:g}" if aug.jitter and aug.jitter_p else "",
             f"erase p {aug.erase_p:g}" if aug.erase_p else "",
             f"cutout {aug.cutout}" if aug.cutout else "",
             f"mixup {aug.mixup:g}" if aug.mixup else "",
             f"cutmix {aug.cutmix:g}" if aug.cutmix else ""]
    return ", ".join(w for w in words if w) or "no augmentation"


def _architecture(params: Params, name: str) -> str:
    arch = params.recipe(name).arch
    if name == "cnn":
        return f"2-conv CNN, dropout {arch.dropout:g}"
    if name == "resnet7":
        return f"ResNet-7, width {arch.width}"
    if name == "mlp":
        return "MLP " + "-".join(map(str, (784, *arch.hidden, 10)))
    shape = params.model
    words = f"{'SE-' if arch.se_reduction else ''}WRN-{shape.depth}-{shape.widen} {arch.block}-act"
    if shape.dropout:
        words += f", dropout {shape.dropout:g}"
    if arch.drop_path:
        words += f", drop-path {arch.drop_path:g} ({arch.drop_path_mode})"
    return words


def recipe_summary(params: Params, run: RunResult) -> str:
    """A one-line description of how a row was produced: features/architecture, training, TTA."""
    row = run.row
    if row == ENSEMBLE:
        words = "mean probabilities of " + ", ".join(run.members)
    elif row.startswith("svm-"):
        words = describe(params.svm[row[4:]])
    else:
        recipe = params.recipe(row)
        smoothing = f", LS {recipe.label_smoothing:g}" if recipe.label_smoothing else ""
        words = (f"{_architecture(params, row)}; {recipe.optimizer} {recipe.schedule}{smoothing}; "
                 f"{_augment_words(recipe.augment)}; {_plural(run.epochs or recipe.epochs, 'epoch')}")
    return words + ("; flip TTA" if run.tta else "")


# ---------------------------------------------------------------- the table


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _row_order(params: Params, rows: set[str]) -> list[str]:
    order = [f"svm-{v}" for v in params.svm] + list(DEEP_MODELS) + [ENSEMBLE]
    return [r for r in order if r in rows] + sorted(rows - set(order))


def _mean_std(values: list[float]) -> tuple[float, float]:
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return round(float(np.mean(values)), 5), round(std, 5)


# What the seed report gives for each row (last epoch where it says which), shown beside our
# numbers so a reader sees what is reproduced. The report credits its SVC recipe as written
# (with a scaler, our rbf_scaled) with the 0.8999 that only the unscaled recipe reaches.
SEED_REPORTED = {
    "svm-rbf": "0.8999", "svm-rbf_scaled": "0.8999 (claimed)", "svm-hog": "0.8940",
    "cnn": "0.9320", "resnet7": "0.9300", "mlp": "0.851 (2nd report)",
    "wrn": "0.9573 (WRN-40-4)", "se_wrn": "0.9602 (SE-WRN-40-4)",
}


def summarise(runs: list[RunResult], params: Params) -> dict:
    """metrics/compare.json: one entry per row, mean and sample std over its seeds."""
    table = {}
    for row in _row_order(params, {r.row for r in runs}):
        group = [r for r in runs if r.row == row]
        first = group[0]
        accuracy, accuracy_std = _mean_std([r.accuracy for r in group])
        macro_f1, macro_f1_std = _mean_std([r.macro_f1 for r in group])
        times = [r.train_s for r in group if r.train_s is not None]
        table[row] = {
            "runs": len(group),
            "seeds": ", ".join(str(r.seed) for r in group if r.seed is not None),
            "parameters": first.parameters,
            "recipe": recipe_summary(params, first),
            "accuracy": accuracy, "accuracy_std": accuracy_std,
            "macro_f1": macro_f1, "macro_f1_std": macro_f1_std,
            "train_s": round(float(np.mean(times)), 1) if times else None,
            "device": _join(r.device for r in group),
            "scale": _scale({r.quick for r in group}),
            "seed_reported": SEED_REPORTED.get(row, "-"),
            "class_accuracy": {c: round(float(np.mean([r.class_accuracy[c] for r in group])), 5)
                               for c in CLASS_NAMES},
        }
    return table


def _scale(quick_flags: set[bool | None]) -> str:
    flags = quick_flags - {None}
    if len(flags) != 1:
        return "mixed" if flags else "unknown"
    return "quick" if flags.pop() else "full"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _with_spread(entry: dict, key: str) -> str:
    text = f"{entry[key]:.4f}"
    if entry["runs"] > 1:
        text += f" ± {entry[key + '_std']:.4f} ({_plural(entry['runs'], 'seed')})"
    return text


def results_table(table: dict) -> str:
    """The Markdown results table, a pure function of metrics/compare.json."""
    lines = ["| model | params | recipe | test accuracy | macro F1 | train time | device | scale "
             "| seed report |", "|---|---:|---|---|---|---:|---|---|---|"]
    for row, e in table.items():
        params = f"{e['parameters']:,}" if e["parameters"] is not None else "-"
        lines.append(f"| {row} | {params} | {e['recipe']} | {_with_spread(e, 'accuracy')} | "
                     f"{_with_spread(e, 'macro_f1')} | {_duration(e['train_s'])} | "
                     f"{e['device'] or '-'} | {e['scale']} | {e['seed_reported']} |")
    return "\n".join(lines) + "\n"


def class_accuracy_table(table: dict) -> str:
    """Per-class test accuracy (recall) of every row, as Markdown."""
    lines = ["| model | " + " | ".join(CLASS_NAMES) + " |", "|---|" + "---:|" * len(CLASS_NAMES)]
    for row, e in table.items():
        lines.append(f"| {row} | " + " | ".join(f"{e['class_accuracy'][c]:.3f}" for c in CLASS_NAMES) + " |")
    return "\n".join(lines) + "\n"


def readme_block(table: dict) -> str:
    """What the README holds between its results markers."""
    return (f"{README_START}\n{results_table(table)}\n"
            "Generated by `dvc repro compare` from `metrics/compare.json`; per-class accuracy and "
            f"figures in `reports/results.md` and `plots/compare/`.\n{README_END}")


def update_readme(readme: Path, table: dict) -> None:
    """Rewrite the README's results between the markers (adding a Results section if absent)."""
    text = readme.read_text() if readme.is_file() else "# fashionbench\n"
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        text = text.rstrip("\n") + f"\n\n## Results\n\n{README_START}\n{README_END}\n"
        start, end = text.find(README_START), text.find(README_END)
    readme.write_text(text[:start] + readme_block(table) + text[end + len(README_END):])


def readme_table(readme: Path) -> str | None:
    """The block between the README's results markers, markers included (None if absent)."""
    text = readme.read_text() if readme.is_file() else ""
    start, end = text.find(README_START), text.find(README_END)
    return text[start:end + len(README_END)] if 0 <= start < end else None


def results_markdown(table: dict) -> str:
    """reports/results.md: the table, per-class accuracy and the figures."""
    figures = "\n".join(f"![{name}](../plots/compare/{name}.png)" for name in
                        ("accuracy_vs_parameters", "accuracy_vs_train_time", "class_accuracy",
                         "learning_curves"))
    return ("# Results\n\nTest accuracy on the official 10,000 test images, final epoch; "
            "mean ± sample std where several seeds ran. Scale `quick` means the quick run "
            "(subset, few epochs), not the full recipe.\n\n"
            f"{results_table(table)}\n## Per-class accuracy\n\n{class_accuracy_table(table)}\n"
            f"## Figures\n\n{figures}\n")


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
        if e[key] is None:
            continue
        ax.errorbar(e[key], e["accuracy"], yerr=e["accuracy_std"] or None, fmt="o", capsize=3)
        ax.annotate(row, (e[key], e["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xscale="log", xlabel=xlabel, ylabel="test accuracy", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _class_heatmap(table: dict, path: Path) -> None:
    plt = _pyplot()
    rows = list(table)
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_curve(path: Path) -> tuple[list[float], list[float]]:
    """(steps, values) of a DVCLive .tsv (columns step, <name>, maybe timestamp)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        rows = list(reader)
    name = path.stem
    return [float(r["step"]) for r in rows], [float(r[name]) for r in rows]


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
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_figures(root: Path, table: dict, runs: list[RunResult], out: Path) -> None:
    """The four comparison figures as PNGs under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    _scatter(table, "parameters", "parameters (log)", "test accuracy against model size",
             out / "accuracy_vs_parameters.png")
    _scatter(table, "train_s", "train time, s (log)", "test accuracy against training time",
             out / "accuracy_vs_train_time.png")
    _class_heatmap(table, out / "class_accuracy.png")
    deep = [r.id for r in runs if r.row in DEEP_MODELS]
    _learning_curves(root, deep, out / "learning_curves.png")


# ---------------------------------------------------------------- the stage


def compare(params: Params, root: Path = Path(".")) -> dict:
    """Write metrics/compare.json, reports/results.md, plots/compare/ and the README table."""
    runs = load_runs(root)
    if not runs:
        raise UserError("metrics/eval/ holds no evaluated run: run `dvc repro evaluate` first")
    runs += ensemble_runs(root, params.compare.ensemble, runs)
    table = summarise(runs, params)
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics/compare.json").write_text(json.dumps(table, indent=2) + "\n")
    (root / "reports").mkdir(exist_ok=True)
    (root / "reports/results.md").write_text(results_markdown(table))
    write_figures(root, table, runs, root / "plots/compare")
    update_readme(root / "README.md", table)
    return table
