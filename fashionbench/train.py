"""The one training engine every deep stage uses.

The training split lives on the device as one uint8 tensor; each epoch draws a seeded
permutation and every batch is augmented and normalised there. The loop never waits on the
device: loss, accuracy and the first non-finite step are summed on the device and read once
per epoch. train_one_epoch and evaluate have no side effects; fit adds checkpoints (resumed
bit-identically on CPU), a progress bar and a per-epoch callback for the stage's logger.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from fashionbench.augment import as_nchw, augment_batch, centre_crop, enlarge, input_view, mix_batch, normalise
from fashionbench.data import Prepared, Split
from fashionbench.dataset import FASHION_MNIST, Dataset
from fashionbench.distributed import Group
from fashionbench.errors import UserError
from fashionbench import distributed, machine
from fashionbench.lookahead import Lookahead
from fashionbench.io import atomic_path, exclusive_lock, write_json
from fashionbench.models import build_model, count_parameters, describe, save_trained
from fashionbench.params import Params, ParamsError, TrainRecipe, reading
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
    compile: str = "none"  # torch.compile mode of the training forward (resolve_compile)

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
    """auto -> cuda, then mps, then cpu; an explicit device that is absent is a UserError.
    CUDA means one GPU: LOCAL_RANK's under torchrun, else the first one free (distributed.claim_gpu)."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        name = next(kind for kind, ok in available.items() if ok)
    if not available.get(name, False):
        raise UserError(f"device {name!r} is not available on this machine: set device: auto or cpu")
    return torch.device("cuda", distributed.claim_gpu()) if name == "cuda" else torch.device(name)


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


def resolve_compile(mode: str, device: torch.device | str, *, quick: bool = False,
                    data_parallel: bool = False) -> str:
    """compile auto -> reduce-overhead (CUDA graphs) for one process on CUDA: a 28x28 step is
    bound by kernel launches there, and replaying them as graphs was the one big switch
    (2.1-2.2x, bench/results-gpu-h200.md). Elsewhere none: on the CPU and MPS (CPU runs stay
    as they were), for the quick check (one short epoch would mostly compile) and under
    torchrun (graphs around DDP's gradient hooks are unmeasured). An explicit mode is kept."""
    if mode != "auto":
        return mode
    cuda = torch.device(device).type == "cuda"
    return "reduce-overhead" if cuda and not quick and not data_parallel else "none"


def make_runtime(recipe: TrainRecipe, *, quick: bool = False) -> Runtime:
    """precision auto = bf16 autocast where bf16 is native, else fp32; channels_last on CUDA
    and CPU (oneDNN's convolutions are fastest in NHWC), not on MPS; compile auto: see
    resolve_compile. So on CUDA a recipe trains with bf16, channels_last and CUDA graphs unless
    it sets precision, channels_last or compile itself."""
    device = resolve_device(recipe.device)
    bf16 = recipe.precision == "bf16" or (recipe.precision == "auto" and native_bf16(device))
    nhwc = recipe.channels_last and device.type in ("cuda", "cpu")
    mode = resolve_compile(recipe.compile, device, quick=quick, data_parallel=distributed.launched())
    return Runtime(device, torch.bfloat16 if bf16 else None, nhwc, mode)


def model_for(name: str, arch: Any, recipe: TrainRecipe, dataset: Dataset) -> nn.Module:
    """Registry model `name` built for `dataset`'s images at the recipe's input size."""
    side = recipe.input_size or dataset.side
    return build_model(name, arch, (dataset.channels, side, side), dataset.num_classes)


def to_device(split: Split, device: torch.device) -> tuple[Tensor, Tensor]:
    """uint8 images (N,C,H,W) and int64 labels (N,) on `device`."""
    images = as_nchw(torch.from_numpy(split.images).to(device))
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
    """AdamW (beta1 = momentum); SGD: Nesterov with momentum > 0, plain at momentum 0; Ranger:
    RAdam (beta1 = momentum, decoupled weight decay) in Lookahead with its published k = 6,
    alpha = 0.5."""
    params = param_groups(model, recipe)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                               nesterov=recipe.momentum > 0, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "ranger":
        radam = torch.optim.RAdam(params, lr=recipe.lr, betas=(recipe.momentum, 0.999), eps=1e-5,
                                  weight_decay=recipe.weight_decay, decoupled_weight_decay=True)
        return Lookahead(radam, k=6, alpha=0.5)
    return torch.optim.AdamW(params, lr=recipe.lr, betas=(recipe.momentum, 0.999),
                             weight_decay=recipe.weight_decay, fused=device.type == "cuda")


