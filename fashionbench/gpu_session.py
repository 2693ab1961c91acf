"""Make a lent GPU's minutes count: plan training runs to a budget, train them side by side on
one card, evaluate them there, bring back what the stages write, and place it here verified.

    python -m fashionbench.gpu_session plan resnet9 resnet18 resnet34 --minutes 9    # here: what fits
    python -m fashionbench.gpu_session run resnet9 resnet18 resnet34 --minutes 9 --out $OUT/session
    python -m fashionbench.gpu_session place session                                 # here; then `dvc commit`

`plan` reads each row's epochs from params.yaml (or `--epochs row=N`, the published recipe
where params.yaml holds a shortened one) and its seconds per epoch on the card from
bench/gpu-epoch-seconds.json, packs the runs into `--parallel` processes side by side (each
slowed by `--slowdown` per extra process: a 28x28 step is launch-bound, so K processes each
keep most of their speed), keeps a row's recipe where it fits and shortens a row that does not
(its epochs that fit, less `--margin`, the schedule stretched over them), and prints the table.
It refuses, before any training, an unknown row, an unmeasured one, more than 9 minutes (a
device call lasts at most 10), runs that cannot fit at `--min-epochs`, and outputs that more
than `--transfers` transfers cannot carry.

`run` executes the plan: each run is `python -m fashionbench.runner train` (so it stops at a
checkpoint when the budget ends, and a second `run` with the same rows resumes), then
`python -m stages.evaluate`, each in its own folder with the run's params.yaml; then it lays out
everything that must come back in `--out` within a transfer's limits (8 files, 16 MiB each, 64
MiB in all): the small files in one tar, each model compressed (as bf16 where fp32 does not
fit: its large tensors rounded before evaluation, so the placed model is the evaluated one),
files split into parts, a manifest of every file (size, SHA-256, run, seed, session). Outputs
beyond one transfer wait in the work folder for `send`.

`place` checks every part against the manifest, the models, params.yaml (each run's recipe and
seed), data/prepared and the training code against what the session used, and only then puts
the files where their stages write them and prints the `dvc commit` to record them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import typer

from fashionbench import runner
from fashionbench.cli import user_errors
from fashionbench.data import PREPARED_ARRAYS, PREPARED_STATS
from fashionbench.errors import UserError
from fashionbench.io import atomic_files, atomic_path, sha256_file, write_json
from fashionbench.params import PARAMS_FILE, Params, evaluate_stage, params_from_dict, read_yaml

MAX_MINUTES = 9.0    # a device call lasts at most 10 minutes: one is left for its start and transfers
TABLE = Path("bench/gpu-epoch-seconds.json")
GRAPH_GAIN = 2.2     # eager / CUDA-graph seconds per WRN-40-4 epoch on an H200 (2.13x and 2.20x measured)
FP32_ZLIB = 0.95     # zlib's share of fp32 weights (0.93 measured on a trained MLP)
BF16_ZLIB = 0.75     # zlib's share of bf16 weights split into byte planes (0.70-0.71 measured)
TRANSFER_MARGIN = 0.95  # a plan fills transfers to this share: the records are an estimate
ROUNDED_MIN = 1024   # float tensors of at least this many values travel as bf16; smaller ones exactly
MIB = 2**20
MANIFEST = "manifest.json"
RECORDS = "records.tar.gz"
MODEL = ".model.fbz"  # <run>.model.fbz: a model.pt, compressed (its bf16-rounded tensors halved)
PART = ".part"        # <file>.part000, ...: pieces of a file over the per-file limit

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


# ---------------------------------------------------------------- requests and speeds


@dataclass(frozen=True)
class Limits:
    """What one device call can bring back."""

    files: int = 8
    file_mib: float = 16.0
    total_mib: float = 64.0

    @property
    def file_bytes(self) -> int:
        return int(self.file_mib * MIB)

    @property
    def total_bytes(self) -> int:
        return int(self.total_mib * MIB)


@dataclass(frozen=True)
class Speed:
    seconds: float   # per epoch of the row's recipe, one process alone on the card
    source: str


@dataclass(frozen=True)
class Request:
    """What `plan` and `run` were asked for."""

    rows: tuple[str, ...]
    seeds: tuple[int, ...] | None     # None: each row's seeds in params.yaml
    minutes: float
    parallel: int
    card: str
    slowdown: float                   # each extra process side by side costs this share of speed
    margin: float
    min_epochs: int
    epochs: dict[str, int]            # target epochs per row, where params.yaml holds fewer
    stated: dict[str, Speed]          # --assume, or timed here (--measure)
    startup_s: float
    compile_s: float
    eval_s: float
    pack_s: float
    check_compile: str                # a row for the compiled-vs-eager pair, or ""
    check_epochs: int
    weights: str                      # auto | fp32 | bf16
    transfers: int
    limits: Limits
    records_mib: float


def load_table(path: Path) -> dict:
    """card -> row -> compile mode -> {s_per_epoch, processes, source}."""
    if not path.is_file():
        raise UserError(f"{path} not found: the measured seconds per epoch (README, GPU sessions)")
    try:
        cards = json.loads(path.read_text()).get("cards")
    except (ValueError, AttributeError) as err:
        raise UserError(f"{path} is not a JSON object with `cards` ({err})") from None
    if not isinstance(cards, dict):
        raise UserError(f"{path}: needs `cards`: card -> row -> compile mode -> "
                        "{s_per_epoch, processes, source}")
    return cards


def find_speed(cards: dict, card: str, row: str, mode: str, slowdown: float,
               stated: dict[str, Speed]) -> Speed | None:
    """A row's seconds per epoch alone on the card in compile `mode`: stated, measured, or
    derived from the other mode's measurement (eager time for a compiled run: an upper bound)."""
    if row in stated:
        return stated[row]
    entries = cards.get(card, {}).get(row, {})

    def alone(entry: dict) -> float:  # a figure measured with k processes side by side
        return float(entry["s_per_epoch"]) / (1 + slowdown * (int(entry.get("processes", 1)) - 1))

    if mode in entries:
        k = int(entries[mode].get("processes", 1))
        return Speed(alone(entries[mode]), "measured" + (f", {k} side by side" if k > 1 else ""))
    if mode != "none" and "none" in entries:
        return Speed(alone(entries["none"]), "measured eager (an upper bound)")
    if mode == "none" and "reduce-overhead" in entries:
        return Speed(alone(entries["reduce-overhead"]) * GRAPH_GAIN, f"measured graphs x {GRAPH_GAIN}")
    return None


def card_name(device_name: str) -> str:
    """The table's key for a device: "NVIDIA H200" -> h200, "NVIDIA H100 80GB HBM3" -> h100."""
    for word in device_name.lower().replace("-", " ").split():
        if len(word) >= 4 and word[0].isalpha() and word[1:].isdigit():
            return word
    return "-".join(device_name.lower().split())


# ---------------------------------------------------------------- the plan


@dataclass
class RunPlan:
    name: str                 # folder and file prefix: <row>-seed<N>[-compiled|-eager]
    row: str
    seed: int
    check: str                # "" (a table run) | compiled | eager (the compile check's pair)
    epochs: int               # planned
    published: int            # the recipe's
    mode: str                 # torch.compile mode it trains in
    seconds: float            # per epoch alone
    source: str
    checkpoint_every: int
    model_mib: float          # model.pt in fp32
    overrides: dict           # dotted params.yaml keys this run sets
    weights: str = "fp32"     # as it travels
    fixed_s: float = 0.0      # start, compile, evaluation
    est_s: float = 0.0        # all of it, side by side
    lane: int = 0

    @property
    def run_id(self) -> str:
        return f"{self.row}-seed{self.seed}"


@dataclass
class SessionPlan:
    card: str
    minutes: float
    lanes: int
    factor: float             # each process's epoch time side by side, over alone
    margin: float
    pack_s: float
    eval_s: float
    runs: list[RunPlan]
    transfer_mib: float
    batches: int
    limits: dict
    settings: dict            # params.yaml keys the runs set to other values than it holds
    startup_s: float = 15.0   # a run's start before its training budget counts

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SessionPlan:
        return cls(**{**data, "runs": [RunPlan(**r) for r in data["runs"]]})


def _fail(message: str) -> None:
    raise UserError(message)


def apply_overrides(raw: dict, overrides: dict) -> dict:
    """params.yaml's mapping with dotted keys set (as `dvc exp run -S` would)."""
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return raw


