"""Fashion-MNIST files: fetching, verification, IDX parsing, splits and the prepared arrays."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fashionbench.dataset import FILES, IMAGE_SIDE
from fashionbench.errors import UserError
from fashionbench.io import atomic_path, write_json
from fashionbench.params import Sizes

HOW_TO_GET = (
    "To get the data: install Debian's package (apt-get install dataset-fashion-mnist), "
    "or allow access to the official mirror, or put the four official files (.gz or not) "
    "in a directory and list it first under download.sources in params.yaml."
)


class DataError(UserError):
    """The data is missing, corrupt or unreadable; the message says which file and what to do."""


# ---------------------------------------------------------------- IDX


def parse_idx(content: bytes, name: str = "IDX file") -> np.ndarray:
    """Decode an IDX (unsigned byte) array, checking its header against its length."""
    if len(content) < 4 or content[0] != 0 or content[1] != 0:
        raise DataError(f"{name}: not an IDX file (bad magic number)")
    if content[2] != 0x08:
        raise DataError(f"{name}: element type 0x{content[2]:02x} is not unsigned byte")
    ndim = content[3]
    header = 4 + 4 * ndim
    if len(content) < header:
        raise DataError(f"{name}: truncated header")
    shape = tuple(int.from_bytes(content[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(content) != expected:
        raise DataError(f"{name}: {len(content)} bytes where the header {shape} implies {expected}: "
                        "the file is truncated or corrupt")
    return np.frombuffer(content, dtype=np.uint8, offset=header).reshape(shape)


def decompress(content: bytes, name: str) -> bytes:
    """Raw IDX bytes from a gzip or plain file."""
    if content[:2] != b"\x1f\x8b":
        return content
    try:
        return gzip.decompress(content)
    except (OSError, EOFError) as err:
        raise DataError(f"{name}: gzip stream is truncated or corrupt ({err})") from err


def verify(content: bytes, name: str) -> None:
    """Raise DataError unless `content` is the official decompressed file `name`."""
    digest = hashlib.sha256(content).hexdigest()
    if digest != FILES[name]:
        parse_idx(content, name)  # a structural fault gives the more precise message
        raise DataError(f"{name}: SHA-256 {digest[:12]}... does not match the official "
                        f"{FILES[name][:12]}...: the file is corrupt or not Fashion-MNIST")


# ---------------------------------------------------------------- fetching


def _read_source(source: str, name: str, timeout: float) -> bytes:
    """The bytes of `name` (.gz preferred) from a directory or a URL base."""
    if "://" in source:
        return _http_get(f"{source.rstrip('/')}/{name}.gz", timeout)
    for candidate in (Path(source) / f"{name}.gz", Path(source) / name):
        if candidate.is_file():
            return candidate.read_bytes()
    raise FileNotFoundError(f"no {name}[.gz] in {source}")


def _http_get(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "fashionbench"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        chunks = []
        with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1]) as bar:
            while chunk := response.read(1 << 16):
                chunks.append(chunk)
                bar.update(len(chunk))
    return b"".join(chunks)


def fetch_file(name: str, sources: tuple[str, ...], timeout: float) -> bytes:
    """Verified decompressed content of `name` from the first source that has it intact."""
    failures = []
    for source in sources:
        try:
            content = decompress(_read_source(source, name, timeout), name)
            verify(content, name)
            return content
        except (OSError, DataError) as err:  # URLError and timeouts are OSErrors
            failures.append(f"  {source}: {err}")
    raise DataError(f"could not get a verified copy of {name}. Sources tried:\n"
                    + "\n".join(failures) + f"\n{HOW_TO_GET}")


def download(sources: tuple[str, ...], dest: Path, timeout: float) -> None:
    """Fetch and verify all four files, then replace `dest` in one step.

    Nothing is written to `dest` unless every file is verified, so a failed run leaves the
    previous data as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        for name in FILES:
            (staging / name).write_bytes(fetch_file(name, sources, timeout))
        _swap_in(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, dest: Path) -> None:
    old = dest.with_name(f".{dest.name}-old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- raw and prepared arrays


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, IMAGE_SIDE, IMAGE_SIDE) uint8
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


