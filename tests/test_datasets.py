"""Datasets other than Fashion-MNIST: the CIFAR-10 and IDX readers on small files written in
the official formats, checksums as each dataset publishes them, the download's errors, and a
colour dataset through preprocess, training and evaluation."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
import yaml

from fashionbench import data
from fashionbench.data import DataError, load_raw, parse_cifar_batch, parse_cifar_meta
from fashionbench.dataset import CIFAR_TEST, CIFAR_TRAIN, DATASETS, IDX_FILES, Checksum, idx_dataset
from fashionbench.models import REGISTRY, build_model, spec
from fashionbench.params import load_params, params_from_dict
from tests.conftest import idx_bytes

CIFAR = DATASETS["cifar-10"]
spec("cnn")  # a first look-up imports every model module
MODEL_NAMES = sorted(REGISTRY)


def cifar_batch(images_nchw: np.ndarray, labels: np.ndarray) -> bytes:
    """A batch as cifar-10-python.tar.gz holds it: a pickled dict with bytes keys, `data` of
    N rows of 3072 bytes (the red plane, then green, then blue) and `labels` as a list."""
    return pickle.dumps({b"batch_label": b"testing batch 1 of 1", b"labels": [int(x) for x in labels],
                         b"data": images_nchw.reshape(len(images_nchw), -1).astype(np.uint8),
                         b"filenames": [b"x.png"] * len(labels)}, protocol=2)


def cifar_meta() -> bytes:
    return pickle.dumps({b"num_cases_per_batch": 10000, b"label_names": [c.encode() for c in CIFAR.classes],
                         b"num_vis": 3072}, protocol=2)


def cifar_files(per_batch: int = 40, seed: int = 0) -> dict[str, bytes]:
    """Five training batches, the test batch and batches.meta, small, with a learnable colour
    cue: class k's images are brighter in channel k % 3."""
    rng = np.random.default_rng(seed)
    files = {}
    for name in (*CIFAR_TRAIN, CIFAR_TEST):
        labels = np.arange(per_batch) % 10
        images = rng.integers(0, 90, (per_batch, 3, 32, 32))
        for k in range(10):
            images[labels == k, k % 3, 3 * k:3 * k + 4] += 150
        files[name] = cifar_batch(images, labels)
    files["batches.meta"] = cifar_meta()
    return files


@pytest.fixture
def cifar_dir(tmp_path, monkeypatch):
    """Extracted small CIFAR-10 files in cifar-10-batches-py/, with the pinned digests patched
    to match them (the official ones are of the real files)."""
    folder = tmp_path / "source" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    files = cifar_files()
    for name, content in files.items():
        (folder / name).write_bytes(content)
        monkeypatch.setitem(CIFAR.files, name, Checksum(md5=hashlib.md5(content).hexdigest()))
    return folder.parent


def test_a_cifar_batch_decodes_to_channels_last_images():
    images = np.arange(2 * 3 * 32 * 32, dtype=np.int64).reshape(2, 3, 32, 32) % 256
    decoded, labels = parse_cifar_batch(cifar_batch(images, np.array([3, 7])), "data_batch_1")
    assert decoded.shape == (2, 32, 32, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, images.transpose(0, 2, 3, 1))
    assert labels.tolist() == [3, 7]
    assert parse_cifar_meta(cifar_meta()) == CIFAR.classes


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    with pytest.raises(DataError, match="not allowed"):
        parse_cifar_batch(pickle.dumps({b"data": Exploit()}), "data_batch_1")
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("content, fragment", [
    (b"not a pickle", "not a CIFAR-10 batch"),
    (pickle.dumps({b"labels": [1]}), "no 'data' entry"),
    (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}), "for 2 labels, expected uint8"),
])
def test_a_damaged_cifar_batch_names_the_file(content, fragment):
    with pytest.raises(DataError, match=fragment) as caught:
        parse_cifar_batch(content, "data_batch_3")
    assert "data_batch_3" in str(caught.value)


def test_cifar_from_extracted_files_and_from_the_tarball(cifar_dir, tmp_path):
    data.download((str(cifar_dir),), tmp_path / "raw", 1, CIFAR)
    train, test = load_raw(tmp_path / "raw", CIFAR)
    assert train.images.shape == (200, 32, 32, 3) and test.images.shape == (40, 32, 32, 3)
    tarball = tmp_path / "packed" / CIFAR.archive
    tarball.parent.mkdir()
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(cifar_dir / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    packed = dataclasses.replace(CIFAR, archive_md5=hashlib.md5(tarball.read_bytes()).hexdigest())
    data.download((str(tarball.parent),), tmp_path / "raw2", 1, packed)
    again, _ = load_raw(tmp_path / "raw2", packed)
    np.testing.assert_array_equal(again.images, train.images)
    with pytest.raises(DataError, match="MD5 does not match"):  # the official digest: not these bytes
        data.download((str(tarball.parent),), tmp_path / "raw3", 1, CIFAR)


def test_a_dataset_without_its_files_says_how_to_get_them(tmp_path):
    for name, fragment in (("mnist", "the 4 official .gz files"), ("cifar-10", "cifar-10-python.tar.gz"),
                           ("fashion-mnist", "apt-get install dataset-fashion-mnist")):
        with pytest.raises(DataError) as caught:
            data.download((str(tmp_path / "empty"),), tmp_path / "raw", 1, DATASETS[name])
        message = str(caught.value)
        assert "could not get a verified copy" in message and "download.sources" in message
        assert fragment in message, message  # the advice fits the dataset
        assert not (tmp_path / "raw").exists()


def test_mnist_is_verified_by_the_digest_of_its_official_gz(tmp_path, monkeypatch):
    mnist = DATASETS["mnist"]
    content = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    packed = gzip.compress(content, mtime=0)
    name = "t10k-images-idx3-ubyte"
    with pytest.raises(DataError, match="does not match the official"):
        data.verify(content, name, mnist, packed)
    with pytest.raises(DataError, match=f"digest of {name}.gz only"):
        data.verify(content, name, mnist, content)  # an uncompressed copy cannot be checked
    monkeypatch.setitem(mnist.files, name, Checksum(md5_gz=hashlib.md5(packed).hexdigest()))
    data.verify(content, name, mnist, packed)


def idx_set_files(folder, side: int, labels_train, labels_test) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (len(labels_train), side, side)), np.asarray(labels_train),
              rng.integers(0, 256, (len(labels_test), side, side)), np.asarray(labels_test)]
    for name, array in zip(IDX_FILES, arrays):
        (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))