def run_overrides(params: Params, row: str, seeds: Iterable[int], epochs: int, check: str) -> dict:
    """The keys a run sets: the row's seeds (params.yaml's and the session's), its epochs with
    the schedule's warmup and steps stretched alike (onecycle and cosine follow `epochs` by
    themselves), a check's compile."""
    base = params.recipes[row]
    out: dict[str, Any] = {f"seeds.{row}": sorted(set(params.seeds[row]) | set(seeds))}
    if epochs != base.epochs:
        out[f"{row}.epochs"] = epochs
        scale = epochs / base.epochs
        if base.warmup_epochs:
            out[f"{row}.warmup_epochs"] = round(base.warmup_epochs * scale, 4)
        if base.schedule == "step":
            out[f"{row}.step_epochs"] = round(base.step_epochs * scale, 4)
    if check:
        out[f"{row}.compile"] = "reduce-overhead" if check == "compiled" else "none"
    return out


def model_mib(params: Params, row: str) -> float:
    """model.pt's size in fp32, from the model built without memory (meta tensors)."""
    import torch

    from fashionbench.train import model_for

    recipe = params.recipe(row)
    with torch.device("meta"):
        model = model_for(recipe.model, recipe.arch, recipe, params.dataset)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / MIB


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def make_plan(raw: dict, params: Params, cards: dict, req: Request) -> SessionPlan:
    """Runs, lanes and epochs for `req`; every refusal a one-line UserError, before any work."""
    from fashionbench.train import resolve_compile

    if not 0 < req.minutes <= MAX_MINUTES:
        _fail(f"--minutes {req.minutes:g}: a device call lasts at most 10 minutes, so a session "
              f"plans at most {MAX_MINUTES:g} (its start and transfers take the rest)")
    if params.quick:
        _fail("params.yaml: quick is true: a GPU session trains the real recipes; set quick: false")
    if not req.rows:
        _fail("name the rows to train, e.g. `plan resnet9 resnet18 --minutes 9`")
    for row in (*req.rows, *filter(None, [req.check_compile])):
        if row not in params.recipes:
            _fail(f"unknown row {row!r}{_did_you_mean(row, params.recipes)}; deep rows of "
                  f"params.yaml: {', '.join(params.recipes)}")
    for row in req.epochs:
        if row not in req.rows:
            _fail(f"--epochs {row}=...: {row} is not one of the rows planned ({', '.join(req.rows)})")
    device = "cpu" if req.card == "cpu" else "cuda"
    wanted: list[tuple[str, int, str, int]] = []  # row, seed, check, target epochs
    if req.check_compile:
        seed = (req.seeds or params.seeds[req.check_compile])[0]
        wanted += [(req.check_compile, seed, check, req.check_epochs) for check in ("compiled", "eager")]
    for row in dict.fromkeys(req.rows):
        for seed in req.seeds if req.seeds is not None else params.seeds[row]:
            wanted.append((row, seed, "", req.epochs.get(row, params.recipes[row].epochs)))
    lanes = max(1, min(req.parallel, len(wanted)))
    factor = 1 + req.slowdown * (lanes - 1)
    sizes = {row: model_mib(params, row) for row in dict.fromkeys(w[0] for w in wanted)}
    runs, unmeasured = [], []
    for row, seed, check, target in wanted:
        recipe = params.recipes[row]
        auto_device = device if recipe.device in ("auto", "cuda") else recipe.device
        mode = {"compiled": "reduce-overhead", "eager": "none"}.get(
            check, resolve_compile(recipe.compile, auto_device))
        speed = find_speed(cards, req.card, row, mode, req.slowdown, req.stated)
        if speed is None:
            unmeasured.append(row)
            continue
        name = f"{row}-seed{seed}" + (f"-{check}" if check else "")
        fixed = req.startup_s + (req.compile_s if mode != "none" else 0.0) + req.eval_s
        runs.append(RunPlan(name, row, seed, check, target, target, mode, speed.seconds, speed.source,
                            recipe.checkpoint_every, sizes[row], {}, fixed_s=fixed))
    if unmeasured:
        rows = ", ".join(dict.fromkeys(unmeasured))
        _fail(f"no seconds per epoch for {rows} on {req.card} in the table: measure each on that "
              f"card with `python -m fashionbench.runner time <row>` and add it to {TABLE}, or "
              "let `run --measure` time it there, or state one with --assume row=SECONDS")
    _fit(runs, lanes, factor, req)
    for run in runs:
        seeds = {r.seed for r in runs if r.row == run.row}
        run.overrides = run_overrides(params, run.row, seeds, run.epochs, run.check)
        try:
            params_from_dict(apply_overrides(raw, run.overrides)).recipe(run.row)
        except UserError as err:
            _fail(f"{run.name} at {run.epochs} epochs: {err}")
    mib, batches = _choose_weights(runs, req)
    settings = {k: v for r in runs if not r.check for k, v in r.overrides.items() if _value(raw, k) != v}
    return SessionPlan(req.card, req.minutes, lanes, factor, req.margin, req.pack_s, req.eval_s,
                       runs, mib, batches, dataclasses.asdict(req.limits), settings, req.startup_s)


def _value(raw: dict, key: str) -> Any:
    """params.yaml's value at a dotted key, as the row reads it (a row's key, else train_defaults')."""
    node: Any = raw
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is None and key.count(".") == 1 and not key.startswith("seeds."):
        return raw.get("train_defaults", {}).get(key.split(".")[1])
    return node


def _fit(runs: list[RunPlan], lanes: int, factor: float, req: Request) -> None:
    """Assign runs to lanes (longest first; the check pair first, side by side) and shorten,
    lane by lane, the longest runs to the level where the lane's training fits its room less
    the margin; a row's seeds then share its fewest epochs."""
    capacity = req.minutes * 60 - req.pack_s

    def train_s(run: RunPlan, epochs: int) -> float:
        return epochs * run.seconds * factor

    loads, assigned = [0.0] * lanes, [[] for _ in range(lanes)]
    checks = [r for r in runs if r.check]
    rest = sorted((r for r in runs if not r.check), key=lambda r: r.fixed_s + train_s(r, r.epochs), reverse=True)
    for index, run in enumerate(checks + rest):
        lane = index % lanes if run.check else min(range(lanes), key=loads.__getitem__)
        run.lane = lane + 1
        assigned[lane].append(run)
        loads[lane] += run.fixed_s + train_s(run, run.epochs)
    for lane_runs in assigned:
        room = capacity - sum(r.fixed_s for r in lane_runs)
        room = room * (1 - req.margin) - sum(train_s(r, r.epochs) for r in lane_runs if r.check)
        if room <= 0:
            names = ", ".join(r.name for r in lane_runs)
            _fail(f"{req.minutes:g} min hold no training for {names}: starting, compiling and "
                  f"evaluating take {sum(r.fixed_s for r in lane_runs):.0f} s of that lane; give "
                  "more minutes, fewer runs or more --parallel")
        shortenable = [r for r in lane_runs if not r.check]
        level = _water_level([train_s(r, r.epochs) for r in shortenable], room)
        for run in shortenable:
            if train_s(run, run.epochs) > level:
                run.epochs = int(level / (run.seconds * factor))
    for row in dict.fromkeys(r.row for r in runs if not r.check):
        seeds = [r for r in runs if r.row == row and not r.check]
        epochs = min(r.epochs for r in seeds)
        floor = min(req.min_epochs, seeds[0].published)
        if epochs < max(1, floor):
            _fail(f"{row} cannot fit {req.minutes:g} min: {epochs} epochs fit at "
                  f"{seeds[0].seconds * factor:.2f} s each with {lanes} processes side by side, "
                  f"fewer than the minimum {max(1, floor)}; give more minutes, fewer seeds or rows, "
                  "or a lower --min-epochs")
        for run in seeds:
            run.epochs = epochs
    for run in runs:
        run.est_s = run.fixed_s + train_s(run, run.epochs)


def _water_level(times: list[float], room: float) -> float:
    """The cap L with sum(min(t, L)) == room (infinite when all of `times` fit)."""
    if sum(times) <= room:
        return math.inf
    done = 0.0
    ordered = sorted(times)
    for index, value in enumerate(ordered):
        left = len(ordered) - index
        if done + value * left >= room:
            return (room - done) / left
        done += value
    return math.inf


def _blob_mib(run: RunPlan) -> float:
    return run.model_mib * (0.5 * BF16_ZLIB if run.weights == "bf16" else FP32_ZLIB)