def param_groups(model: nn.Module, recipe: TrainRecipe) -> list[dict]:
    """The optimiser's parameter groups: one, or with bn_bias_lr != 1 a second one holding the
    batch-norm biases at that multiple of the lr and the weight decay divided by it (airbench:
    64x, so the biases move fast while their decay per step stays as it was)."""
    params = list(model.parameters())
    if recipe.bn_bias_lr == 1:
        return [{"params": params}]
    fast = {id(m.bias) for m in _batch_norms(model) if m.bias is not None and m.bias.requires_grad}
    return [{"params": [p for p in params if id(p) not in fast]},
            {"params": [p for p in params if id(p) in fast], "lr": recipe.lr * recipe.bn_bias_lr,
             "weight_decay": recipe.weight_decay / recipe.bn_bias_lr}]


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: TrainRecipe,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per batch. onecycle: torch's OneCycleLR with the recipe's knobs (momentum
    is held at the recipe's value, not cycled); cosine: linear warmup then cosine to 0;
    constant: linear warmup then lr; step: linear warmup, then lr times step_gamma after every
    step_epochs epochs; linear: linear warmup, then linearly to 0 at the last step. Each
    parameter group keeps its lr's ratio to the recipe's (param_groups)."""
    total = recipe.epochs * steps_per_epoch
    if recipe.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=total, pct_start=recipe.pct_start,
            div_factor=recipe.div_factor, final_div_factor=recipe.final_div_factor,
            cycle_momentum=False)
    warmup = round(recipe.warmup_epochs * steps_per_epoch)
    cosine = recipe.schedule == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if recipe.schedule == "step":
            return recipe.step_gamma ** int((step - warmup) / (recipe.step_epochs * steps_per_epoch))
        if recipe.schedule == "linear":
            return max(0.0, 1 - (step - warmup) / max(1, total - warmup))
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
                    epoch_images: int = 0, progress: tqdm | None = None, group: Group = Group(),
                    num_classes: int = FASHION_MNIST.num_classes) -> dict:
    """One pass over a seeded permutation of (images uint8 (N,1,H,W), labels) on the device,
    or over its first `epoch_images` images when that is set (the quick run).

    With several processes (`group`), every process augments the same global batch and
    trains on its slice of it; the returned figures are over all processes.

    Returns train_loss, train_acc (against the unmixed labels), lr (at the end), images,
    epoch_time_s and images_per_s. Raises DivergedError on a non-finite loss.
    """
    model.train()
    n = min(len(labels), epoch_images or len(labels))
    batch = min(recipe.batch_size, n)
    steps = steps_per_epoch(n, batch)
    order = torch.randperm(len(labels), generator=gen, device=gen.device)[:n]
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    first_bad = torch.full((), -1, dtype=torch.long, device=images.device)
    params = [p for p in model.parameters() if p.requires_grad]
    start = time.perf_counter()
    for step in range(steps):
        idx = order[step * batch:(step + 1) * batch]
        x = augment_batch(images[idx], recipe.augment, gen, mean, std, recipe.input_size,
                          index=idx, epoch=epoch)
        y = labels[idx]
        x, target = mix_batch(x, y, recipe.augment, gen, num_classes)
        x, y, target = group.shard(x), group.shard(y), group.shard(target)
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
        loss_sum += loss * len(y)
        correct += (logits.argmax(dim=1) == y).sum()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        if progress is not None:
            progress.update(len(idx))
    group.sum(loss_sum)  # in place: totals over every process
    group.sum(correct)
    group.max(first_bad)
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
        x = normalise(images[start:start + batch_size], mean, std)
        y = labels[start:start + batch_size]
        with runtime.autocast():
            logits = model(runtime.prepare_input(x)).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(dim=1) == y).sum()
    model.train(was_training)
    return {"loss": float(loss_sum) / len(labels), "acc": int(correct) / len(labels)}


# ---------------------------------------------------------------- precise batch norm


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def precise_bn(model: nn.Module, images: Tensor, *, mean: float, std: float, batch_size: int,
               runtime: Runtime) -> int:
    """Give every batch-norm layer the mean and variance of its inputs over `images` (uint8,
    training data, no augmentation) under the final weights, and return the layers updated.

    Running statistics are an average over the last few hundred steps; with a learning rate
    that stays high they describe weights that no longer exist, and eval-mode accuracy can
    fall far below the batch-statistics one. Each layer sees batch-normalised inputs as in
    training (dropout and drop-path off); its statistics are exact over all `images`.
    """
    norms = _batch_norms(model)
    if not norms:
        return 0
    sums: dict[nn.Module, list[Tensor]] = {}

    def accumulate(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        x = inputs[0].float()
        dims = [d for d in range(x.dim()) if d != 1]
        count = x.numel() // x.shape[1]
        stats = sums.setdefault(module, [torch.zeros(x.shape[1], device=x.device, dtype=torch.float64)
                                         for _ in range(2)] + [0])
        stats[0] += x.sum(dims).double()
        stats[1] += (x * x).sum(dims).double()
        stats[2] += count

    was_training = model.training
    model.eval()
    hooks = [bn.register_forward_pre_hook(accumulate) for bn in norms]
    for bn in norms:
        bn.train()  # normalise by batch statistics, as in training
    try:
        for start in range(0, len(images), batch_size):
            x = normalise(images[start:start + batch_size], mean, std)
            with runtime.autocast():
                model(runtime.prepare_input(x))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    for bn in norms:
        total, squares, count = sums[bn]
        mu = total / count
        var = (squares / count - mu * mu).clamp_(min=0) * (count / max(1, count - 1))
        bn.running_mean.copy_(mu)
        bn.running_var.copy_(var)
    return len(norms)


# ---------------------------------------------------------------- checkpoints


def checkpoint_root() -> Path:
    """Where resumable checkpoints live: $FASHIONBENCH_CHECKPOINTS, else ~/.cache/fashionbench.

    Outside the workspace on purpose: a checkpoint is a resume aid for one exact run, named
    by its fingerprint (params, code, data), so it never makes DVC re-run or skip a stage,
    and an experiment's temporary workspace resumes the same run just the same.
    """
    default = Path.home() / ".cache" / "fashionbench" / "checkpoints"
    return Path(os.environ.get("FASHIONBENCH_CHECKPOINTS", default))


class RunLockedError(UserError):
    """Another process is training the same run."""


def run_lock(folder: Path) -> contextlib.AbstractContextManager[None]:
    """Hold an exclusive lock on `folder` for the duration; refuse at once, naming the
    holder's PID, if another process has it (the holder's PID stays in the lock file)."""
    def refuse(holder: int | None) -> RunLockedError:
        pid, kill = (f"PID {holder}, ", f"`kill {holder}`; ") if holder else ("", "")
        return RunLockedError(
            f"another process is training this run ({pid}lock {folder / 'lock'}): wait for it or "
            f"stop it ({kill}an interrupted `dvc repro` may have left it running)")
    return exclusive_lock(folder / "lock", refuse)


def _discard_unreadable(root: Path, before: float) -> None:
    """Remove checkpoints set aside as unreadable before `before` (a time.time()), and the run
    folders left empty: the warning that named them was given to an earlier run."""
    if not root.is_dir():
        return
    emptied = set()
    for aside in root.glob("*/*.unreadable"):
        with contextlib.suppress(OSError):
            if aside.stat().st_mtime < before:
                aside.unlink()
                emptied.add(aside.parent)
    for folder in root.iterdir():  # older only: a run starting now may have just made its own
        with contextlib.suppress(OSError):  # not empty, or not a folder: kept
            if folder in emptied or folder.is_dir() and folder.stat().st_mtime < before:
                folder.rmdir()


def _remove_run_folder(folder: Path, started: float) -> None:
    """A finished run's folder goes whole, but for checkpoints this run set aside as
    unreadable (its warning named them; the next run's start removes them)."""
    for path in folder.iterdir():
        with contextlib.suppress(OSError):
            if not (path.name.endswith(".unreadable") and path.stat().st_mtime >= started):
                path.unlink()
    with contextlib.suppress(OSError):  # kept while it holds one
        folder.rmdir()


def _load_checkpoint(path: Path, device: torch.device) -> dict | None:
    """The saved state, or None; an unreadable file is set aside with a warning naming it."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # truncated or foreign: any unpickling error
        aside = path.with_name(path.name + ".unreadable")
        os.replace(path, aside)
        os.utime(aside)  # set aside now: the next run's cleanup keeps it until then
        log.warning("checkpoint %s is unreadable (%s: %s); moved to %s, training from epoch 0",
                    path, type(err).__name__, err, aside)
        return None


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:  # a kill mid-write leaves the previous checkpoint intact
        torch.save(state, tmp)


# ---------------------------------------------------------------- the whole run


@dataclass
class FitResult:
    model: nn.Module  # the final weights (the EMA when enabled), eval mode
    history: list[dict] = field(default_factory=list)  # one metrics dict per epoch
    device: str = "cpu"
    precise_bn: dict = field(default_factory=dict)  # images, layers, eval accuracy before/after
    precision: str = "fp32"  # what the training steps computed in: bf16 (autocast) or fp32

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
    files = [Path(__file__), root / "augment.py", root / "seeding.py", root / "distributed.py",
             root / "params.py", root / "data.py", root / "models" / "__init__.py",
             Path(inspect.getfile(type(model)))]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def fingerprint(model: nn.Module, model_name: str, arch: Any, recipe: TrainRecipe, seed: int,
                train: Split, val: Split | None, mean: float, std: float, epoch_images: int) -> str:
    """Names one exact run: same params, data and code. A checkpoint resumes only its run."""
    data = hashlib.sha256()
    for split in (train, val) if val is not None else (train,):
        data.update(split.images.tobytes())
        data.update(split.labels.tobytes())
    config = {"model": model_name, "arch": asdict(arch), "recipe": asdict(recipe), "seed": seed,
              "data": data.hexdigest(), "mean": mean, "std": std, "code": _code_digest(model),
              "epoch_images": epoch_images}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def fit(model_name: str, arch: Any, recipe: TrainRecipe, train: Split, val: Split | None, *,
        mean: float, std: float, seed: int, checkpoint_dir: Path | None = None,
        epoch_images: int = 0, on_epoch: EpochCallback | None = None,
        progress: bool = True, dataset: Dataset = FASHION_MNIST) -> FitResult:
    """Train registry model `model_name` with `recipe` from seed `seed` on images of `dataset`.

    With `checkpoint_dir`, the run's folder there (named by its fingerprint) is locked for
    the duration, the full state (model, optimiser, scheduler, EMA, RNG, history) is saved
    every `checkpoint_every` epochs, and an unfinished run resumes (on CPU bit-identical to an
    uninterrupted one). A finished run deletes its run folder, so a forced re-run starts from
    epoch 0; a run's start deletes the unreadable checkpoints set aside before it, and the
    folders they leave empty. `on_epoch` receives each epoch's metrics, resumed epochs first.
    """
    started = time.time()
    if not recipe.input_size:  # 0: as stored
        with reading(dataset):
            recipe = replace(recipe, input_size=dataset.side)
    runtime = make_runtime(recipe, quick=epoch_images > 0)  # epoch_images: the quick check's
    group = distributed.start(runtime.device, recipe.batch_size)
    gen = seed_everything(seed, runtime.device)
    model = model_for(model_name, arch, recipe, dataset).to(runtime.device)
    run_dir = None
    if checkpoint_dir is not None:
        run_dir = checkpoint_dir / fingerprint(model, model_name, arch, recipe, seed, train, val,
                                               mean, std, epoch_images)[:16]
        if group.is_main:
            _discard_unreadable(checkpoint_dir, started)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model, forward = distributed.wrap(model, runtime.device, group, recipe.sync_bn)
    train_x, train_y = to_device(train, runtime.device)
    train_x = enlarge(train_x, recipe.input_size)  # a 32-px recipe crops its batches from 36 px
    if not epoch_images:  # the quick check trains full recipes on a few hundred images
        _check_batch(recipe, len(train))
    init_from_data(model, train_x, recipe.input_size, mean, std)
    val_xy = None
    if val is not None and len(val):
        val_x, val_y = to_device(val, runtime.device)
        val_xy = input_view(val_x, recipe.input_size), val_y
    steps = steps_per_epoch(min(len(train), epoch_images or len(train)), recipe.batch_size)
    with run_lock(run_dir) if run_dir is not None and group.is_main else contextlib.nullcontext():
        optimizer = make_optimizer(model, recipe, runtime.device)  # after the lock: seconds
        scheduler = make_scheduler(optimizer, recipe, steps)
        ema = EMA(model, recipe.ema) if recipe.ema else None
        checkpoint = run_dir / "checkpoint.pt" if run_dir is not None else None
        history: list[dict] = []
        saved = _load_checkpoint(checkpoint, runtime.device) if checkpoint is not None else None
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            if ema is not None:
                ema.model.load_state_dict(saved["ema"])
            set_rng_state({k: _cpu(v) for k, v in saved["rng"].items()}, gen)
            history = saved["history"]
            log.warning("resuming from %s at epoch %d of %d", checkpoint, len(history), recipe.epochs)
        on_epoch = on_epoch if group.is_main else None  # one process writes curves and logs
        for metrics in history:
            if on_epoch is not None:
                on_epoch(metrics)
        on_epoch = within_budget(on_epoch, recipe) if group.is_main else None
        _train_epochs(model, forward, optimizer, scheduler, ema, history, recipe, runtime, gen,
                      train_x, train_y, val_xy, mean=mean, std=std, steps=steps,
                      epoch_images=epoch_images, checkpoint=checkpoint if group.is_main else None,
                      on_epoch=on_epoch, progress=progress and group.is_main, group=group,
                      num_classes=dataset.num_classes)
        final = ema.model if ema is not None else model
        bn = _precise_bn(final, centre_crop(train_x, recipe.input_size), train_y, recipe, runtime, gen,
                         mean, std)
        if run_dir is not None and group.is_main:  # finished: a forced re-run starts from epoch 0
            _remove_run_folder(run_dir, started)
    return FitResult(final.eval(), history, runtime.describe(), bn,
                     "bf16" if runtime.amp_dtype == torch.bfloat16 else "fp32")


def _check_batch(recipe: TrainRecipe, train_size: int) -> None:
    if recipe.batch_size > train_size:
        raise ParamsError("batch_size", f"{recipe.batch_size} is more than the {train_size} training "
                          f"images: every step would see the whole set; use at most {train_size}")


def init_from_data(model: nn.Module, train_x: Tensor, size: int, mean: float, std: float) -> None:
    """Give a model with a data-dependent initialisation (models/speedrun.py's whitening conv:
    `init_from_data`) its first `init_images` training images, normalised as it sees them,
    before the optimiser copies anything; a resumed run then loads its checkpoint over it."""
    init = getattr(model, "init_from_data", None)
    if init is not None:
        init(normalise(centre_crop(train_x[:model.init_images], size), mean, std))


def within_budget(on_epoch: EpochCallback | None, recipe: TrainRecipe) -> EpochCallback | None:
    """`on_epoch`, preceded after a freshly trained epoch 1 by the check of time_budget_s: a
    run that its first epoch shows cannot finish in time stops there, naming the key."""
    if not recipe.time_budget_s:
        return on_epoch

    def check(metrics: dict) -> None:
        seconds = metrics["time_s"]
        if metrics["epoch"] == 1 and seconds * recipe.epochs > recipe.time_budget_s:
            raise ParamsError("time_budget_s", (
                f"epoch 1 took {seconds:.1f} s on this machine, so {recipe.epochs} epochs need "
                f"about {seconds * recipe.epochs:.0f} s, more than the {recipe.time_budget_s:g} s "
                f"budget: lower epochs to {int(recipe.time_budget_s // seconds)}, train on a "
                "quieter or faster machine, or set time_budget_s: 0 (no budget)"))
        if on_epoch is not None:
            on_epoch(metrics)
    return check


def _train_epochs(model: nn.Module, forward: nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LRScheduler, ema: EMA | None,
                  history: list[dict], recipe: TrainRecipe, runtime: Runtime, gen: torch.Generator,
                  train_x: Tensor, train_y: Tensor, val_xy: tuple[Tensor, Tensor] | None, *,
                  mean: float, std: float, steps: int, epoch_images: int, checkpoint: Path | None,
                  on_epoch: EpochCallback | None, progress: bool, group: Group, num_classes: int) -> None:
    """The epochs not in `history` yet, appended to it, with checkpoints and progress.
    `forward` is `model` or its DDP wrapper; an exception from `on_epoch` (rank 0's) stops
    every process alike."""
    # reduce-overhead replays each step's kernels as CUDA graphs: at 28x28 a WRN step is
    # bound by kernel launches, not arithmetic (bench/results-gpu-h200.md)
    forward = torch.compile(forward, mode=runtime.compile) if runtime.compile != "none" else forward
    final = ema.model if ema is not None else model
    per_epoch = steps * min(recipe.batch_size, len(train_y))
    with tqdm(total=recipe.epochs * per_epoch, initial=len(history) * per_epoch, unit="img",
              unit_scale=True, disable=None if progress else True) as bar:  # None: off when not a TTY
        for epoch in range(len(history) + 1, recipe.epochs + 1):
            start = time.perf_counter()
            metrics = {"epoch": epoch, **train_one_epoch(
                forward, optimizer, scheduler, train_x, train_y, recipe, gen, mean=mean, std=std,
                runtime=runtime, ema=ema, epoch=epoch, epoch_images=epoch_images, progress=bar,
                group=group, num_classes=num_classes)}
            if val_xy is not None:
                scores = evaluate(final, *val_xy, mean=mean, std=std,
                                  batch_size=recipe.eval_batch_size, runtime=runtime)
                metrics |= {"val_loss": scores["loss"], "val_acc": scores["acc"]}
            metrics["time_s"] = time.perf_counter() - start
            history.append(metrics)
            if checkpoint is not None and epoch % recipe.checkpoint_every == 0 and epoch < recipe.epochs:
                _save_checkpoint(checkpoint, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "ema": ema.model.state_dict() if ema is not None else None,
                    "rng": rng_state(gen), "history": history})
            bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items() if k.endswith(("loss", "acc"))})
            stop = None
            if on_epoch is not None:
                try:
                    on_epoch(metrics)
                except Exception as err:  # e.g. the runner's time budget: every process stops
                    stop = err
            stop = group.from_main(stop)
            if stop is not None:
                raise stop


def _precise_bn(model: nn.Module, train_x: Tensor, train_y: Tensor, recipe: TrainRecipe,
                runtime: Runtime, gen: torch.Generator, mean: float, std: float) -> dict:
    """Run precise_bn on a seeded sample of `recipe.precise_bn` training images and measure
    eval-mode accuracy on the same images before and after (training data only)."""
    if not recipe.precise_bn or not _batch_norms(model):
        return {}
    start = time.perf_counter()
    pick = torch.randperm(len(train_y), generator=gen, device=gen.device)[:recipe.precise_bn]
    images, labels = train_x[pick], train_y[pick]
    kw = {"mean": mean, "std": std, "batch_size": recipe.eval_batch_size, "runtime": runtime}
    before = evaluate(model, images, labels, **kw)["acc"]
    layers = precise_bn(model, images, **kw)
    after = evaluate(model, images, labels, **kw)["acc"]
    return {"precise_bn_images": len(labels), "precise_bn_layers": layers,
            "precise_bn_train_acc_before": before, "precise_bn_train_acc_after": after,
            "precise_bn_time_s": round(time.perf_counter() - start, 3)}


def _cpu(value: Any) -> Any:
    # RNG states must be CPU byte tensors whatever map_location the checkpoint was loaded with.
    if isinstance(value, Tensor):
        return value.cpu()
    return [v.cpu() for v in value]


def describe_recipe(recipe: TrainRecipe, epoch_images: int = 0) -> str:
    """One line saying how a deep row was trained, for tables."""
    schedule = (f"step x{recipe.step_gamma:g} every {recipe.step_epochs:g} epochs"
                if recipe.schedule == "step" else recipe.schedule)
    words = [recipe.optimizer, schedule]
    if recipe.label_smoothing:
        words.append(f"LS {recipe.label_smoothing:g}")
    if recipe.bn_bias_lr != 1:
        words.append(f"BN-bias lr x{recipe.bn_bias_lr:g}")
    if recipe.ema:
        words.append(f"EMA {recipe.ema:g}")
    aug = recipe.augment
    parts = [f"crop pad {aug.crop_pad}" if aug.crop_pad else "", f"translate {aug.translate:g}" if aug.translate else "",
             (f"hflip {aug.hflip:g}" + (" alternating" if aug.alternate_flip else "")) if aug.hflip else "",
             f"jitter {aug.jitter:g} p {aug.jitter_p:g}" if aug.jitter and aug.jitter_p else "",
             f"erase p {aug.erase_p:g}" if aug.erase_p else "", f"cutout {aug.cutout}" if aug.cutout else "",
             f"mixup {aug.mixup:g}" if aug.mixup else "", f"cutmix {aug.cutmix:g}" if aug.cutmix else ""]
    augment = ", ".join(p for p in parts if p) or "no augmentation"
    images = f" of {epoch_images} images" if epoch_images else ""
    return (f"{' '.join(words)} lr {recipe.lr:g}, batch {recipe.batch_size}; {augment}; "
            f"{recipe.epochs} epoch{'s' if recipe.epochs > 1 else ''}{images}")


def train_and_save(row: str, params: Params, data: Prepared, seed: int, run_dir: Path,
                   metrics_path: Path, *, on_epoch: EpochCallback | None = None,
                   progress: bool = True) -> dict:
    """Train deep row `row` (cnn, resnet7, mlp, wrn, se_wrn, ...) for one seed.

    Writes run_dir/model.pt and the metrics JSON, and returns the metrics (under torchrun:
    rank 0 only; the other processes return {}). Only the train and validation splits are used.
    """
    recipe, epoch_images = params.recipe(row), params.epoch_images(row)
    try:
        result = fit(recipe.model, recipe.arch, recipe, data.train, data.val, mean=data.mean,
                     std=data.std, seed=seed, checkpoint_dir=checkpoint_root(), epoch_images=epoch_images,
                     on_epoch=on_epoch, progress=progress, dataset=params.dataset)
    except ParamsError as err:  # fit names the recipe's key; params.yaml spells it under the row
        raise err.under(row) from None
    if not distributed.is_main():
        return {}  # rank 0 writes the run's outputs
    save_trained(run_dir / "model.pt", result.model, recipe.model, recipe.arch, mean=data.mean,
                 std=data.std, seed=seed, epochs=recipe.epochs, hflip=recipe.augment.hflip,
                 dataset=params.dataset, input_size=recipe.input_size, tta_shift=recipe.tta_shift)
    last = result.history[-1]
    metrics = {
        "run": f"{row}-seed{seed}", "model": recipe.model,
        "architecture": describe(recipe.model, recipe.arch,
                                 (params.dataset.channels, recipe.input_size, recipe.input_size),
                                 params.dataset.num_classes),
        "recipe": describe_recipe(recipe, epoch_images),
        "parameters": count_parameters(result.model), "epochs": recipe.epochs,
        "train_size": len(data.train), "val_size": len(data.val) if data.val is not None else 0,
        "wall_time_s": round(result.wall_time_s, 3), "train_images_per_s": round(result.images_per_s, 1),
        **machine.describe(result.device), "precision": result.precision,
        "torch_version": torch.__version__, "seed": seed,
        "quick": params.quick, "trained_with_flips": recipe.augment.hflip > 0,
        **{k: last[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc") if k in last},
        **result.precise_bn,
    }
    write_json(metrics_path, metrics)
    return metrics
