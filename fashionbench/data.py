"""Dataset files: fetching, verification, IDX and CIFAR-10 parsing, splits and the prepared arrays."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fashionbench.dataset import CIFAR_TEST, CIFAR_TRAIN, FASHION_MNIST, IDX_FILES, Dataset
from fashionbench.errors import UserError
from fashionbench.io import atomic_path, write_json
from fashionbench.params import Sizes


def how_to_get(dataset: Dataset) -> str:
    """What a user can do when no source gave verified files of `dataset`."""
    if dataset.archive:
        files = f"{dataset.archive} (or its extracted files)"
    elif any(c.md5_gz for c in dataset.files.values()):
        files = f"the {len(dataset.files)} official .gz files"
    else:
        files = f"the {len(dataset.files)} files (.gz or not)"
    ways = ["install Debian's package (apt-get install dataset-fashion-mnist)"] if dataset.name == "fashion-mnist" else []
    ways += [f"allow access to {', '.join(dataset.mirrors)}"] if dataset.mirrors else []
    ways.append(f"put {files} in a directory and list it under download.sources in params.yaml")
    return "To get the data: " + ", or ".join(ways) + "."


class DataError(UserError):
    """The data is missing, corrupt or unreadable; the message says which file and what to do."""


# ---------------------------------------------------------------- IDX and CIFAR-10 formats


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


class _ArraysOnly(pickle.Unpickler):
    """CIFAR-10's batches are Python pickles; this unpickler builds numpy arrays and plain
    values only, so a foreign file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how protocol-2 pickles written by Python 3 hold bytes

    def find_class(self, module: str, name: str):  # noqa: ANN201 (pickle's protocol)
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a data file")
        return super().find_class(module, name)


