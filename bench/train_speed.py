"""Training throughput: this engine against a seed-style loop and against the machine's
ceiling, and each speed switch alone (and the cost of AutoAugment).

    python -m bench.train_speed                 # the tables, on this machine's best device
    python -m bench.train_speed --images 4096   # more timed images per row (steadier, slower)

The ceiling comes first: the machine's dense matmul rate (fp32, and bf16 where native) and,
per model, the bare training step (random tensors resident on the device, no augmentation or
bookkeeping, the best of dtype x layout x batch). Table 1 times the seed-style reference
(bench/reference.py: PIL transforms, DataLoader, fp32, batch 128) and this engine's defaults
on the same model and device; table 2 starts from the engine in plain fp32 and turns on one
switch at a time. Every engine row shows its fraction of the bare step's images/s and its
FLOP rate against the matmul peak. Every row runs in a fresh process so its peak host memory
(RSS) is its own; rows train on the prepared training images (data/prepared) from fresh
weights. On CUDA every row times 16x more images, so that it runs long enough to measure.
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

from fashionbench.data import Split, load_prepared
from fashionbench.models import build_model
from fashionbench.params import load_params
from fashionbench.train import (Runtime, make_optimizer, make_runtime, make_scheduler,
                                resolve_device, steps_per_epoch, to_device, train_one_epoch)

MODELS = ("cnn", "wrn-16-4")
CUDA_MODELS = MODELS + ("wrn-40-4",)   # the full-recipe WRN on a GPU: its seconds per epoch
EPOCH_IMAGES = 60_000                  # one epoch of the full training set
CUDA_IMAGES = 16                       # on CUDA every row times this many times more images


def _setup(spec: dict):
    """Model, recipe, runtime and the training images for one row."""
    params = load_params(Path(spec["params"]))
    section = "cnn" if spec["model"] == "cnn" else "wrn"
    recipe = dataclasses.replace(params.recipe(section), batch_size=spec["batch"])
    if spec.get("autoaugment"):  # a cost, not a speed-up: the per-image policies
        recipe = dataclasses.replace(recipe, augment=dataclasses.replace(
            recipe.augment, autoaugment=spec["autoaugment"]))
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
    return model, recipe, runtime, load_prepared(Path("data/prepared")).train


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
    ips = loop_images_per_s(spec, model, recipe, runtime, train)
    peak_device = torch.cuda.max_memory_allocated() / 2**20 if runtime.device.type == "cuda" else 0.0
    return {"images_per_s": ips, "gflop_per_s": ips * flops / 1e9,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_device_mib": peak_device, "device": runtime.describe(),
            "threads": torch.get_num_threads()}


def loop_images_per_s(spec: dict, model, recipe, runtime: Runtime, train: Split) -> float:
    """Train `model` with the row's loop (the seed-style "reference" or the "engine") on its
    timed images; its images/s."""
    n = _timed_images(spec, runtime.device)
    if spec["loop"] == "engine":
        return _engine_images_per_s(model, recipe, runtime, train, n, spec.get("compile"))
    from bench.reference import reference_images_per_s

    keep = n + 4 * spec["batch"]  # the timed steps plus the warm-up ones
    return reference_images_per_s(model, train.images[:keep], train.labels[:keep], spec["batch"],
                                  steps=n // spec["batch"], augment=spec["model"] != "cnn",
                                  device=runtime.device)


def _timed_images(spec: dict, device: torch.device) -> int:
    """Images timed in one row: the CNN is ~70x cheaper than a WRN, a GPU ~100x faster."""
    return spec["images"] * (8 if spec["model"] == "cnn" else 1) * (CUDA_IMAGES if device.type == "cuda" else 1)


def matmul_size(device: torch.device) -> int:
    """Square matrices large enough to be compute-bound on this kind of device."""
    return 8192 if device.type == "cuda" else 2048


def matmul_gflop_per_s(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """The machine's dense matmul rate at this thread count: the peak a training step can
    approach."""
    import time

    n = matmul_size(device)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    torch.matmul(a, b)  # warm-up: library plans, clocks
    _sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        count += 1
        _sync(device)
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_step_images_per_s(model, device: torch.device, batch: int, bf16: bool, channels_last: bool,
                           steps: int) -> float:
    """Forward, loss, backward and optimiser step on random tensors already on the device: no
    data pipeline, augmentation or bookkeeping. What the engine's img/s is measured against."""
    import time

    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x = torch.randn(batch, 1, 28, 28, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    y = torch.randint(0, 10, (batch,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


def run_ceiling(spec: dict) -> dict:
    """The best bare training step over dtype, layout and batch, for one model."""
    from fashionbench.train import native_bf16

    model, _, runtime, _ = _setup({**spec, "precision": "fp32", "batch": 128})
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    flops = _train_flops_per_image(model, runtime)
    n = _timed_images(spec, runtime.device)
    best: dict = {"images_per_s": 0.0}
    for bf16 in (False, True) if native_bf16(runtime.device) else (False,):
        for channels_last in (False, True):
            for batch in (128, 256):
                ips = bare_step_images_per_s(model, runtime.device, batch, bf16, channels_last,
                                             steps=max(2, n // batch))
                if ips > best["images_per_s"]:
                    best = {"images_per_s": ips, "config": f"{'bf16' if bf16 else 'fp32'}, "
                            f"{'channels_last' if channels_last else 'NCHW'}, batch {batch}"}
    return best | {"gflop_per_s": best["images_per_s"] * flops / 1e9, "peak_rss_mib": 0.0,
                   "peak_device_mib": 0.0, "device": runtime.describe(), "threads": torch.get_num_threads()}


def run_matmul(spec: dict) -> dict:
    from fashionbench.train import native_bf16

    device = resolve_device(spec.get("device", "auto"))
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    dtypes = (torch.float32, torch.bfloat16) if native_bf16(device) else (torch.float32,)
    return {"size": matmul_size(device), "device": str(device),
            "gflop_per_s": {str(d).removeprefix("torch."): matmul_gflop_per_s(device, d) for d in dtypes}}


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


def _fraction(value: float, ceiling: float | None) -> str:
    return f"{value / ceiling:.0%}" if ceiling else "-"


def _table(title: str, rows, bare: dict[str, float], peak: float | None) -> None:
    """Print each (label, result, base) row as soon as it is timed, so a run cut short keeps
    the rows it finished."""
    print(f"\n{title}\n")
    print("| model | loop / switch | images/s | s per epoch | ratio | of bare step | GFLOP/s "
          "| of matmul peak | peak RSS MiB | peak device MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for label, result, base in rows:
        if "error" in result:
            print(f"| {label} | failed: {result['error']} | | | | | | | |", flush=True)
            continue
        ratio = result["images_per_s"] / base["images_per_s"] if base and "error" not in base else 1.0
        model = label.split(" |")[0]
        print(f"| {label} | {result['images_per_s']:.0f} | {EPOCH_IMAGES / result['images_per_s']:.1f} "
              f"| {ratio:.2f} "
              f"| {_fraction(result['images_per_s'], bare.get(model))} | {result['gflop_per_s']:.1f} "
              f"| {_fraction(result['gflop_per_s'], peak)} | {result['peak_rss_mib']:.0f} "
              f"| {result['peak_device_mib']:.0f} |", flush=True)


def _peak(common: dict) -> float | None:
    """The best dense matmul rate (GFLOP/s), printed."""
    matmul = _spawn({**common, "kind": "matmul"})
    rates = matmul.get("gflop_per_s", {})
    print("\n" + ", ".join(f"matmul {dtype}: {rate:.1f} GFLOP/s" for dtype, rate in rates.items()), flush=True)
    return max(rates.values()) if rates else None


def _ceiling(common: dict) -> tuple[dict[str, float], float | None]:
    """Print the matmul rates and each model's bare step; return (bare img/s per model, peak)."""
    matmul = _spawn({**common, "kind": "matmul"})
    print("\nThe ceiling: dense matmul rate (GFLOP/s, same threads) and the bare training step "
          "(random tensors resident, no augmentation or bookkeeping; best of fp32/bf16 where "
          "native, NCHW/channels_last, batch 128/256)\n")
    models = CUDA_MODELS if "cuda" in str(matmul.get("device", "")) else MODELS
    print("| model | row | images/s | GFLOP/s | best configuration |")
    print("|---|---|---:|---:|---|")
    rates = matmul.get("gflop_per_s", {})
    for dtype, rate in rates.items():
        print(f"| - | matmul {dtype} | - | {rate:.1f} | square {matmul['size']} |")
    bare = {}
    for model in models:
        result = _spawn({**common, "model": model, "kind": "ceiling"})
        if "error" in result:
            print(f"| {model} | bare step | failed: {result['error']} | | |")
            continue
        bare[model] = result["images_per_s"]
        print(f"| {model} | bare step | {result['images_per_s']:.0f} | {result['gflop_per_s']:.1f} "
              f"| {result['config']} |")
    return bare, max(rates.values()) if rates else None


def _versus_rows(common: dict, models: tuple[str, ...], first: dict):
    for model in models:
        reference = _spawn({**common, "model": model, "loop": "reference", "batch": 128})
        yield f"{model} | reference (seed-style)", reference, reference
        engine = first if model == "cnn" else _spawn(
            {**common, "model": model, "loop": "engine", "batch": 128, "precision": "default"})
        yield f"{model} | engine (defaults)", engine, reference


def _switches(cuda: bool) -> list[tuple[str, dict]]:
    """Each switch alone from the plain fp32 engine; on CUDA also all of them together."""
    switches = [("fp32, batch 128", {}), ("batch 256", {"batch": 256}), ("batch 512", {"batch": 512}),
                ("channels_last", {"channels_last": True}), ("bf16 autocast", {"precision": "bf16"}),
                ("torch.compile", {"compile": "default"}),
                ("+ AutoAugment (cifar10, per image)", {"autoaugment": "cifar10"})]
    if not cuda:
        return switches + [("1 thread", {"threads": 1})]
    return switches + [
        ("CUDA graphs (compile reduce-overhead)", {"compile": "reduce-overhead"}),
        ("bf16 + channels_last + batch 512 + CUDA graphs",
         {"precision": "bf16", "channels_last": True, "batch": 512, "compile": "reduce-overhead"})]


def _switch_rows(common: dict, models: tuple[str, ...], cuda: bool):
    for model in models:
        base = None
        for label, change in _switches(cuda):
            result = _spawn({**common, "model": model, "loop": "engine", "batch": 128,
                             "precision": "fp32", **change})
            base = base or result
            yield f"{model} | {label}", result, base


def main(images: int = typer.Option(512, help="timed training images per WRN row (x8 for the CNN)"),
         params: Path = typer.Option(Path("params.yaml"), help="recipes and architectures"),
         only_switches: bool = typer.Option(False, "--only-switches",
                                            help="the matmul rate and the switch table only"),
         row: str = typer.Option("", help="internal: time one JSON-described row and print it")) -> None:
    """Print the engine-vs-reference table and the speed-switch table."""
    if row:
        spec = json.loads(row)
        runner = {"matmul": run_matmul, "ceiling": run_ceiling}.get(spec.get("kind", ""), run_row)
        print(json.dumps(runner(spec)))
        return
    common = {"params": str(params), "images": images}
    first = _spawn({**common, "model": "cnn", "loop": "engine", "batch": 128, "precision": "default"})
    cuda = str(first.get("device", "")).startswith("cuda")
    device = torch.device("cuda" if cuda else "cpu")
    print(f"device: {first.get('device')}, host: {platform.processor() or platform.machine()}, "
          f"{first.get('threads')} threads; {_timed_images(common | {'model': 'wrn'}, device)} timed "
          f"images per WRN row, {_timed_images(common | {'model': 'cnn'}, device)} per CNN row")
    models = CUDA_MODELS if cuda else MODELS
    if only_switches:
        bare, peak = {}, _peak(common)
    else:
        bare, peak = _ceiling(common)
        _table("Engine vs the seed-style reference loop (ratio: against the reference; same model, "
               "device, batch 128)", _versus_rows(common, models, first), bare, peak)
    # the full-recipe WRN first on a GPU: its seconds per epoch are the number that matters there
    _table("Each speed switch alone (ratio: against the fp32, batch 128 engine row of the same model)",
           _switch_rows(common, models[::-1] if cuda else models, cuda), bare, peak)


if __name__ == "__main__":
    typer.run(main)
