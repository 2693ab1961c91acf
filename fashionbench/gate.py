"""The CI gate: compare two results tables (metrics/compare.json layout) row by row.

accuracy_drops() lists each row whose test accuracy fell by more than the tolerance (or
vanished); diff_table() prints what changed the way `dvc metrics diff` does. The quick run
(fashionbench.quick) applies them to its table against reports/quick-baseline.json. Between
two commits of main, `dvc metrics diff <rev>` compares the full-scale numbers themselves.
"""

from __future__ import annotations

TRACKED = ("accuracy", "macro_f1", "tta_accuracy")


def _value(entry: dict | None, key: str) -> float | None:
    if not entry or entry.get("not_run"):
        return None
    value = entry.get(key)
    return value if isinstance(value, (int, float)) else None


def accuracy_drops(old: dict, new: dict, tolerance: float) -> list[str]:
    """One line per row whose accuracy fell by more than `tolerance` or is now missing."""
    problems = []
    for row in old:
        before, after = _value(old[row], "accuracy"), _value(new.get(row), "accuracy")
        if before is None:
            continue  # nothing to drop from
        if after is None:
            problems.append(f"{row}: accuracy was {before:.4f} and is now missing")
        elif round(before - after, 9) > tolerance:  # 0.85 - 0.83 is 0.020000000000000018
            problems.append(f"{row}: accuracy {before:.4f} -> {after:.4f} ({after - before:+.4f})")
    return problems


def diff_table(old: dict, new: dict, old_name: str = "baseline", new_name: str = "quick run") -> str:
    """Rows Path/Metric/old/new/Change for every tracked metric, like `dvc metrics diff`."""
    lines = [("Row", "Metric", old_name, new_name, "Change")]
    for row in list(old) + [r for r in new if r not in old]:
        for key in TRACKED:
            before, after = _value(old.get(row), key), _value(new.get(row), key)
            if before is None and after is None:
                continue
            change = f"{after - before:+.4f}" if before is not None and after is not None else "-"
            lines.append((row, key, "-" if before is None else f"{before:.4f}",
                          "-" if after is None else f"{after:.4f}", change))
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                     for line in lines) + "\n"
