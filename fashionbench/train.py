"""The one training engine every deep stage uses.

The training split lives on the device as one uint8 tensor; each epoch draws a seeded
permutation and every batch is augmented and normalised there. The loop never waits on the
device: loss, accuracy and the first non-finite step are summed on the device and read once
per epoch. train_one_epoch and evaluate have no side effects; fit adds checkpoints (resumed
bit-identically on CPU), a progress bar and a per-epoch callback for the stage's logger.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from fashionbench.augment import augment_batch, mix_batch
from fashionbench.data import Prepared, Split
from fashionbench.errors import UserError
from fashionbench.models import build_model, count_parameters, model_arch, save_trained
from fashionbench.params import Params, TrainRecipe
from fashionbench.seeding import rng_state, seed_everything, set_rng_state

log = logging.getLogger(__name__)

EpochCallback = Callable[[dict], None]


class DivergedError(UserError):
    """The training loss became NaN or infinite."""


# ---------------------------------------------------------------- device and precision


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed."""

    device: torch.device
    amp_dtype: torch.dtype | None = None  # autocast dtype; None = plain fp32
    channels_last: bool = False

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def prepare_input(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def describe(self) -> str:
        if self.device.type == "cuda":
            return f"cuda ({torch.cuda.get_device_name(self.device)})"
        return self.device.type


def resolve_device(name: str) -> torch.device:
    """auto -> cuda, then mps, then cpu; an explicit device that is absent is a UserError."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(kind for kind, ok in available.items() if ok))
    if not available.get(name, False):
        raise UserError(f"device {name!r} is not available on this machine: set device: auto or cpu")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix work runs natively: CUDA, or a CPU with AVX512-BF16 or AMX.

    Elsewhere bf16 is emulated on the CPU and slower than fp32, so precision auto keeps fp32.
    """
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def make_runtime(recipe: TrainRecipe) -> Runtime:
    """precision auto = bf16 autocast where bf16 is native, else fp32; channels_last on CUDA
    and CPU (oneDNN's convolutions are fastest in NHWC), not on MPS."""
    device = resolve_device(recipe.device)
    bf16 = recipe.precision == "bf16" or (recipe.precision == "auto" and native_bf16(device))
    nhwc = recipe.channels_last and device.type in ("cuda", "cpu")
    return Runtime(device, torch.bfloat16 if bf16 else None, nhwc)


def to_device(split: Split, device: torch.device) -> tuple[Tensor, Tensor]:
    """uint8 images (N,1,28,28) and int64 labels (N,) on `device`."""
    images = torch.from_numpy(split.images).to(device).unsqueeze(1)
    return images, torch.from_numpy(split.labels).to(device)


# ---------------------------------------------------------------- optimisation


class EMA:
    """Exponential moving average of a model's weights (and float buffers), updated per step."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        ours, theirs = self.model.state_dict(), model.state_dict()
        self._floats = [(ours[k], v) for k, v in theirs.items() if v.is_floating_point()]
        self._others = [(ours[k], v) for k, v in theirs.items() if not v.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the source model's current weights."""
        ours, theirs = zip(*self._floats)
        torch._foreach_lerp_(list(ours), list(theirs), 1 - self.decay)
        for mine, source in self._others:
            mine.copy_(source)


def make_optimizer(model: nn.Module, recipe: TrainRecipe, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (beta1 = momentum) or SGD with Nesterov momentum."""
    params = model.parameters()
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, nesterov=True,
                               weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(params, lr=recipe.lr, betas=(recipe.momentum, 0.999),
                             weight_decay=recipe.weight_decay, fused=device.type == "cuda")


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: TrainRecipe,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per batch. onecycle: torch's OneCycleLR with the recipe's knobs (momentum
    is held at the recipe's value, not cycled); cosine: linear warmup then cosine to 0;
    constant: linear warmup then lr."""
    total = recipe.epochs * steps_per_epoch
    if recipe.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=recipe.lr, total_steps=total, pct_start=recipe.pct_start,
            div_factor=recipe.div_factor, final_div_factor=recipe.final_div_factor,
            cycle_momentum=False)
    warmup = round(recipe.warmup_epochs * steps_per_epoch)
    cosine = recipe.schedule == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def steps_per_epoch(train_size: int, batch_size: int) -> int:
    """Full batches only (a batch of 1 would break batch norm); all images if fewer than one."""
    return max(1, train_size // batch_size)


# ---------------------------------------------------------------- one epoch, one evaluation


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, images: Tensor, labels: Tensor,
                    recipe: TrainRecipe, gen: torch.Generator, *, mean: float, std: float,
                    runtime: Runtime, ema: EMA | None = None, epoch: int = 1,
                    progress: tqdm | None = None) -> dict:
    """One pass over a seeded permutation of (images uint8 (N,1,28,28), labels) on the device.

    Returns train_loss, train_acc (against the unmixed labels), lr (at the end), images,
    epoch_time_s and images_per_s. Raises DivergedError on a non-finite loss.
    """
    model.train()
    n, batch = len(labels), min(recipe.batch_size, len(labels))
    steps = steps_per_epoch(n, batch)
    order = torch.randperm(n, generator=gen, device=gen.device)
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    first_bad = torch.full((), -1, dtype=torch.long, device=images.device)
    params = [p for p in model.parameters() if p.requires_grad]
    start = time.perf_counter()
    for step in range(steps):
        idx = order[step * batch:(step + 1) * batch]
        x = augment_batch(images[idx], recipe.augment, gen, mean, std)
        y = labels[idx]
        x, target = mix_batch(x, y, recipe.augment, gen)
        with runtime.autocast():
            logits = model(runtime.prepare_input(x))
        loss = F.cross_entropy(logits.float(), target, label_smoothing=recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip:
            nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update()
        loss = loss.detach()
        loss_sum += loss * len(idx)
        correct += (logits.argmax(dim=1) == y).sum()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        if progress is not None:
            progress.update(len(idx))
    bad = int(first_bad)  # the epoch's one host sync
    seconds = time.perf_counter() - start
    if bad >= 0:
        raise DivergedError(
            f"training diverged: non-finite loss at epoch {epoch}, step {bad + 1} of {steps}. "
            "Try a lower lr, grad_clip: 1.0 (gradient-norm clipping) or precision: fp32 "
            "in this model's params.yaml section.")
    seen = steps * batch
    return {"train_loss": float(loss_sum) / seen, "train_acc": int(correct) / seen,
            "lr": scheduler.get_last_lr()[0], "images": seen, "epoch_time_s": seconds,
            "images_per_s": seen / seconds}


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, *, mean: float, std: float,
             batch_size: int = 1024, runtime: Runtime | None = None) -> dict:
    """Mean cross-entropy (no smoothing) and accuracy of `model` in eval mode on uint8 images
    (N,1,28,28) or (N,28,28); the model's training mode is restored afterwards."""
    runtime = runtime or Runtime(images.device)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    for start in range(0, len(labels), batch_size):
        x = (images[start:start + batch_size].float() / 255.0 - mean) / std
        y = labels[start:start + batch_size]
        with runtime.autocast():
            logits = model(runtime.prepare_input(x)).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(dim=1) == y).sum()
    model.train(was_training)
    return {"loss": float(loss_sum) / len(labels), "acc": int(correct) / len(labels)}


