"""Training throughput: this engine against a seed-style loop, and each speed switch alone.

    python -m bench.train_speed                 # both tables, on this machine's best device
    python -m bench.train_speed --images 4096   # more timed images per row (steadier, slower)

Table 1 times the seed-style reference (bench/reference.py: PIL transforms, DataLoader, fp32,
batch 128) and this engine's defaults on the same model and device. Table 2 starts from the
engine in plain fp32 and turns on one switch at a time. Every row runs in a fresh process so
its peak host memory (RSS) is its own; rows train on real images (data/raw) from fresh weights.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch
import typer

from fashionbench.data import Split, load_raw
from fashionbench.models import build_model
from fashionbench.params import load_params
from fashionbench.train import (Runtime, make_optimizer, make_runtime, make_scheduler,
                                resolve_device, steps_per_epoch, to_device, train_one_epoch)

MODELS = ("cnn", "wrn-16-4")


def _setup(spec: dict):
    """Model, recipe, runtime and the training images for one row."""
    params = load_params(Path(spec["params"]))
    section = "cnn" if spec["model"] == "cnn" else "wrn"
    recipe = dataclasses.replace(params.recipe(section), batch_size=spec["batch"])
    arch = recipe.arch
    if section == "wrn":
        depth, widen = (int(v) for v in spec["model"].split("-")[1:])
        arch = dataclasses.replace(arch, depth=depth, widen=widen)
    torch.manual_seed(0)
    model = build_model(recipe.model, arch)
    if spec.get("precision") == "default":
        runtime = make_runtime(recipe)
    else:
        device = resolve_device(spec.get("device", "auto"))
        amp = torch.bfloat16 if spec.get("precision") == "bf16" else None
        runtime = Runtime(device, amp, spec.get("channels_last", False))
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train, _ = load_raw(Path("data/raw"))
    return model, recipe, runtime, train


def _train_flops_per_image(model, runtime: Runtime) -> float:
    """Forward+backward FLOPs of one image, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 1, 28, 28, device=runtime.device)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def run_row(spec: dict) -> dict:
    """Time one row in this process; returns images/s, FLOP rate and peak memory."""
    model, recipe, runtime, train = _setup(spec)
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    flops = _train_flops_per_image(model, runtime)
    n = spec["images"] * (8 if spec["model"] == "cnn" else 1)  # the CNN is ~70x cheaper
    if spec["loop"] == "reference":
        from bench.reference import reference_images_per_s

        model = model.to("cpu")
        keep = n + 4 * spec["batch"]  # the timed steps plus the warm-up ones
        ips = reference_images_per_s(model, train.images[:keep], train.labels[:keep],
                                     spec["batch"], steps=n // spec["batch"],
                                     augment=spec["model"] != "cnn")
    else:
        ips = _engine_images_per_s(model, recipe, runtime, train, n, spec.get("compile"))
    peak_device = torch.cuda.max_memory_allocated() / 2**20 if runtime.device.type == "cuda" else 0.0
    return {"images_per_s": ips, "gflop_per_s": ips * flops / 1e9,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_device_mib": peak_device, "device": runtime.describe(),
            "threads": torch.get_num_threads()}


def _engine_images_per_s(model, recipe, runtime: Runtime, train: Split, n: int,
                         compile_mode: str | None) -> float:
    images, labels = to_device(Split(train.images[:n], train.labels[:n]), runtime.device)
    # reduce-overhead captures the step's kernels once as CUDA graphs and replays them
    forward = torch.compile(model, mode=compile_mode) if compile_mode else model
    optimizer = make_optimizer(model, recipe, runtime.device)
    scheduler = make_scheduler(optimizer, recipe, steps_per_epoch(n, recipe.batch_size) * 2)
    gen = torch.Generator(device=runtime.device).manual_seed(0)
    warm = 2 * recipe.batch_size  # first steps pay for allocation, oneDNN plans and compilation
    args = dict(mean=0.2860, std=0.3530, runtime=runtime)
    train_one_epoch(forward, optimizer, scheduler, images[:warm], labels[:warm], recipe, gen, **args)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    return train_one_epoch(forward, optimizer, scheduler, images, labels, recipe, gen,
                           **args)["images_per_s"]


def _spawn(spec: dict) -> dict:
    result = subprocess.run([sys.executable, "-m", "bench.train_speed", "--row", json.dumps(spec)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _table(title: str, rows: list[tuple[str, dict, dict | None]]) -> None:
    print(f"\n{title}\n")
    print("| model | loop / switch | images/s | ratio | GFLOP/s | peak RSS MiB | peak device MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, result, base in rows:
        if "error" in result:
            print(f"| {label} | failed: {result['error']} | | | | | |")
            continue
        ratio = result["images_per_s"] / base["images_per_s"] if base and "error" not in base else 1.0
        print(f"| {label} | {result['images_per_s']:.0f} | {ratio:.2f} | {result['gflop_per_s']:.1f} "
              f"| {result['peak_rss_mib']:.0f} | {result['peak_device_mib']:.0f} |")


def main(images: int = typer.Option(512, help="timed training images per WRN row (x8 for the CNN)"),
         params: Path = typer.Option(Path("params.yaml"), help="recipes and architectures"),
         row: str = typer.Option("", help="internal: time one JSON-described row and print it")) -> None:
    """Print the engine-vs-reference table and the speed-switch table."""
    if row:
        print(json.dumps(run_row(json.loads(row))))
        return
    common = {"params": str(params), "images": images}
    first = _spawn({**common, "model": "cnn", "loop": "engine", "batch": 128, "precision": "default"})
    print(f"device: {first.get('device')}, host: {platform.processor() or platform.machine()}, "
          f"{first.get('threads')} threads; {images} timed images per WRN row, {8 * images} per CNN row")
    versus = []
    for model in MODELS:
        reference = _spawn({**common, "model": model, "loop": "reference", "batch": 128})
        engine = first if model == "cnn" else _spawn(
            {**common, "model": model, "loop": "engine", "batch": 128, "precision": "default"})
        versus += [(f"{model} | reference (seed-style)", reference, reference),
                   (f"{model} | engine (defaults)", engine, reference)]
    _table("Engine vs the seed-style reference loop (ratio: against the reference; same model, device, batch 128)", versus)

    switches = [("fp32, batch 128", {}), ("batch 256", {"batch": 256}), ("batch 512", {"batch": 512}),
                ("channels_last", {"channels_last": True}), ("bf16 autocast", {"precision": "bf16"}),
                ("torch.compile", {"compile": "default"}), ("1 thread", {"threads": 1})]
    if str(first.get("device", "")).startswith("cuda"):
        switches.append(("CUDA graphs (compile reduce-overhead)", {"compile": "reduce-overhead"}))
    rows = []
    for model in MODELS:
        base = None
        for label, change in switches:
            result = _spawn({**common, "model": model, "loop": "engine", "batch": 128,
                             "precision": "fp32", **change})
            base = base or result
            rows.append((f"{model} | {label}", result, base))
    _table("Each speed switch alone (ratio: against the fp32, batch 128 engine row of the same model)", rows)


if __name__ == "__main__":
    typer.run(main)
