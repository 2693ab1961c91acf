"""Shared fixtures: the repository's params, synthetic IDX files, and the real data when present."""

from __future__ import annotations

import copy
import gzip
import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import typer
import yaml
from typer.testing import CliRunner, Result

from fashionbench import data
from fashionbench.dataset import FASHION_MNIST, Checksum

REPO = Path(__file__).resolve().parents[1]


def invoke(main: Callable, args=()) -> Result:
    """Run a stage's Typer `main` as its command line would, through CliRunner."""
    app = typer.Typer()
    app.command()(main)
    return CliRunner().invoke(app, [str(a) for a in args])


REAL_SOURCE = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def params_dict() -> dict:
    """A fresh copy of the repository's params.yaml as a mapping."""
    return copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))


@pytest.fixture
def write_params(tmp_path: Path, params_dict: dict) -> Callable[..., Path]:
    """Write params.yaml (optionally changed by `edit(mapping)`) into tmp_path; return its path."""
    def write(edit: Callable[[dict], None] | None = None) -> Path:
        raw = copy.deepcopy(params_dict)
        if edit is not None:
            edit(raw)
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path
    return write


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def synthetic_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory of four small gzipped IDX files, with the pinned digests patched to match."""
    rng = np.random.default_rng(0)
    per_class_train, per_class_test = 30, 5
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (10 * per_class_train, 28, 28)),
        "train-labels-idx1-ubyte": np.repeat(np.arange(10), per_class_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10 * per_class_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.repeat(np.arange(10), per_class_test),
    }
    source = tmp_path / "source"
    source.mkdir()
    digests = {}
    for name, array in arrays.items():
        content = idx_bytes(array)
        digests[name] = hashlib.sha256(content).hexdigest()
        (source / f"{name}.gz").write_bytes(gzip.compress(content))
    for name, digest in digests.items():
        monkeypatch.setitem(FASHION_MNIST.files, name, Checksum(sha256=digest))
    return source


@pytest.fixture(scope="session")
def real_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real, verified raw files: data/raw if present, else fetched from the Debian package."""
    if (REPO / "data" / "raw" / "train-images-idx3-ubyte").is_file():
        return REPO / "data" / "raw"
    if not REAL_SOURCE.is_dir():
        pytest.skip("real Fashion-MNIST files absent (apt-get install dataset-fashion-mnist)")
    dest = tmp_path_factory.mktemp("real") / "raw"
    data.download((str(REAL_SOURCE),), dest, timeout=5)
    return dest


def with_train_stats(train, val, test):
    """A Prepared whose mean/std are its training images' own, as preprocess computes them
    (load_prepared checks that the stats belong to the arrays)."""
    from fashionbench.data import Prepared

    pixels = train.images.astype(np.float64) / 255.0
    return Prepared(train, val, test, float(pixels.mean()), float(pixels.std()))