def _unpickle(content: bytes, name: str) -> dict:
    try:
        loaded = _ArraysOnly(io.BytesIO(content), encoding="bytes").load()
    except Exception as err:  # any unpickling failure means the same thing: not a CIFAR batch
        raise DataError(f"{name}: not a CIFAR-10 batch file ({type(err).__name__}: {err})") from None
    if not isinstance(loaded, dict):
        raise DataError(f"{name}: not a CIFAR-10 batch file (no dictionary inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in loaded.items()}


def parse_cifar_batch(content: bytes, name: str, side: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 batch (Python pickle of `data`: N x 3*side*side uint8 rows, channel planes in
    order R, G, B, and `labels`) -> images (N, side, side, 3) uint8, labels (N,) int64."""
    batch = _unpickle(content, name)
    try:
        data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    except KeyError as err:
        raise DataError(f"{name}: not a CIFAR-10 batch file (no {err} entry)") from None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{name}: labels are not a list of integers: the file is corrupt")
    labels = labels.astype(np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * side * side or len(data) != len(labels):
        raise DataError(f"{name}: data {data.dtype} {data.shape} for {len(labels)} labels, "
                        f"expected uint8 (N, {3 * side * side}): the file is corrupt")
    return data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1).copy(), labels


def parse_cifar_meta(content: bytes, name: str = "batches.meta") -> tuple[str, ...]:
    """The class names in a CIFAR-10 batches.meta file."""
    try:
        return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in _unpickle(content, name)["label_names"])
    except KeyError:
        raise DataError(f"{name}: not a CIFAR-10 meta file (no label_names)") from None


def decompress(content: bytes, name: str) -> bytes:
    """Raw bytes from a gzip or plain file."""
    if content[:2] != b"\x1f\x8b":
        return content
    try:
        return gzip.decompress(content)
    except (OSError, EOFError) as err:
        raise DataError(f"{name}: gzip stream is truncated or corrupt ({err})") from err


def _parse(content: bytes, name: str, dataset: Dataset) -> None:
    """Raise DataError if `content` is not a well-formed file `name` of `dataset`'s format."""
    if dataset.layout == "idx":
        parse_idx(content, name)
    elif name == "batches.meta":
        parse_cifar_meta(content, name)
    else:
        parse_cifar_batch(content, name, dataset.side)


def verify(content: bytes, name: str, dataset: Dataset = FASHION_MNIST, packed: bytes | None = None) -> None:
    """Raise DataError unless `content` (decompressed) is `dataset`'s official file `name`.

    `packed` is the file as it came (a .gz), which is what MNIST's and KMNIST's published
    digests are of; a set without published checksums (`idx`) gets structure checks only."""
    checksum = dataset.files[name]
    if checksum.sha256 or checksum.md5:
        algo, expected = ("sha256", checksum.sha256) if checksum.sha256 else ("md5", checksum.md5)
        digest = hashlib.new(algo, content).hexdigest()
    elif checksum.md5_gz:
        if packed is None or packed[:2] != b"\x1f\x8b":
            raise DataError(f"{name}: {dataset.name} publishes the digest of {name}.gz only: "
                            "give the official .gz file, not an uncompressed copy")
        algo, expected, digest = "md5", checksum.md5_gz, hashlib.md5(packed).hexdigest()
    else:
        return _parse(content, name, dataset)
    if digest != expected:
        _parse(content, name, dataset)  # a structural fault gives the more precise message
        raise DataError(f"{name}: {algo.upper()} {digest[:12]}... does not match the official "
                        f"{expected[:12]}...: the file is corrupt or not {dataset.name}")


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


def fetch_file(name: str, sources: tuple[str, ...], timeout: float, dataset: Dataset = FASHION_MNIST) -> bytes:
    """Verified decompressed content of `name` from the first source that has it intact."""
    failures = []
    for source in sources:
        try:
            packed = _read_source(source, name, timeout)
            content = decompress(packed, name)
            verify(content, name, dataset, packed)
            return content
        except (OSError, DataError) as err:  # URLError and timeouts are OSErrors
            failures.append(f"  {source}: {err}")
    raise DataError(f"could not get a verified copy of {name}. Sources tried:\n"
                    + "\n".join(failures) + f"\n{how_to_get(dataset)}")


def _archive_members(source: str, dataset: Dataset, timeout: float) -> dict[str, bytes]:
    """The files of `dataset.archive` from a source: the tarball (a URL base or a directory
    holding it) or, in a directory, the extracted files themselves."""
    if "://" not in source:
        folder = Path(source)
        for where in (folder, folder / "cifar-10-batches-py"):
            if all((where / name).is_file() for name in dataset.files):
                return {name: (where / name).read_bytes() for name in dataset.files}
        if not (folder / dataset.archive).is_file():
            raise FileNotFoundError(f"neither {dataset.archive} nor its files in {source}")
        packed = (folder / dataset.archive).read_bytes()
    else:
        packed = _http_get(f"{source.rstrip('/')}/{dataset.archive}", timeout)
    if hashlib.md5(packed).hexdigest() != dataset.archive_md5:
        raise DataError(f"{dataset.archive}: MD5 does not match the official {dataset.archive_md5[:12]}...")
    members = {}
    with tarfile.open(fileobj=io.BytesIO(packed), mode="r:gz") as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.isfile() and name in dataset.files:
                members[name] = tar.extractfile(member).read()
    return members


def fetch_archive(sources: tuple[str, ...], timeout: float, dataset: Dataset) -> dict[str, bytes]:
    """Every verified file of an archived dataset (CIFAR-10), from the first source with all."""
    failures = []
    for source in sources:
        try:
            members = _archive_members(source, dataset, timeout)
            for name in dataset.files:
                if name not in members:
                    raise DataError(f"{name} is missing")
                verify(members[name], name, dataset)
            return members
        except (OSError, DataError, tarfile.TarError) as err:
            failures.append(f"  {source}: {err}")
    raise DataError(f"could not get a verified copy of {dataset.name}. Sources tried:\n"
                    + "\n".join(failures) + f"\n{how_to_get(dataset)}")


def download(sources: tuple[str, ...], dest: Path, timeout: float, dataset: Dataset = FASHION_MNIST) -> None:
    """Fetch and verify every file of `dataset` from `sources` (none: the dataset's own
    mirrors), then replace `dest` in one step.

    Nothing is written to `dest` unless every file is verified, so a failed run leaves the
    previous data as it was.
    """
    dest = Path(dest)
    sources = tuple(sources) or dataset.mirrors
    if not sources:
        raise DataError(f"{dataset.name} has no mirrors: list the directory holding its files "
                        "under download.sources in params.yaml")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        if dataset.archive:
            for name, content in fetch_archive(sources, timeout, dataset).items():
                (staging / name).write_bytes(content)
        else:
            for name in dataset.files:
                (staging / name).write_bytes(fetch_file(name, sources, timeout, dataset))
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
    images: np.ndarray  # (N, H, W) grey or (N, H, W, C) colour, uint8 (Dataset.stored_shape)
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


def load_raw(raw_dir: Path, dataset: Dataset = FASHION_MNIST) -> tuple[Split, Split]:
    """The official train and test sets of `dataset` from its verified raw directory."""
    contents = {}
    for name in dataset.files:
        path = Path(raw_dir) / name
        if not path.is_file():
            raise DataError(f"{path} is missing: run `dvc repro download` first "
                            f"(data.name is {dataset.name})")
        contents[name] = path.read_bytes()
    paths = {name: str(Path(raw_dir) / name) for name in dataset.files}  # errors name the path
    try:
        if dataset.layout == "idx":
            arrays = {name: parse_idx(contents[name], paths[name]) for name in IDX_FILES}
            train = Split(arrays[IDX_FILES[0]], arrays[IDX_FILES[1]].astype(np.int64))
            test = Split(arrays[IDX_FILES[2]], arrays[IDX_FILES[3]].astype(np.int64))
        else:
            batches = [parse_cifar_batch(contents[name], paths[name], dataset.side) for name in CIFAR_TRAIN]
            train = Split(np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
            test = Split(*parse_cifar_batch(contents[CIFAR_TEST], paths[CIFAR_TEST], dataset.side))
    except DataError as err:
        raise DataError(f"{err}; `dvc repro download` fetches and verifies the raw files again "
                        f"(data.name is {dataset.name})") from None
    for split, name in ((train, "training"), (test, "test")):
        _check_split(split, name, dataset, raw_dir)
    return train, test


def _check_split(split: Split, name: str, dataset: Dataset, raw_dir: Path) -> None:
    problem = ""
    if split.images.shape[1:] != dataset.stored_shape:
        problem = f"images of shape {split.images.shape[1:]}, not {dataset.stored_shape}"
    elif len(split.images) != len(split.labels):
        problem = f"{len(split.images)} images but {len(split.labels)} labels"
    elif len(split) and not 0 <= split.labels.min() <= split.labels.max() < dataset.num_classes:
        problem = f"labels outside 0..{dataset.num_classes - 1} ({dataset.num_classes} classes)"
    if problem:
        raise DataError(f"{raw_dir}: the {name} set has {problem}: the files are not {dataset.name} "
                        "as params.yaml's `data` describes it; fix `data` or re-run `dvc repro download`")


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
    # params.py checks these against the counts a dataset publishes; an `idx` set's are known here
    if sizes.validation_size + sizes.subset_size > len(train):
        raise DataError(f"validation_size {sizes.validation_size} + subset_size {sizes.subset_size} "
                        f"leave too few of the {len(train)} training images: lower them in params.yaml")
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


def load_prepared(prepared_dir: Path = Path("data/prepared"), dataset: Dataset = FASHION_MNIST) -> Prepared:
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
        if name not in splits or splits[name].images.shape[1:] != dataset.stored_shape:
            raise DataError(f"{arrays_path} has no {name} split of {dataset.name} images "
                            f"{dataset.stored_shape}: {REBUILD_PREPARED}")
    # The stats must be those of these arrays: same split sizes, same training-pixel mean.
    counts = {name: len(splits[name]) if name in splits else 0 for name in ("train", "val", "test")}
    train_mean = float(splits["train"].images.mean(dtype=np.float64)) / 255.0
    if any(stats.get(k) != n for k, n in counts.items()) or not std > 0 or abs(train_mean - mean) > 1e-9:
        raise DataError(f"{stats_path} does not match {arrays_path}: {REBUILD_PREPARED}")
    return Prepared(splits["train"], splits.get("val"), splits["test"], mean, std)