def test_any_idx_set_with_its_class_names(tmp_path):
    letters = idx_dataset(("a", "b", "c"), 12, light_on_dark=False)
    idx_set_files(tmp_path / "letters", 12, [0, 1, 2] * 4, [2, 1, 0])
    data.download((str(tmp_path / "letters"),), tmp_path / "raw", 1, letters)  # structure checks only
    train, test = load_raw(tmp_path / "raw", letters)
    assert train.images.shape == (12, 12, 12) and test.labels.tolist() == [2, 1, 0]
    with pytest.raises(DataError, match="images of shape .12, 12., not .20, 20."):
        load_raw(tmp_path / "raw", idx_dataset(("a", "b", "c"), 20, True))
    with pytest.raises(DataError, match="labels outside 0..1"):
        load_raw(tmp_path / "raw", idx_dataset(("a", "b"), 12, True))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_takes_colour_32px_images(name, params_dict):
    section = next(s for s in params_dict.values() if isinstance(s, dict) and s.get("model") == name)
    arch = dict(section.get("arch") or {})
    if REGISTRY[name].shared:  # the WRN family: the shared shape, kept small here
        arch = {**params_dict["model"], **arch, "depth": 10, "widen": 1}
    model = build_model(name, arch, (3, 32, 32), 7).eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_cifar10_through_preprocess_training_and_evaluation(cifar_dir, tmp_path, monkeypatch, params_dict):
    from fashionbench import corrupt
    from fashionbench.data import load_prepared, prepare, save_prepared
    from fashionbench.evaluate import evaluate_run
    from fashionbench.params import Sizes
    from fashionbench.train import train_and_save

    params_dict["data"]["name"] = "cifar-10"
    params_dict["download"]["sources"] = [str(cifar_dir)]
    params_dict["preprocess"]["validation_size"] = 20
    params_dict["quick_scale"].update(train_size=80, validation_size=20, test_size=20)
    params_dict["cnn"].update(epochs=4, lr=0.005, batch_size=40)  # of 180 training images
    params_dict["evaluate"]["device"] = params_dict["train_defaults"]["device"] = "cpu"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_dict, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASHIONBENCH_CHECKPOINTS", str(tmp_path / "checkpoints"))
    params = load_params(tmp_path / "params.yaml")
    assert params.dataset is CIFAR and params.recipe("cnn").input_size == 32

    data.download(params.download.sources, tmp_path / "data/raw", 1, params.dataset)
    train, test = load_raw(tmp_path / "data/raw", params.dataset)
    save_prepared(prepare(train, test, Sizes(20, 0, 0, 0)), tmp_path / "data/prepared")
    prepared = load_prepared(tmp_path / "data/prepared", params.dataset)
    with pytest.raises(DataError, match="no train split of fashion-mnist images"):
        load_prepared(tmp_path / "data/prepared")  # colour arrays are not Fashion-MNIST's
    corrupt.save(corrupt.build(test.images, test.labels, 20, 0, ("gaussian_noise", "rotate"), (1, 5)),
                 tmp_path / "data/corrupted")  # colour images corrupt too
    metrics = train_and_save("cnn", params, prepared, 0, tmp_path / "models/cnn/seed0",
                             tmp_path / "metrics/train/cnn-seed0.json", progress=False)
    assert metrics["parameters"] == 3 * 32 * 9 + 32 + 32 * 64 * 9 + 64 + 64 * 8 * 8 * 256 + 256 + 2570
    result = evaluate_run("cnn-seed0", params, tmp_path)
    assert result["accuracy"] > 0.3  # 10 classes: chance is 0.1
    confusion = (tmp_path / "plots/confusion/cnn-seed0.csv").read_text()
    assert "airplane" in confusion or "truck" in confusion

    from fashionbench.predict import load_classifier, predict
    from PIL import Image

    Image.fromarray(test.images[0]).save(tmp_path / "first.png")
    top = predict([tmp_path / "first.png"], load_classifier(tmp_path / "models/cnn/seed0/model.pt"))[0]["top"]
    assert top[0]["class"] in CIFAR.classes and len(top) == 3


def test_an_idx_set_of_any_side_trains_at_that_side(params_dict):
    params_dict["data"] = {"name": "idx", "idx": {"classes": ["a", "b", "c"], "image_side": 64,
                                                  "light_on_dark": True}}
    params_dict["quick"] = True
    params = params_from_dict(params_dict)
    assert params.recipe("cnn").input_size == 64 and params.recipe("cnn").epochs == 1


def test_a_two_class_svm_scores_both_classes(params_dict):
    from fashionbench.classical import fit_model, score

    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    images = rng.integers(0, 100, (40, 28, 28)).astype(np.uint8)
    images[labels == 1, :, :14] += 150
    cfg = params_from_dict(params_dict).svm["rbf"]
    scores, pred, _ = score(fit_model(cfg, images, labels, 0).model, images)
    assert scores.shape == (40, 2) and (pred == labels).mean() > 0.9