def _choose_weights(runs: list[RunPlan], req: Request) -> tuple[float, int]:
    """Weights as they travel (auto: fp32 unless the transfers cannot carry it, then bf16 for
    the largest models first); returns the estimated MiB and transfers, or refuses."""
    placed = [r for r in runs if not r.check]
    for run in placed:
        run.weights = "bf16" if req.weights == "bf16" else "fp32"

    limits = dataclasses.replace(req.limits, total_mib=req.limits.total_mib * TRANSFER_MARGIN)

    def estimate() -> tuple[float, int]:
        sizes = [int(req.records_mib * len(runs) * MIB)] + [int(_blob_mib(r) * MIB) for r in placed]
        names = [f"f{i}" for i in range(len(sizes))]
        return sum(sizes) / MIB, len(pack(_parts(list(zip(names, sizes)), limits), limits))

    mib, batches = estimate()
    for run in sorted(placed, key=lambda r: r.model_mib, reverse=True):
        if batches <= req.transfers or req.weights != "auto":
            break
        run.weights = "bf16"
        mib, batches = estimate()
    if batches > req.transfers:
        _fail(f"the outputs come to about {mib:.0f} MiB (models as {'bf16' if req.weights != 'fp32' else 'fp32'}),"
              f" {batches} transfers of {req.limits.files} files and {req.limits.total_mib:g} MiB; "
              f"allow --transfers {batches} (each one more device call, `send`) or plan fewer runs")
    return mib, batches