# ---------------------------------------------------------------- the whole run


@dataclass
class FitResult:
    model: nn.Module  # the final weights (the EMA when enabled), eval mode
    history: list[dict] = field(default_factory=list)  # one metrics dict per epoch
    device: str = "cpu"

    @property
    def wall_time_s(self) -> float:
        """Training plus validation time over all epochs, across resumes."""
        return sum(h["time_s"] for h in self.history)

    @property
    def images_per_s(self) -> float:
        """Training throughput over all epochs."""
        return sum(h["images"] for h in self.history) / sum(h["epoch_time_s"] for h in self.history)


def _code_digest(model: nn.Module) -> str:
    """Hash of the sources that determine this run's result (the train stage's code deps)."""
    root = Path(__file__).parent
    files = [Path(__file__), root / "augment.py", root / "seeding.py", root / "models" / "__init__.py",
             Path(inspect.getfile(type(model)))]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def _fingerprint(model: nn.Module, model_name: str, arch: Any, recipe: TrainRecipe, seed: int,
                 train: Split, val: Split | None, mean: float, std: float) -> str:
    # A checkpoint resumes only the run that wrote it: same params, data and code.
    data = hashlib.sha256()
    for split in (train, val) if val is not None else (train,):
        data.update(split.images.tobytes())
        data.update(split.labels.tobytes())
    config = {"model": model_name, "arch": asdict(arch), "recipe": asdict(recipe), "seed": seed,
              "data": data.hexdigest(), "mean": mean, "std": std, "code": _code_digest(model)}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact


