"""Where a training epoch's time goes on the CPU: torch.profiler over the seed-style loop and
this engine's epoch on the same model, the top costs of each by self time.

    python -m bench.op_profile                        # the CNN, 4,096 timed images per loop
    python -m bench.op_profile --model wrn-16-4 --images 256 --top 8

Each loop runs in this process as bench/train_speed.py runs it (same model setup, params.yaml's
recipe, the prepared training images, its warm-up steps included in the profile). A row is one
profiled event summed over the loop, by its self time (nested events excluded): a torch
operator, or an annotated region such as the DataLoader's `__next__`, whose self time is the
Python around the operators inside it (PIL transforms, collation). "outside any profiled event"
is the rest of the wall time. CPU only: on a GPU the kernels run asynchronously to these times.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
import typer
from torch.profiler import ProfilerActivity, profile

from bench.train_speed import _setup, loop_images_per_s

OUTSIDE = "outside any profiled event"


def profile_rows(run: Callable[[], object]) -> tuple[float, list[tuple[str, float, int]]]:
    """Profile `run()`; its wall seconds and (operator, self seconds, calls) rows, largest
    first, with the time no operator ran as one more row."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    rows = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
    inside = sum(seconds for _, seconds, _ in rows)
    # events on one thread nest, so their self times add up to at most the wall time
    assert inside <= wall * 1.01, f"profiled self time {inside:.3f} s exceeds the wall time {wall:.3f} s"
    rows.append((OUTSIDE, max(0.0, wall - inside), 0))
    return wall, sorted(rows, key=lambda row: -row[1])


def profile_loop(loop: str, model: str, images: int, params: Path) -> tuple[float, list[tuple[str, float, int]]]:
    """Profile the seed-style loop ("reference") or the engine's epoch ("engine") on `model`."""
    spec = {"params": str(params), "model": model, "loop": loop, "batch": 128, "images": images,
            "precision": "fp32", "device": "cpu", "channels_last": True}
    net, recipe, runtime, train = _setup(spec)
    return profile_rows(lambda: loop_images_per_s(spec, net, recipe, runtime, train))


def markdown(loop: str, wall: float, rows: list[tuple[str, float, int]], top: int) -> str:
    lines = [f"**{loop}**: {wall:.2f} s profiled (warm-up included)", "",
             "| cost | self s | of wall | calls |", "|---|---:|---:|---:|"]
    for name, seconds, calls in rows[:top]:
        lines.append(f"| `{name}` | {seconds:.3f} | {seconds / wall:.0%} | {calls or '-'} |")
    return "\n".join(lines) + "\n"


def main(model: str = typer.Option("cnn", help="cnn or wrn-<depth>-<widen>"),
         images: int = typer.Option(512, help="timed training images (x8 for the CNN)"),
         top: int = typer.Option(5, help="rows per loop"),
         params: Path = typer.Option(Path("params.yaml"), help="recipes and architectures")) -> None:
    """Print the top costs of the seed-style loop and of the engine, as markdown."""
    torch.manual_seed(0)
    typer.echo(f"device: cpu, {torch.get_num_threads()} threads, fp32; model {model}\n")
    for loop in ("reference", "engine"):
        wall, rows = profile_loop(loop, model, images, params)
        typer.echo(markdown(loop, wall, rows, top))


if __name__ == "__main__":
    typer.run(main)