def format_plan(plan: SessionPlan) -> str:
    """The plan as a table, its lanes, its transfer and the params it trains with."""
    lines = [f"GPU session on {plan.card}: {plan.minutes:g} min, {plan.lanes} process"
             f"{'es' if plan.lanes > 1 else ''} side by side (each epoch x{plan.factor:.2f} its time "
             f"alone), margin {plan.margin:.0%}",
             f"{'row':<22}{'seed':>5}{'epochs':>7}{'published':>10}{'s/epoch':>8}{'est. min':>9}{'lane':>5}  "
             f"{'compile':<16}{'weights':<8}speed from"]
    for run in plan.runs:
        row, weights = (f"{run.row} ({run.check} check)", "-") if run.check else (run.row, run.weights)
        lines.append(f"{row:<22}{run.seed:>5}{run.epochs:>7}{run.published:>10}{run.seconds:>8.2f}"
                     f"{run.est_s / 60:>9.1f}{run.lane:>5}  {run.mode:<16}{weights:<8}{run.source}")
    for lane in range(1, plan.lanes + 1):
        mine = [r for r in plan.runs if r.lane == lane]
        lines.append(f"lane {lane}: {' then '.join(r.name for r in mine)} "
                     f"({sum(r.est_s for r in mine) / 60:.1f} min)")
    limits = Limits(**plan.limits)
    lines.append(f"transfer: about {plan.transfer_mib:.0f} MiB in {plan.batches} call"
                 f"{'s' if plan.batches > 1 else ''} (each at most {limits.files} files, "
                 f"{limits.file_mib:g} MiB each, {limits.total_mib:g} MiB in all)")
    if plan.settings:
        lines.append("params.yaml must say so before `place`: "
                     + " ".join(f"-S '{k}={json.dumps(v).replace(' ', '')}'" for k, v in plan.settings.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------- files, parts, transfers


def _parts(blobs: list[tuple[str, int]], limits: Limits) -> list[tuple[str, int]]:
    """(file name, size) once blobs over the per-file limit are cut into .partNNN pieces."""
    out = []
    for name, size in blobs:
        if size <= limits.file_bytes:
            out.append((name, size))
            continue
        count = -(-size // limits.file_bytes)
        out += [(f"{name}{PART}{i:03d}", min(limits.file_bytes, size - i * limits.file_bytes))
                for i in range(count)]
    return out


def pack(files: list[tuple[str, int]], limits: Limits, reserve: int = 64 * 1024) -> list[list[tuple[str, int]]]:
    """Files into transfers of at most limits.files (the manifest is one) and limits.total
    bytes less `reserve` (the manifest's): largest first, each into the first one with room."""
    room = limits.total_bytes - reserve
    batches: list[list[tuple[str, int]]] = []
    for name, size in sorted(files, key=lambda f: f[1], reverse=True):
        for batch in batches:
            if len(batch) < limits.files - 1 and sum(s for _, s in batch) + size <= room:
                batch.append((name, size))
                break
        else:
            batches.append([(name, size)])
    return batches


def stage_deps(root: Path, rows: Iterable[str]) -> tuple[list[str], list[str]]:
    """(code, data folders) the train and evaluate stages of `rows` depend on, as dvc.yaml
    lists them: what a session's outputs were made from."""
    try:
        stages = read_yaml(root / "dvc.yaml")["stages"]
    except (OSError, KeyError, TypeError) as err:
        raise UserError(f"{root / 'dvc.yaml'} is unreadable ({err}): run from the repository root") from None
    deps: list[str] = []
    for row in rows:
        for name in (f"train_{row}", f"evaluate_{row}"):
            deps += [d for d in (stages.get(name) or {}).get("deps", []) if isinstance(d, str) and "${" not in d]
    deps = list(dict.fromkeys(deps))
    code = [d for d in deps if d.split("/")[0] in ("fashionbench", "stages")]
    data = [d for d in deps if d.startswith("data/") and d != "data/params-checked"]
    return code, data


def data_digest(folder: Path) -> str:
    """A data folder's content: each .npz by its arrays (a compressed copy of the same arrays
    is the same data), any other file by its bytes."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    if not files:
        raise UserError(f"{folder} is missing or empty: `dvc pull {folder.name}` or `dvc repro` its stage")
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode())
        if path.suffix != ".npz":
            digest.update(path.read_bytes())
            continue
        try:
            with np.load(path) as arrays:
                for name in sorted(arrays.files):
                    array = arrays[name]
                    digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
                    digest.update(np.ascontiguousarray(array).tobytes())
        except (OSError, ValueError) as err:
            raise UserError(f"{path} is unreadable ({err})") from None
    return digest.hexdigest()


def data_digests(data: Path, folders: Iterable[str]) -> dict[str, str]:
    """data/<name> -> digest, read from `data` (which stands for the repository's data/)."""
    return {rel: data_digest(data / Path(rel).relative_to("data")) for rel in folders}


def code_digests(root: Path, code: Iterable[str]) -> dict[str, str]:
    """SHA-256 of each code file (folders: every file in them) under `root`."""
    files = []
    for rel in code:
        path = root / rel
        files += sorted(p for p in path.rglob("*.py")) if path.is_dir() else [path]
    return {p.relative_to(root).as_posix(): sha256_file(p) if p.is_file() else "missing" for p in files}


# ---------------------------------------------------------------- models as they travel


def round_to_bf16(path: Path) -> int:
    """Rewrite model.pt with its float tensors of ROUNDED_MIN or more values rounded to bf16
    (kept as fp32, memory layout unchanged); returns the tensors rounded."""
    import torch

    saved = torch.load(path, map_location="cpu", weights_only=True)
    count = 0
    for key, value in saved["state_dict"].items():
        if value.dtype == torch.float32 and value.numel() >= ROUNDED_MIN:
            rounded = torch.empty_strided(value.shape, value.stride(), dtype=torch.float32)
            saved["state_dict"][key] = rounded.copy_(value.to(torch.bfloat16))
            count += 1
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(saved, f)  # through a file object, as save_trained: the same bytes each time
    return count


def _storages(content: bytes) -> list[tuple[int, int]]:
    """(offset, size) of each tensor storage in a torch zip file (stored, uncompressed)."""
    spans = []
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        for info in archive.infolist():
            if "/data/" not in info.filename or info.compress_type != zipfile.ZIP_STORED:
                continue
            name_len, extra_len = struct.unpack("<HH", content[info.header_offset + 26:info.header_offset + 30])
            spans.append((info.header_offset + 30 + name_len + extra_len, info.file_size))
    return spans


def encode_model(model: Path, out: Path) -> None:
    """model.pt -> a compressed file that decode_model turns back into the same bytes. Storages
    whose every 4-byte word has its low 16 bits zero (fp32 rounded to bf16) travel as their
    high halves, split into two byte planes; the rest as is; all of it through zlib."""
    content = model.read_bytes()
    regions, pos, gaps, lows, highs = [], 0, [], [], []
    for offset, size in _storages(content):
        if size < 4 * ROUNDED_MIN or size % 4:
            continue
        words = np.frombuffer(content, dtype="<u4", count=size // 4, offset=offset)
        if (words & 0xFFFF).any():
            continue
        regions.append([offset, size])
        gaps.append(content[pos:offset])
        pos = offset + size
        high = (words >> 16).astype("<u2")
        lows.append((high & 0xFF).astype(np.uint8).tobytes())
        highs.append((high >> 8).astype(np.uint8).tobytes())
    gaps.append(content[pos:])
    header = json.dumps({"format": 1, "size": len(content), "sha256": hashlib.sha256(content).hexdigest(),
                         "regions": regions}).encode()
    body = zlib.compress(b"".join(gaps) + b"".join(lows) + b"".join(highs), 6)
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"FBZ1" + struct.pack("<Q", len(header)) + header + body)


def decode_model(path: Path) -> tuple[bytes, str]:
    """The model.pt bytes an encode_model file holds, and the SHA-256 they must have."""
    content = path.read_bytes()
    if content[:4] != b"FBZ1":
        raise UserError(f"{path} is not a model written by `gpu_session run`")
    length = struct.unpack("<Q", content[4:12])[0]
    header = json.loads(content[12:12 + length])
    body = zlib.decompress(content[12 + length:])
    halves = sum(size // 4 for _, size in header["regions"])
    gap_bytes = len(body) - 2 * halves
    gaps, lows, highs = body[:gap_bytes], body[gap_bytes:gap_bytes + halves], body[gap_bytes + halves:]
    out, pos, gap_pos, half_pos = bytearray(), 0, 0, 0
    for offset, size in header["regions"]:
        out += gaps[gap_pos:gap_pos + offset - pos]
        gap_pos += offset - pos
        count = size // 4
        high = (np.frombuffer(lows, np.uint8, count, half_pos).astype("<u4")
                | np.frombuffer(highs, np.uint8, count, half_pos).astype("<u4") << 8)
        out += (high << 16).astype("<u4").tobytes()
        half_pos += count
        pos = offset + size
    out += gaps[gap_pos:]
    return bytes(out), header["sha256"]


# ---------------------------------------------------------------- the session's folders and state


def session_key(req: Request, root: Path, digests: dict) -> str:
    """Names the session's work: the same rows, seeds, targets, params and data resume it."""
    ident = {"rows": req.rows, "seeds": req.seeds, "epochs": req.epochs, "check": req.check_compile,
             "check_epochs": req.check_epochs, "weights": req.weights, "card": req.card,
             "params": sha256_file(root / PARAMS_FILE), "data": digests}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def default_work(key: str) -> Path:
    from fashionbench.train import checkpoint_root

    return checkpoint_root().parent / "gpu-sessions" / key


class State:
    """session.json in the work folder: the session id, its plan and each run's progress."""

    def __init__(self, work: Path):
        self.path = work / "session.json"
        self.data: dict = json.loads(self.path.read_text()) if self.path.is_file() else {}

    @property
    def exists(self) -> bool:
        return bool(self.data)

    def run(self, name: str) -> dict:
        return self.data["runs"].setdefault(name, {"state": "pending", "calls": []})

    def save(self) -> None:
        write_json(self.path, self.data)


def prepare_run_root(work: Path, run: RunPlan, raw: dict, data: Path) -> Path:
    """<work>/runs/<name>: the run's params.yaml and links to the data folders; the runner and
    the evaluate stage write the stage outputs under it."""
    from ruamel.yaml import YAML

    folder = work / "runs" / run.name
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for source in sorted(p for p in data.iterdir() if p.is_dir()):
        link = folder / "data" / source.name
        if not link.is_symlink():
            link.symlink_to(source.resolve(), target_is_directory=True)
    text = io.StringIO()
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.dump(apply_overrides(raw, run.overrides), text)
    if not (folder / "params.yaml").is_file() or (folder / "params.yaml").read_text() != text.getvalue():
        (folder / "params.yaml").write_text(text.getvalue())
    return folder


# ---------------------------------------------------------------- running the plan


@dataclass
class Job:
    run: RunPlan
    stage: str                 # train | evaluate
    process: subprocess.Popen
    started: float
    log: Any = None


@dataclass
class Executor:
    """Runs the plan's jobs in `lanes` processes side by side until the budget ends."""

    plan: SessionPlan
    state: State
    root: Path
    work: Path
    minutes: float
    piece_epochs: int
    cuda: bool
    start: float = field(default_factory=time.monotonic)
    active: list[Job] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def say(self, text: str) -> None:
        typer.echo(f"[{self.elapsed():6.1f} s] {text}")

    def env(self) -> dict:
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "FASHIONBENCH_CHECKPOINTS": str(self.work / "checkpoints"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(self.root.resolve()), os.environ.get("PYTHONPATH")]))}
        if self.cuda and "OMP_NUM_THREADS" not in os.environ:  # K processes share the host's cores
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.plan.lanes))
        return env

    def launch(self, run: RunPlan, stage: str, args: list[str], cwd: Path) -> None:
        log = open(self.work / "logs" / f"{run.name}.{stage}.log", "a")
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(args)}\n")
        log.flush()
        process = subprocess.Popen([sys.executable, *args], cwd=cwd, env=self.env(), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.active.append(Job(run, stage, process, time.monotonic(), log))

    def start_train(self, run: RunPlan, left_s: float) -> None:
        budget = max(left_s - self.plan.startup_s, 1.0) / 60  # the runner counts from its own start
        args = ["-m", "fashionbench.runner", "train", run.row, "--seed", str(run.seed),
                "--minutes", f"{budget:.3f}", "--root", str(self.work / "runs" / run.name)]
        if self.piece_epochs:
            args += ["--epochs", str(self.piece_epochs)]
        self.launch(run, "train", args, self.root)
        self.say(f"{run.name}: training ({run.epochs} epochs, {left_s / 60:.1f} min left)")

    def start_evaluate(self, run: RunPlan) -> None:
        self.launch(run, "evaluate", ["-m", "stages.evaluate", run.run_id], self.work / "runs" / run.name)
        self.say(f"{run.name}: evaluating")

    def finish(self, job: Job) -> None:
        code, record = job.process.returncode, self.state.run(job.run.name)
        job.log.close()
        call = {"stage": job.stage, "seconds": round(time.monotonic() - job.started, 2), "exit": code,
                "lanes": self.plan.lanes, "started_s": round(job.started - self.start, 2)}
        record["calls"].append(call)
        run = job.run
        if job.stage == "train":
            if code == 0:
                record["state"] = "trained"
                if run.weights == "bf16" and not run.check:
                    folder = self.work / "runs" / run.name
                    try:
                        rounded = round_to_bf16(folder / runner.outputs(run.row, run.seed)[0])
                    except Exception as err:  # an unreadable model: the run cannot travel
                        record["state"] = "failed"
                        self.say(f"{run.name}: its model could not be rounded to bf16 ({err})")
                        self.state.save()
                        return
                    self.say(f"{run.name}: {rounded} tensors rounded to bf16 for the transfer")
                self.say(f"{run.name}: trained in {call['seconds']:.0f} s")
                self.state.save()
                self.start_evaluate(run)
                return
            record["state"] = "stopped" if code == runner.NOT_DONE_EXIT else "failed"
            self.say(f"{run.name}: " + ("stopped at the budget (checkpoint kept)" if code == runner.NOT_DONE_EXIT
                                         else f"training failed (exit {code}; log {job.log.name})"))
        else:
            record["state"] = "evaluated" if code == 0 else "trained"
            record["eval_failed"] = code != 0
            self.say(f"{run.name}: " + (f"evaluated in {call['seconds']:.0f} s" if code == 0
                                         else f"evaluation failed (exit {code}; log {job.log.name})"))
        self.state.save()

    def stop_all(self) -> None:
        for job in self.active:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for job in self.active:
            try:
                job.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(job.process.pid, signal.SIGKILL)
                job.process.wait()
            job.log.close()
            self.state.run(job.run.name)["calls"].append({"stage": job.stage, "exit": "stopped at the budget",
                                                          "seconds": round(time.monotonic() - job.started, 2)})
            self.say(f"{job.run.name}: {job.stage} stopped at the session's end")
        self.active.clear()
        self.state.save()

    def execute(self) -> None:
        """Trains and evaluates every run not done yet: check pair first, then longest first."""
        end = self.minutes * 60 - self.plan.pack_s
        queue = [r for r in sorted(self.plan.runs, key=lambda r: (not r.check, -r.est_s))
                 if self.state.run(r.name)["state"] not in ("evaluated", "failed")]
        try:
            while queue or self.active:
                for job in [j for j in self.active if j.process.poll() is not None]:
                    self.active.remove(job)
                    self.finish(job)
                if self.elapsed() >= end:
                    self.stop_all()
                    break
                while queue and len(self.active) < self.plan.lanes:
                    run = queue.pop(0)
                    if self.state.run(run.name)["state"] == "trained":
                        self.start_evaluate(run)
                        continue
                    left = end - self.plan.eval_s - self.elapsed()
                    need = run.fixed_s - self.plan.eval_s + run.checkpoint_every * run.seconds * self.plan.factor
                    if left < need:
                        self.say(f"{run.name}: not started, {left:.0f} s left of the {need:.0f} s "
                                 "its first checkpoint needs")
                        continue
                    self.start_train(run, left)
                time.sleep(0.2)
        finally:
            if self.active:
                self.stop_all()


# ---------------------------------------------------------------- laying out what comes back


def _stage_files(folder: Path, skip: set[Path]) -> list[Path]:
    """Files under a run folder, relative, but for `skip` (and below it), data/ and temporaries."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel_dir = Path(dirpath).relative_to(folder)
        dirnames[:] = [d for d in dirnames if rel_dir / d not in skip and (rel_dir / d).parts[0] != "data"]
        found += [rel_dir / f for f in filenames if not f.startswith(".") and rel_dir / f not in skip]
    return sorted(found)


def run_timing(folder: Path, run: RunPlan, batch_size: int, processes: int) -> dict:
    """Seconds per epoch as trained (median over epochs after the first, which compiles), the
    first epoch, and the processes side by side; from the run's record and curves."""
    train = json.loads((folder / "metrics/train" / f"{run.run_id}.json").read_text())
    tsv = folder / "plots/train" / run.run_id / "plots/metrics/images_per_s.tsv"
    rates = [float(line.split("\t")[1]) for line in tsv.read_text().splitlines()[1:] if line.strip()]
    images = train["train_size"] // batch_size * batch_size or train["train_size"]
    epochs = [images / rate for rate in rates]
    return {"run": run.name, "row": run.row, "seed": run.seed, "check": run.check, "mode": run.mode,
            "epochs": len(epochs), "processes": processes,
            "s_per_epoch": round(statistics.median(epochs[1:] or epochs), 3),
            "first_epoch_s": round(epochs[0], 3), "wall_time_s": train.get("wall_time_s"),
            "train_acc": train.get("train_acc"), "device": train.get("device")}


def lay_out(plan: SessionPlan, state: State, work: Path, out: Path, raw: dict, limits: Limits,
            digests: dict[str, str], code: dict[str, str]) -> list[Path]:
    """Everything that must come back, as transfers within `limits`: transfer 1 in `out`, the
    others in the work folder for `send`. Returns the transfer folders."""
    state.data["layouts"] = layout = state.data.get("layouts", 0) + 1
    stage = work / "layout"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "blobs").mkdir(parents=True)
    runs_info, timings = [], []
    with tarfile.open(stage / "blobs" / RECORDS, "w:gz") as tar:
        for run in plan.runs:
            record, folder = state.run(run.name), work / "runs" / run.name
            if record["state"] not in ("trained", "evaluated"):
                runs_info.append({"name": run.name, "row": run.row, "seed": run.seed, "check": run.check,
                                  "state": record["state"]})
                continue
            recipe = params_from_dict(apply_overrides(raw, run.overrides)).recipe(run.row)
            calls = [c for c in record["calls"] if c["stage"] == "train" and c.get("exit") == 0]
            timings.append(run_timing(folder, run, recipe.batch_size, calls[-1]["lanes"] if calls else 1))
            outputs = runner.outputs(run.row, run.seed)
            evaluated = [p for p in _stage_files(folder, {Path(PARAMS_FILE), *outputs})] \
                if record["state"] == "evaluated" else []
            info = {"name": run.name, "row": run.row, "seed": run.seed, "check": run.check,
                    "state": record["state"], "epochs": run.epochs, "published": run.published,
                    "weights": run.weights, "overrides": run.overrides,
                    "recipe": json.loads(json.dumps(dataclasses.asdict(recipe), default=str))}
            if run.check:  # the compile check: records only, never placed
                for rel in [outputs[1], *[p for p in evaluated if p.parts[:2] == ("metrics", "eval")]]:
                    tar.add(folder / rel, f"check/{run.name}/{rel.as_posix()}")
                runs_info.append(info)
                continue
            export = work / "export" / run.name
            shutil.rmtree(export, ignore_errors=True)
            runner.export(folder, outputs, export)
            model = export / outputs[0]
            train_files = sorted(p.relative_to(export) for p in export.rglob("*") if p.is_file())
            for rel in train_files:
                if rel != outputs[0]:
                    tar.add(export / rel, f"train/{run.name}/{rel.as_posix()}")
            for rel in evaluated:
                tar.add(folder / rel, f"eval/{run.name}/{rel.as_posix()}")
            encode_model(model, stage / "blobs" / f"{run.name}{MODEL}")
            info |= {"model": outputs[0].as_posix(), "model_sha256": sha256_file(model),
                     "train_files": {r.as_posix(): sha256_file(export / r) for r in train_files},
                     "eval_files": {r.as_posix(): sha256_file(folder / r) for r in evaluated}}
            runs_info.append(info)
        session_files = {"plan.json": json.dumps(plan.to_json(), indent=2),
                         "state.json": json.dumps(state.data, indent=2),
                         "timings.json": json.dumps(timings, indent=2)}
        for name, text in session_files.items():
            blob = text.encode()
            member = tarfile.TarInfo(f"session/{name}")
            member.size, member.mtime = len(blob), int(time.time())
            tar.addfile(member, io.BytesIO(blob))
        for log in sorted((work / "logs").glob("*.log")):
            tar.add(log, f"session/logs/{log.name}")
    blobs = sorted(stage / "blobs" / name for name in os.listdir(stage / "blobs"))
    files = _split_blobs(blobs, stage / "files", limits)
    manifest = {
        "format": 1, "session": state.data["session"], "key": state.data["key"], "layout": layout,
        "transfers": 0, "card": plan.card, "device": state.data.get("device", ""),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": digests, "code": code,
        "timings": timings, "runs": runs_info,
        "blobs": [{"name": b.name, "size": b.stat().st_size, "sha256": sha256_file(b),
                   "run": b.name[:-len(MODEL)] if b.name.endswith(MODEL) else None} for b in blobs],
        "files": []}
    reserve = len(json.dumps(manifest, indent=2)) + 400 * len(files) + 4096  # its entries, listed below
    batches = pack([(p.name, p.stat().st_size) for p in files], limits, reserve)
    manifest["transfers"] = len(batches)
    run_of = {r["name"]: r for r in runs_info}
    for index, batch in enumerate(batches, 1):
        for name, size in batch:
            blob = name.split(PART)[0]
            owner = run_of.get(blob[:-len(MODEL)]) if blob.endswith(MODEL) else None
            manifest["files"].append({"name": name, "transfer": index, "size": size,
                                      "sha256": sha256_file(stage / "files" / name), "blob": blob,
                                      "run": owner["name"] if owner else None,
                                      "row": owner["row"] if owner else None,
                                      "seed": owner["seed"] if owner else None})
    folders = [out] + [work / "transfers" / f"transfer{i}" for i in range(2, len(batches) + 1)]
    shutil.rmtree(work / "transfers", ignore_errors=True)
    for index, (folder, batch) in enumerate(zip(folders, batches), 1):
        folder.mkdir(parents=True, exist_ok=True)
        for name, _ in batch:
            shutil.move(stage / "files" / name, folder / name)
        write_json(folder / MANIFEST, manifest | {"transfer": index})
        sizes = [p.stat().st_size for p in folder.iterdir()]
        if len(sizes) > limits.files or max(sizes) > limits.file_bytes or sum(sizes) > limits.total_bytes:
            raise UserError(f"{folder}: {len(sizes)} files, {sum(sizes)} bytes: over the transfer's limits "
                            "(the manifest outgrew its room): raise --max-total-mib or --max-files")
    state.save()
    return folders