def fit(model_name: str, arch: Any, recipe: TrainRecipe, train: Split, val: Split | None, *,
        mean: float, std: float, seed: int, checkpoint: Path | None = None,
        on_epoch: EpochCallback | None = None, progress: bool = True) -> FitResult:
    """Train registry model `model_name` with `recipe` from seed `seed`.

    Every `checkpoint_every` epochs and at the end, the full state (model, optimiser,
    scheduler, EMA, RNG states, history) goes to `checkpoint`; a checkpoint written by the
    same params and code is resumed (on CPU the result is bit-identical to an uninterrupted
    run), any other is ignored with a warning. `on_epoch` receives each epoch's metrics
    (epoch, train_loss, train_acc, [val_loss, val_acc], lr, epoch_time_s, images_per_s,
    images, time_s), resumed epochs first, so a logger can rebuild complete curves.
    """
    runtime = make_runtime(recipe)
    gen = seed_everything(seed, runtime.device)
    model = build_model(model_name, arch).to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_x, train_y = to_device(train, runtime.device)
    val_xy = to_device(val, runtime.device) if val is not None and len(val) else None
    steps = steps_per_epoch(len(train), recipe.batch_size)
    optimizer = make_optimizer(model, recipe, runtime.device)
    scheduler = make_scheduler(optimizer, recipe, steps)
    ema = EMA(model, recipe.ema) if recipe.ema else None
    fingerprint = _fingerprint(model, model_name, arch, recipe, seed, train, val, mean, std)

    history: list[dict] = []
    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=runtime.device, weights_only=True)
        if saved.get("fingerprint") == fingerprint:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            if ema is not None:
                ema.model.load_state_dict(saved["ema"])
            set_rng_state({k: _cpu(v) for k, v in saved["rng"].items()}, gen)
            history = saved["history"]
            log.warning("resuming %s from epoch %d of %d", checkpoint, len(history), recipe.epochs)
        else:
            log.warning("ignoring %s: it was written by other params or code", checkpoint)
    for metrics in history:
        if on_epoch is not None:
            on_epoch(metrics)

    forward = torch.compile(model) if recipe.compile else model
    final = ema.model if ema is not None else model
    total = recipe.epochs * steps * min(recipe.batch_size, len(train))
    with tqdm(total=total, initial=len(history) * total // recipe.epochs, unit="img", unit_scale=True,
              desc=model_name, disable=None if progress else True) as bar:  # None: off when not a TTY
        for epoch in range(len(history) + 1, recipe.epochs + 1):
            start = time.perf_counter()
            metrics = {"epoch": epoch, **train_one_epoch(
                forward, optimizer, scheduler, train_x, train_y, recipe, gen, mean=mean, std=std,
                runtime=runtime, ema=ema, epoch=epoch, progress=bar)}
            if val_xy is not None:
                scores = evaluate(final, *val_xy, mean=mean, std=std,
                                  batch_size=recipe.eval_batch_size, runtime=runtime)
                metrics |= {"val_loss": scores["loss"], "val_acc": scores["acc"]}
            metrics["time_s"] = time.perf_counter() - start
            history.append(metrics)
            if checkpoint is not None and (epoch % recipe.checkpoint_every == 0 or epoch == recipe.epochs):
                _save_checkpoint(checkpoint, {
                    "fingerprint": fingerprint, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "ema": ema.model.state_dict() if ema is not None else None,
                    "rng": rng_state(gen), "history": history})
            bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items() if k.endswith(("loss", "acc"))})
            if on_epoch is not None:
                on_epoch(metrics)
    return FitResult(final.eval(), history, runtime.describe())


def _cpu(value: Any) -> Any:
    # RNG states must be CPU byte tensors whatever map_location the checkpoint was loaded with.
    if isinstance(value, Tensor):
        return value.cpu()
    return [v.cpu() for v in value]


def train_and_save(run: str, params: Params, data: Prepared, seed: int, run_dir: Path,
                   metrics_path: Path, *, on_epoch: EpochCallback | None = None,
                   progress: bool = True) -> dict:
    """Train deep model section `run` (cnn, resnet7, mlp, wrn, se_wrn) for one seed.

    Writes run_dir/model.pt (resuming from run_dir/checkpoint.pt) and the metrics JSON, and
    returns the metrics. Only the train and validation splits are used.
    """
    recipe = params.recipe(run)
    arch = model_arch(params, run)
    result = fit(recipe.model, arch, recipe, data.train, data.val, mean=data.mean, std=data.std,
                 seed=seed, checkpoint=run_dir / "checkpoint.pt", on_epoch=on_epoch, progress=progress)
    save_trained(run_dir / "model.pt", result.model, recipe.model, arch, mean=data.mean,
                 std=data.std, seed=seed, epochs=recipe.epochs)
    last = result.history[-1]
    metrics = {
        "run": f"{run}-seed{seed}", "model": recipe.model, "parameters": count_parameters(result.model),
        "epochs": recipe.epochs, "train_size": len(data.train), "wall_time_s": round(result.wall_time_s, 3),
        "train_images_per_s": round(result.images_per_s, 1), "device": result.device,
        "torch_version": torch.__version__, "seed": seed, "quick": params.quick,
        **{k: last[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc") if k in last},
    }
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