def load_raw(raw_dir: Path) -> tuple[Split, Split]:
    """The official train and test sets from the verified raw directory."""
    arrays = {}
    for name in FILES:
        path = Path(raw_dir) / name
        if not path.is_file():
            raise DataError(f"{path} is missing: run `dvc repro download` first")
        arrays[name] = parse_idx(path.read_bytes(), name)
    train = Split(arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"].astype(np.int64))
    test = Split(arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"].astype(np.int64))
    return train, test


def stratified_take(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, class-stratified sample of `size` items."""
    from sklearn.model_selection import train_test_split

    if size == 0:
        return np.zeros(0, dtype=np.int64)
    if size == len(labels):
        return np.arange(len(labels))
    taken, _ = train_test_split(np.arange(len(labels)), train_size=size, stratify=labels,
                                random_state=seed)
    return np.sort(taken)


@dataclass(frozen=True)
class Prepared:
    train: Split
    val: Split | None
    test: Split
    mean: float  # of training pixels scaled to [0, 1]
    std: float


PREPARED_ARRAYS = "arrays.npz"
PREPARED_STATS = "norm.json"


def prepare(train: Split, test: Split, sizes: Sizes) -> Prepared:
    """Carve a stratified validation split from train, then optional stratified subsets of the
    rest and of the test set (the quick run's sizes)."""
    val_idx = stratified_take(train.labels, sizes.validation_size, sizes.seed)
    rest = np.setdiff1d(np.arange(len(train)), val_idx)
    if sizes.subset_size:
        rest = rest[stratified_take(train.labels[rest], sizes.subset_size, sizes.seed)]
    if sizes.test_size and sizes.test_size < len(test):
        keep = stratified_take(test.labels, sizes.test_size, sizes.seed)
        test = Split(test.images[keep], test.labels[keep])
    fit = Split(train.images[rest], train.labels[rest])
    val = Split(train.images[val_idx], train.labels[val_idx]) if sizes.validation_size else None
    pixels = fit.images.astype(np.float64) / 255.0
    return Prepared(fit, val, test, float(pixels.mean()), float(pixels.std()))


def save_prepared(prepared: Prepared, out_dir: Path) -> None:
    """Write the arrays and the normalisation stats, each atomically (a pair half-replaced by
    a full disk between the two writes is caught by load_prepared)."""
    out_dir = Path(out_dir)
    arrays = {"train_x": prepared.train.images, "train_y": prepared.train.labels.astype(np.uint8),
              "test_x": prepared.test.images, "test_y": prepared.test.labels.astype(np.uint8)}
    if prepared.val is not None:
        arrays |= {"val_x": prepared.val.images, "val_y": prepared.val.labels.astype(np.uint8)}
    with atomic_path(out_dir / PREPARED_ARRAYS) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    write_json(out_dir / PREPARED_STATS, {
        "mean": prepared.mean, "std": prepared.std, "train": len(prepared.train),
        "val": len(prepared.val) if prepared.val is not None else 0, "test": len(prepared.test)})


REBUILD_PREPARED = "rebuild it with `dvc repro -f preprocess`"


def load_prepared(prepared_dir: Path = Path("data/prepared")) -> Prepared:
    """The one loader every training and evaluation stage uses; a missing, truncated or
    mismatched file is a DataError naming it."""
    prepared_dir = Path(prepared_dir)
    arrays_path, stats_path = prepared_dir / PREPARED_ARRAYS, prepared_dir / PREPARED_STATS
    if not arrays_path.is_file() or not stats_path.is_file():
        raise DataError(f"{prepared_dir} has no prepared data: run `dvc repro preprocess` first")
    try:
        with np.load(arrays_path) as arrays:
            splits = {prefix: Split(arrays[f"{prefix}_x"], arrays[f"{prefix}_y"].astype(np.int64))
                      for prefix in ("train", "val", "test") if f"{prefix}_x" in arrays}
    except Exception as err:  # zipfile, pickle, OS or key errors: all mean an unreadable file
        raise DataError(f"{arrays_path} is unreadable ({type(err).__name__}: {err}): "
                        f"{REBUILD_PREPARED}") from None
    try:
        stats = json.loads(stats_path.read_text())
        mean, std = float(stats["mean"]), float(stats["std"])
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{stats_path} is unreadable ({type(err).__name__}: {err}): "
                        f"{REBUILD_PREPARED}") from None
    for name in ("train", "test"):
        if name not in splits or splits[name].images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
            raise DataError(f"{arrays_path} has no valid {name} split: {REBUILD_PREPARED}")
    # The stats must be those of these arrays: same split sizes, same training-pixel mean.
    counts = {name: len(splits[name]) if name in splits else 0 for name in ("train", "val", "test")}
    train_mean = float(splits["train"].images.mean(dtype=np.float64)) / 255.0
    if any(stats.get(k) != n for k, n in counts.items()) or not std > 0 or abs(train_mean - mean) > 1e-9:
        raise DataError(f"{stats_path} does not match {arrays_path}: {REBUILD_PREPARED}")
    return Prepared(splits["train"], splits.get("val"), splits["test"], mean, std)