def _split_blobs(blobs: list[Path], folder: Path, limits: Limits) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for blob in blobs:
        size = blob.stat().st_size
        if size <= limits.file_bytes:
            files.append(Path(shutil.copyfile(blob, folder / blob.name)))
            continue
        with open(blob, "rb") as f:
            for index in range(-(-size // limits.file_bytes)):
                part = folder / f"{blob.name}{PART}{index:03d}"
                part.write_bytes(f.read(limits.file_bytes))
                files.append(part)
    return files


def _check_out(out: Path, key: str) -> None:
    """`out` must be new, empty, or an earlier layout of this session (then it is replaced)."""
    if not out.exists() or not any(out.iterdir()):
        return
    try:
        earlier = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        earlier = {}
    if earlier.get("key") != key:
        raise UserError(f"{out} is not empty and holds no earlier layout of this session: "
                        "give --out a new or empty folder")
    for entry in earlier.get("files", []):
        if entry.get("transfer") == earlier.get("transfer"):
            (out / entry["name"]).unlink(missing_ok=True)
    (out / MANIFEST).unlink()


# ---------------------------------------------------------------- placing what came back


def _read_manifests(folders: list[Path]) -> list[dict]:
    manifests = []
    for folder in folders:
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except OSError:
            raise UserError(f"{folder}: no {MANIFEST}: not a folder `gpu_session run` or `send` wrote") from None
        except ValueError as err:
            raise UserError(f"{folder / MANIFEST} is not valid JSON ({err}): bring it back again") from None
        if manifest.get("format") != 1:
            raise UserError(f"{folder / MANIFEST}: an unknown manifest format")
        manifests.append(manifest)
    first = manifests[0]
    for folder, manifest in zip(folders, manifests):
        if (manifest["session"], manifest["layout"]) != (first["session"], first["layout"]):
            raise UserError(f"{folder} is session {manifest['session']} layout {manifest['layout']}, "
                            f"{folders[0]} is session {first['session']} layout {first['layout']}: "
                            "place one layout of one session at a time")
    seen = {}
    for folder, manifest in zip(folders, manifests):
        if manifest["transfer"] in seen:
            raise UserError(f"{folder} and {seen[manifest['transfer']]} are both transfer "
                            f"{manifest['transfer']} of session {first['session']}")
        seen[manifest["transfer"]] = folder
    missing = sorted(set(range(1, first["transfers"] + 1)) - set(seen))
    if missing:
        raise UserError(f"session {first['session']} came in {first['transfers']} transfers; transfer "
                        f"{', '.join(map(str, missing))} is missing (bring it back with `gpu_session send`)")
    return manifests


def verify(folders: list[Path], scratch: Path) -> dict:
    """Check every file of a session's transfers against its manifest and rebuild the blobs
    in `scratch`; returns the manifest. Raises a UserError naming the first fault."""
    manifests = _read_manifests(folders)
    manifest = manifests[0]
    session = manifest["session"]
    by_transfer = {m["transfer"]: f for f, m in zip(folders, manifests)}
    listed: dict[Path, dict] = {by_transfer[e["transfer"]] / e["name"]: e for e in manifest["files"]}
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.name != MANIFEST and path not in listed:
                raise UserError(f"{path}: not in session {session}'s manifest (a part of another session?): "
                                "take it out of the folder")
    for path, entry in listed.items():
        if not path.is_file():
            raise UserError(f"{path}: missing (transfer {entry['transfer']} of session {session})")
        if path.stat().st_size != entry["size"]:
            raise UserError(f"{path}: {path.stat().st_size} bytes, the manifest says {entry['size']}: "
                            "a broken transfer; bring it back again")
        if sha256_file(path) != entry["sha256"]:
            raise UserError(f"{path}: SHA-256 differs from the manifest: a damaged or foreign file; "
                            "bring it back again")
    (scratch / "blobs").mkdir(parents=True)
    for blob in manifest["blobs"]:
        pieces = sorted((p for p, e in listed.items() if e["blob"] == blob["name"]), key=lambda p: p.name)
        target = scratch / "blobs" / blob["name"]
        with open(target, "wb") as f:
            for piece in pieces:
                f.write(piece.read_bytes())
        if target.stat().st_size != blob["size"] or sha256_file(target) != blob["sha256"]:
            raise UserError(f"{blob['name']}: its joined parts differ from the manifest "
                            f"(session {session}): bring its parts back again")
    with tarfile.open(scratch / "blobs" / RECORDS, "r:gz") as tar:
        tar.extractall(scratch / "records", filter="data")
    for run in manifest["runs"]:
        if "model" not in run:
            continue
        export = scratch / "records" / "train" / run["name"]
        content, digest = decode_model(scratch / "blobs" / f"{run['name']}{MODEL}")
        if hashlib.sha256(content).hexdigest() != digest or digest != run["model_sha256"]:
            raise UserError(f"{run['name']}: the rebuilt model.pt differs from the one trained: bring "
                            "its model parts back again")
        (export / run["model"]).parent.mkdir(parents=True, exist_ok=True)
        (export / run["model"]).write_bytes(content)
        for kind, base in (("train_files", export), ("eval_files", scratch / "records" / "eval" / run["name"])):
            for rel, digest in run[kind].items():
                if not (base / rel).is_file() or sha256_file(base / rel) != digest:
                    raise UserError(f"{run['name']}: {rel} is missing from the records or differs "
                                    "from the manifest")
        try:
            runner.verify_export(export, run["row"], run["seed"])  # what runner.place will check
        except UserError as err:
            raise UserError(f"{run['name']}: {err}") from None
    return manifest


def check_workspace(manifest: dict, root: Path, accept_code_changes: bool) -> None:
    """params.yaml must describe what trained each run (so `dvc commit` records the truth), and
    data/prepared and the stages' code must be what the session used."""
    raw = read_yaml(root / PARAMS_FILE)
    params = params_from_dict(raw)
    needed = {}
    for run in manifest["runs"]:
        if "model" not in run:
            continue
        seeds = list(params.seeds.get(run["row"], ()))
        if run["seed"] not in seeds:
            needed[f"seeds.{run['row']}"] = sorted(set(seeds) | set(run["overrides"][f"seeds.{run['row']}"]))
        here = json.loads(json.dumps(dataclasses.asdict(params.recipe(run["row"])), default=str))
        for key in sorted(k for k in run["recipe"] if run["recipe"][k] != here.get(k)):
            needed[f"{run['row']}.{key}"] = run["recipe"][key]
    if needed:
        raise UserError("params.yaml differs from what the session trained; set "
                        + ", ".join(f"{k}: {json.dumps(v)}" for k, v in needed.items())
                        + " (so that `dvc commit` records the recipe that made these files), then place again")
    for rel, digest in manifest["data"].items():
        if data_digest(root / rel) != digest:
            raise UserError(f"{root / rel} is not the data the session used: `dvc checkout {rel}` to "
                            "the version it had, then place again")
    changed = [rel for rel, digest in manifest["code"].items()
               if not (root / rel).is_file() or sha256_file(root / rel) != digest]
    if changed and not accept_code_changes:
        raise UserError(f"{', '.join(changed)} differ from the code the session ran: place with that "
                        "code checked out, or pass --accept-code-changes if the change cannot alter training")


def place_session(folders: list[Path], root: Path, accept_code_changes: bool) -> dict:
    """Verify, then put every file where its stage writes it; returns the manifest."""
    with tempfile.TemporaryDirectory(prefix="fashionbench-session-") as tmp:
        scratch = Path(tmp)
        manifest = verify(folders, scratch)
        check_workspace(manifest, root, accept_code_changes)
        placed = [run for run in manifest["runs"] if "model" in run]
        for run in placed:  # each run's training outputs at once (the runner checks the model loads)
            quiet = io.StringIO()
            try:
                with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                    runner.place(scratch / "records" / "train" / run["name"], root=root)
            except typer.Exit:
                raise UserError(f"{run['name']}: {quiet.getvalue().strip()}") from None
        with atomic_files() as stage:  # then every evaluation output, renamed together
            for run in placed:
                for rel in run["eval_files"]:
                    shutil.copyfile(scratch / "records" / "eval" / run["name"] / rel, stage(root / rel))
        manifest["checks"] = _check_results(scratch / "records" / "check")
    return manifest


def _check_results(folder: Path) -> dict:
    """The compile check's records: run name -> (training record, evaluation metrics)."""
    results = {}
    for run in sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []:
        train = next((folder / run / "metrics/train").glob("*.json"), None)
        test = next((folder / run / "metrics/eval").glob("*.json"), None) if (folder / run / "metrics/eval").is_dir() else None
        results[run] = (json.loads(train.read_text()) if train else {}, json.loads(test.read_text()) if test else {})
    return results


def record_speeds(manifest: dict, table: Path) -> int:
    """Write the session's measured seconds per epoch into the table; returns entries written."""
    data = json.loads(table.read_text()) if table.is_file() else {"cards": {}}
    count = 0
    for timing in manifest["timings"]:
        if timing["epochs"] < 2:
            continue  # one epoch is mostly start-up and compilation
        entry = data["cards"].setdefault(manifest["card"], {}).setdefault(timing["row"], {})
        entry[timing["mode"]] = {"s_per_epoch": timing["s_per_epoch"], "processes": timing["processes"],
                                 "source": f"gpu_session {manifest['session']} ({manifest['created'][:10]}): "
                                           f"{timing['run']}, median of epochs 2-{timing['epochs']}, "
                                           f"{timing['device']}"}
        count += 1
    write_json(table, data)
    return count


# ---------------------------------------------------------------- the commands


ROWS = typer.Argument(..., help="deep rows of params.yaml: resnet9, wrn28, se_wrn, ...")
MINUTES = typer.Option(..., help=f"the session's budget, start to layout (at most {MAX_MINUTES:g})")
SEEDS = typer.Option("", help="seeds for every row, e.g. 0,1,2 (default: each row's seeds in params.yaml)")
PARALLEL = typer.Option(3, help="training processes side by side on the card")
CARD = typer.Option("", help="the card's key in the table: h200, h100, ... (plan: h200; run: the card found)")
TABLE_OPT = typer.Option(TABLE, "--table", help="measured seconds per epoch: card -> row -> compile mode")
SLOWDOWN = typer.Option(0.25, help="each extra process side by side slows every epoch by this share (stated)")
MARGIN = typer.Option(0.2, help="share of the training time held back when a recipe is shortened")
MIN_EPOCHS = typer.Option(10, help="refuse a row that fits fewer epochs (or its recipe's, if fewer)")
EPOCHS = typer.Option([], "--epochs", help="ROW=N: the recipe's epochs where params.yaml holds fewer (wrn28=600)")
ASSUME = typer.Option([], "--assume", help="ROW=SECONDS: a stated seconds per epoch for a row not measured")
STARTUP = typer.Option(15.0, help="seconds per run to start, load data and write its outputs")
COMPILE_S = typer.Option(45.0, help="more seconds per compiled run (SE-WRN-40-4's first epoch: 40.7 s)")
EVAL_S = typer.Option(30.0, help="seconds per run to evaluate it")
PACK_S = typer.Option(30.0, help="seconds at the end to lay out the transfer")
CHECK = typer.Option("", "--check-compile", help="ROW: also train ROW compiled and eager, equal epochs and seed, both timed")
CHECK_EPOCHS = typer.Option(5, help="epochs of each --check-compile run")
WEIGHTS = typer.Option("auto", help="auto (bf16 only where fp32 does not fit the transfers) | fp32 | bf16")
TRANSFERS = typer.Option(1, help="device calls the outputs may take to bring back (the 2nd on: `send`)")
MAX_FILES = typer.Option(8, help="files one transfer brings back")
MAX_FILE_MIB = typer.Option(16.0, help="MiB of one file in a transfer")
MAX_TOTAL_MIB = typer.Option(64.0, help="MiB of one transfer")
RECORDS_MIB = typer.Option(0.5, hidden=True, help="MiB of records and evaluation files per run (0.3 measured for a CNN, 1.0 for an MLP)")
ROOT = typer.Option(Path("."), help="the repository root (params.yaml, data/prepared, the code)")


def _pairs(values: list[str], option: str, kind: type) -> dict:
    out = {}
    for value in values:
        row, sep, number = value.partition("=")
        try:
            out[row.strip()] = kind(number)
        except ValueError:
            sep = ""
        if not sep or out[row.strip()] <= 0:
            raise UserError(f"{option} {value!r}: write ROW=NUMBER, e.g. {option} wrn28=600")
    return out


def _request(rows, minutes, seeds, parallel, card, slowdown, margin, min_epochs, epochs, assume,
             startup_s, compile_s, eval_s, pack_s, check_compile, check_epochs, weights, transfers,
             max_files, max_file_mib, max_total_mib, records_mib) -> Request:
    try:
        seed_list = tuple(int(s) for s in seeds.split(",")) if seeds.strip() else None
    except ValueError:
        raise UserError(f"--seeds {seeds!r}: write seeds as 0,1,2") from None
    if seed_list is not None and (len(set(seed_list)) != len(seed_list) or min(seed_list) < 0):
        raise UserError(f"--seeds {seeds!r}: distinct seeds >= 0")
    if weights not in ("auto", "fp32", "bf16"):
        raise UserError(f"--weights {weights!r}: auto, fp32 or bf16")
    if parallel < 1 or transfers < 1 or max_files < 2 or check_epochs < 1:
        raise UserError("--parallel, --transfers and --check-epochs must be >= 1, --max-files >= 2")
    stated = {row: Speed(s, "stated (--assume)") for row, s in _pairs(assume, "--assume", float).items()}
    return Request(tuple(rows), seed_list, minutes, parallel, card, slowdown, margin, min_epochs,
                   _pairs(epochs, "--epochs", int), stated, startup_s, compile_s, eval_s, pack_s,
                   check_compile, check_epochs, weights, transfers,
                   Limits(max_files, max_file_mib, max_total_mib), records_mib)


def _load(root: Path) -> tuple[dict, Params]:
    path = root / PARAMS_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: run from the repository root or give --root")
    raw = read_yaml(path)
    return raw, params_from_dict(raw)


@app.command()
def plan(rows: list[str] = ROWS, minutes: float = MINUTES, seeds: str = SEEDS, parallel: int = PARALLEL,
         card: str = CARD, table: Path = TABLE_OPT, slowdown: float = SLOWDOWN, margin: float = MARGIN,
         min_epochs: int = MIN_EPOCHS, epochs: list[str] = EPOCHS, assume: list[str] = ASSUME,
         startup_s: float = STARTUP, compile_s: float = COMPILE_S, eval_s: float = EVAL_S,
         pack_s: float = PACK_S, check_compile: str = CHECK, check_epochs: int = CHECK_EPOCHS,
         weights: str = WEIGHTS, transfers: int = TRANSFERS, max_files: int = MAX_FILES,
         max_file_mib: float = MAX_FILE_MIB, max_total_mib: float = MAX_TOTAL_MIB,
         records_mib: float = RECORDS_MIB, root: Path = ROOT) -> None:
    """Print what a session of --minutes holds: runs, epochs, lanes, transfer."""
    with user_errors():
        req = _request(rows, minutes, seeds, parallel, card or "h200", slowdown, margin, min_epochs, epochs,
                       assume, startup_s, compile_s, eval_s, pack_s, check_compile, check_epochs, weights,
                       transfers, max_files, max_file_mib, max_total_mib, records_mib)
        raw, params = _load(root)
        table_path = table if table.is_absolute() else root / table
        typer.echo(format_plan(make_plan(raw, params, load_table(table_path), req)))


@app.command()
def run(rows: list[str] = ROWS, minutes: float = MINUTES, seeds: str = SEEDS, parallel: int = PARALLEL,
        card: str = CARD, table: Path = TABLE_OPT, slowdown: float = SLOWDOWN, margin: float = MARGIN,
        min_epochs: int = MIN_EPOCHS, epochs: list[str] = EPOCHS, assume: list[str] = ASSUME,
        startup_s: float = STARTUP, compile_s: float = COMPILE_S, eval_s: float = EVAL_S,
        pack_s: float = PACK_S, check_compile: str = CHECK, check_epochs: int = CHECK_EPOCHS,
        weights: str = WEIGHTS, transfers: int = TRANSFERS, max_files: int = MAX_FILES,
        max_file_mib: float = MAX_FILE_MIB, max_total_mib: float = MAX_TOTAL_MIB,
        records_mib: float = RECORDS_MIB, root: Path = ROOT,
        out: Path = typer.Option(..., help="the session folder to bring back (on the device: $OUT/session)"),
        work: Path = typer.Option(None, help="runs, checkpoints and logs (default: beside the checkpoints)"),
        data: Path = typer.Option(None, help="a folder standing for <root>/data (prepared/, ...): `pack-data` writes one"),
        device: str = typer.Option("cuda", help="cuda (refused without a GPU) | cpu (tests, a dry run)"),
        measure: bool = typer.Option(False, help="time here each row the table lacks (eager: an upper bound)"),
        measure_images: int = typer.Option(8192, help="with --measure: training images timed per row"),
        piece_epochs: int = typer.Option(0, help="stop each run after this many new epochs (a budget stop)")) -> None:
    """Train and evaluate the plan's runs side by side, then lay out what comes back; exit 3
    while runs remain (the same command resumes them)."""
    with user_errors():
        import torch

        if device not in ("cuda", "cpu"):
            raise UserError(f"--device {device!r}: cuda or cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("run trains on CUDA and torch sees no GPU here: `plan` here, `run` on the GPU "
                            "machine (--device cpu trains on the CPU, for tests)")
        found = card_name(torch.cuda.get_device_name(0)) if device == "cuda" else "cpu"
        req = _request(rows, minutes, seeds, parallel, card or found, slowdown, margin, min_epochs, epochs,
                       assume, startup_s, compile_s, eval_s, pack_s, check_compile, check_epochs, weights,
                       transfers, max_files, max_file_mib, max_total_mib, records_mib)
        raw, params = _load(root)
        if not (root / "fashionbench").is_dir():
            raise UserError(f"{root} holds no fashionbench/: --root is the repository the runs import")
        data = data or root / "data"
        code, data_dirs = stage_deps(root, (*req.rows, *filter(None, [req.check_compile])))
        digests, code_hashes = data_digests(data, data_dirs), code_digests(root, code)
        key = session_key(req, root, digests)
        work = work or default_work(key)
        _check_out(out, key)
        state = State(work)
        if state.exists:
            session_plan = SessionPlan.from_json(state.data["plan"])
            done = sum(state.run(r.name)["state"] in ("trained", "evaluated") for r in session_plan.runs)
            typer.echo(f"resuming session {state.data['session']}: {done} of {len(session_plan.runs)} runs trained")
        else:
            table_path = table if table.is_absolute() else root / table
            cards = load_table(table_path)
            if measure:
                req = dataclasses.replace(req, stated=req.stated | _measure(req, params, cards, data, measure_images))
            session_plan = make_plan(raw, params, cards, req)
            state.data = {"session": f"{key}-{secrets.token_hex(3)}", "key": key, "plan": session_plan.to_json(),
                          "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "runs": {}}
        typer.echo(format_plan(session_plan))
        (work / "logs").mkdir(parents=True, exist_ok=True)
        for r in session_plan.runs:
            prepare_run_root(work, r, raw, data)
            state.run(r.name)
        state.save()
        Executor(session_plan, state, root, work, minutes, piece_epochs, device == "cuda").execute()
        folders = lay_out(session_plan, state, work, out, raw, req.limits, digests, code_hashes)
    _report_run(session_plan, state, folders, work)


def _measure(req: Request, params: Params, cards: dict, data: Path, images: int) -> dict[str, Speed]:
    """Seconds per epoch, timed here eagerly (runner.epoch_seconds), of the rows the table lacks."""
    from fashionbench.data import load_prepared

    missing = [row for row in dict.fromkeys((*req.rows, *filter(None, [req.check_compile])))
               if row in params.recipes and find_speed(cards, req.card, row, "none", req.slowdown, req.stated) is None]
    if not missing:
        return {}
    prepared = load_prepared(data / "prepared", params.dataset)
    timed = {}
    for row in missing:
        seconds, where = runner.epoch_seconds(row, params, prepared, images)
        timed[row] = Speed(seconds, f"timed here, eager ({where})")
        typer.echo(f"{row}: {seconds:.2f} s per epoch, timed eagerly on {where}")
    return timed


def _report_run(plan: SessionPlan, state: State, folders: list[Path], work: Path) -> None:
    states = {r.name: state.run(r.name)["state"] for r in plan.runs}
    pending = [name for name, s in states.items() if s in ("pending", "stopped")]
    failed = [name for name, s in states.items() if s == "failed"]
    for name, s in states.items():
        typer.echo(f"{name}: {s}")
    size = sum(p.stat().st_size for f in folders for p in f.iterdir())
    typer.echo(f"session {state.data['session']}: {len(folders)} transfer{'s' if len(folders) > 1 else ''}, "
               f"{size / MIB:.1f} MiB; bring back {folders[0]}")
    for index in range(2, len(folders) + 1):
        typer.echo(f"then, in the next device call: python -m fashionbench.gpu_session send {work} "
                   f"--transfer {index} --out $OUT/transfer{index}")
    if failed:
        typer.echo(f"failed: {', '.join(failed)} (logs in {work / 'logs'}, also in the records)")
    if pending:
        typer.echo(f"runs left: {', '.join(pending)}; run the same command again to resume them "
                   "(on this machine: the checkpoints are in the work folder)")
        raise typer.Exit(runner.NOT_DONE_EXIT)
    if failed:
        raise typer.Exit(1)


@app.command()
def send(work: Path = typer.Argument(..., help="the work folder `run` printed"),
         transfer: int = typer.Option(..., help="which transfer (2, 3, ...)"),
         out: Path = typer.Option(..., help="where to put it (on the device: $OUT/transfer<N>)")) -> None:
    """Copy a later transfer of the last layout into --out, for the next device call."""
    with user_errors():
        folder = work / "transfers" / f"transfer{transfer}"
        if not (folder / MANIFEST).is_file():
            raise UserError(f"{folder}: no such transfer (the last layout has "
                            f"{len(list((work / 'transfers').glob('transfer*'))) + 1})")
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} is not empty: give --out a new or empty folder")
        out.mkdir(parents=True, exist_ok=True)
        for path in folder.iterdir():
            shutil.copyfile(path, out / path.name)
    typer.echo(f"transfer {transfer}: {len(list(out.iterdir()))} files in {out}")


@app.command()
def place(folders: list[Path] = typer.Argument(..., help="the session folder and any later transfers"),
          root: Path = typer.Option(Path("."), help="the repository root to place the files in"),
          accept_code_changes: bool = typer.Option(False, help="place although the stages' code changed"),
          record: bool = typer.Option(False, "--record-speeds", help=f"write the measured speeds into {TABLE}")) -> None:
    """Verify a session's transfers, put every file where its stage writes it, print `dvc commit`."""
    with user_errors():
        manifest = place_session(folders, root, accept_code_changes)
        written = record_speeds(manifest, root / TABLE) if record else 0
    placed = [r for r in manifest["runs"] if "model" in r]
    stages = [f"train_{r['row']}@{r['seed']}" for r in placed]
    stages += [evaluate_stage(f"{r['row']}-seed{r['seed']}") for r in placed if r["eval_files"]]
    for timing in manifest["timings"]:
        typer.echo(f"{timing['run']}: {timing['epochs']} epochs, {timing['s_per_epoch']} s per epoch "
                   f"(first {timing['first_epoch_s']} s), {timing['processes']} side by side, {timing['mode']}")
    for name, (train, test) in manifest["checks"].items():
        typer.echo(f"compile check {name}: {train.get('epochs')} epochs in {train.get('wall_time_s')} s, "
                   f"train accuracy {train.get('train_acc')}, test accuracy {test.get('accuracy')}")
    for run in manifest["runs"]:
        if "model" not in run and not run["check"]:
            typer.echo(f"{run['name']}: {run['state']}, nothing to place")
    if written:
        typer.echo(f"{written} speeds written to {root / TABLE}")
    if not stages:
        typer.echo(f"session {manifest['session']}: no finished run to place")
        return
    typer.echo(f"placed session {manifest['session']}: {len(placed)} runs; record them:\n"
               f"dvc commit -f {' '.join(stages)}\ndvc status {' '.join(stages)}")


@app.command("pack-data")
def pack_data(root: Path = typer.Option(Path("."), help="the repository root"),
              out: Path = typer.Option(Path(".carry/data"), help="the folder to carry; `run --data` it")) -> None:
    """Copy the data folders the deep rows' train and evaluate stages read, data/prepared
    compressed (about 29 of its 52 MiB), for `carry` to a device."""
    with user_errors():
        _, params = _load(root)
        _, folders = stage_deps(root, params.recipes)
        for rel in folders:
            source, target = root / rel, out / Path(rel).relative_to("data")
            digest = data_digest(source)
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)
            if rel == "data/prepared":  # the others as they are (data/corrupted checks its bytes)
                with np.load(source / PREPARED_ARRAYS) as arrays:
                    content = {name: arrays[name] for name in arrays.files}
                with atomic_path(target / PREPARED_ARRAYS) as tmp, open(tmp, "wb") as f:
                    np.savez_compressed(f, **content)
            if data_digest(target) != digest:
                raise UserError(f"{target} does not read back as {source}: disk full?")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / MIB
    typer.echo(f"{out}: {', '.join(folders)} in {size:.1f} MiB; carry it and `run --data {out}`")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
