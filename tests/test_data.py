"""Download, verification, splits, the prepared files (truncation, a full disk) and the data
stage scripts on synthetic IDX files; the real files when present."""

import errno
import gzip
import io
import json
import os

import numpy as np
import pytest
import yaml

from fashionbench import data
from fashionbench.data import DataError, parse_idx
from fashionbench.dataset import FASHION_MNIST
from fashionbench.params import Sizes
from tests.conftest import idx_bytes, invoke

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connection refused at once


run_stage = invoke


def previous_raw(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "train-images-idx3-ubyte").write_bytes(b"previous verified data")
    return raw


def test_idx_round_trip():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(idx_bytes(array)), array)


@pytest.mark.parametrize("content, fragment", [
    (b"\x08\x00\x08\x01", "bad magic"),
    (idx_bytes(np.zeros((5, 28, 28), np.uint8))[:-7], "truncated or corrupt"),
    (bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0]), "not unsigned byte"),
])
def test_parse_idx_rejects_bad_files(content, fragment):
    with pytest.raises(DataError, match=fragment):
        parse_idx(content, "some-file")


def test_download_from_a_directory(synthetic_source, tmp_path):
    dest = tmp_path / "raw"
    data.download((str(synthetic_source),), dest, timeout=1)
    assert sorted(p.name for p in dest.iterdir()) == sorted(FASHION_MNIST.files)
    train, test = data.load_raw(dest)
    assert train.images.shape == (300, 28, 28) and len(test) == 50


def test_uncompressed_files_are_accepted(synthetic_source, tmp_path):
    for gz in synthetic_source.glob("*.gz"):
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    data.download((str(synthetic_source),), tmp_path / "raw", timeout=1)


def test_falls_back_to_the_next_source(synthetic_source, tmp_path):
    dest = tmp_path / "raw"
    data.download((str(tmp_path / "nowhere"), UNREACHABLE, str(synthetic_source)), dest, timeout=1)
    assert (dest / "t10k-labels-idx1-ubyte").is_file()


def corrupt(path):
    content = bytearray(gzip.decompress(path.read_bytes()))
    content[-1] ^= 0xFF
    path.write_bytes(gzip.compress(bytes(content)))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, fragment", [
    (corrupt, "does not match the official"),
    (truncate, "truncated or corrupt"),
])
def test_damaged_file_fails_and_keeps_previous_data(synthetic_source, tmp_path, write_params,
                                                    damage, fragment):
    from stages.download import main

    damage(synthetic_source / "train-labels-idx1-ubyte.gz")
    raw = previous_raw(tmp_path)
    params = write_params(lambda p: p["download"].update(sources=[str(synthetic_source)]))
    result = run_stage(main, ["--params", params, "--out", raw])
    assert result.exit_code == 2
    assert "train-labels-idx1-ubyte" in result.output and fragment in result.output
    assert "apt-get install dataset-fashion-mnist" in result.output
    assert [p.name for p in raw.iterdir()] == ["train-images-idx3-ubyte"]
    assert (raw / "train-images-idx3-ubyte").read_bytes() == b"previous verified data"
    assert not list(tmp_path.glob(".raw-*")), "staging folder left behind"


def test_no_source_reachable(synthetic_source, tmp_path, write_params):
    from stages.download import main

    raw = previous_raw(tmp_path)
    missing = tmp_path / "empty"
    missing.mkdir()
    params = write_params(lambda p: p["download"].update(sources=[str(missing), UNREACHABLE],
                                                         timeout=2))
    result = run_stage(main, ["--params", params, "--out", raw])
    assert result.exit_code == 2
    assert str(missing) in result.output and UNREACHABLE in result.output
    assert "Sources tried" in result.output
    assert (raw / "train-images-idx3-ubyte").read_bytes() == b"previous verified data"


def test_successful_download_replaces_previous_data(synthetic_source, tmp_path, write_params):
    from stages.download import main

    raw = previous_raw(tmp_path)
    params = write_params(lambda p: p["download"].update(sources=[str(synthetic_source)]))
    result = run_stage(main, ["--params", params, "--out", raw])
    assert result.exit_code == 0, result.output
    assert len(list(raw.iterdir())) == 4


# ---------------------------------------------------------------- splits


@pytest.fixture
def raw_splits(synthetic_source, tmp_path):
    """The synthetic official train (30 a class) and test (5 a class) sets, via download."""
    data.download((str(synthetic_source),), tmp_path / "raw", timeout=1)
    return data.load_raw(tmp_path / "raw")


def test_split_is_stratified_seeded_and_normalised_on_train_only(raw_splits):
    train, test = raw_splits
    first = data.prepare(train, test, Sizes(validation_size=50, subset_size=100, test_size=0, seed=3))
    again = data.prepare(train, test, Sizes(validation_size=50, subset_size=100, test_size=0, seed=3))
    other = data.prepare(train, test, Sizes(validation_size=50, subset_size=100, test_size=0, seed=4))
    assert np.bincount(first.val.labels).tolist() == [5] * 10
    assert np.bincount(first.train.labels).tolist() == [10] * 10
    np.testing.assert_array_equal(first.train.images, again.train.images)
    assert not np.array_equal(first.val.images, other.val.images)
    assert first.mean == pytest.approx(first.train.images.mean() / 255)
    assert first.std == pytest.approx((first.train.images / 255).std())
    # no validation image leaks into the training part; test_size 0 keeps the whole test set
    train_rows = {row.tobytes() for row in first.train.images}
    assert not any(row.tobytes() in train_rows for row in first.val.images)
    np.testing.assert_array_equal(first.test.images, test.images)


def test_validation_size_zero_keeps_every_training_image(raw_splits, tmp_path):
    train, test = raw_splits
    prepared = data.prepare(train, test, Sizes(validation_size=0, subset_size=0, test_size=0, seed=0))
    assert prepared.val is None and len(prepared.train) == 300
    data.save_prepared(prepared, tmp_path / "prepared")
    loaded = data.load_prepared(tmp_path / "prepared")
    assert loaded.val is None and len(loaded.train) == 300 and len(loaded.test) == 50
    np.testing.assert_array_equal(np.sort(loaded.train.images.reshape(300, -1), axis=0),
                                  np.sort(train.images.reshape(300, -1), axis=0))
    assert (loaded.mean, loaded.std) == (prepared.mean, prepared.std)


def test_test_subset_is_stratified_and_seeded(raw_splits):
    train, test = raw_splits
    sizes = Sizes(validation_size=0, subset_size=0, test_size=20, seed=1)
    first, again = data.prepare(train, test, sizes), data.prepare(train, test, sizes)
    assert np.bincount(first.test.labels).tolist() == [2] * 10
    np.testing.assert_array_equal(first.test.images, again.test.images)
    # every kept test image is an official test image with its own label
    official = {row.tobytes(): label for row, label in zip(test.images, test.labels)}
    assert all(official[row.tobytes()] == label for row, label in zip(first.test.images, first.test.labels))
    other = data.prepare(train, test, Sizes(validation_size=0, subset_size=0, test_size=20, seed=2))
    assert not np.array_equal(first.test.images, other.test.images)
    # the test subset never changes the training part or its normalisation
    whole = data.prepare(train, test, Sizes(validation_size=0, subset_size=0, test_size=0, seed=1))
    np.testing.assert_array_equal(first.train.images, whole.train.images)
    assert first.mean == whole.mean


# ---------------------------------------------------------------- the prepared files


@pytest.fixture
def prepared_dir(raw_splits, tmp_path):
    """data/prepared written by save_prepared from the synthetic sets (40 validation images)."""
    train, test = raw_splits
    out = tmp_path / "prepared"
    data.save_prepared(data.prepare(train, test, Sizes(40, 0, 0, 0)), out)
    return out


def test_load_prepared_round_trip(prepared_dir, raw_splits):
    loaded = data.load_prepared(prepared_dir)
    assert (len(loaded.train), len(loaded.val), len(loaded.test)) == (260, 40, 50)
    assert loaded.train.labels.dtype == np.int64
    np.testing.assert_array_equal(loaded.test.labels, raw_splits[1].labels)
    stats = json.loads((prepared_dir / "norm.json").read_text())
    assert stats == {"mean": loaded.mean, "std": loaded.std, "train": 260, "val": 40, "test": 50}


def test_load_prepared_names_the_missing_stage(tmp_path):
    with pytest.raises(DataError, match="dvc repro preprocess"):
        data.load_prepared(tmp_path)


def one_line_error(prepared_dir) -> str:
    with pytest.raises(DataError) as caught:
        data.load_prepared(prepared_dir)
    message = str(caught.value)
    assert "\n" not in message, message
    err = caught.value  # no chained traceback under it
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    return message


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99], ids=["empty", "half", "last-bytes-missing"])
def test_truncated_arrays_is_one_error_naming_the_file_and_the_fix(prepared_dir, keep):
    arrays = prepared_dir / "arrays.npz"
    with open(arrays, "r+b") as f:
        f.truncate(int(arrays.stat().st_size * keep))
    message = one_line_error(prepared_dir)
    assert str(arrays) in message and "`dvc repro -f preprocess`" in message


@pytest.mark.parametrize("content", [
    "{\"mean\": 0.28, \"std\": 0.3",                                 # truncated JSON
    "",                                                                # empty
    json.dumps({"std": 0.35, "train": 260, "val": 40, "test": 50}),    # no mean
    json.dumps({"mean": "high", "std": 0.35, "train": 260}),           # not a number
], ids=["truncated", "empty", "no-mean", "mean-not-a-number"])
def test_bad_norm_json_names_the_file_and_the_fix(prepared_dir, content):
    (prepared_dir / "norm.json").write_text(content)
    message = one_line_error(prepared_dir)
    assert str(prepared_dir / "norm.json") in message and "`dvc repro -f preprocess`" in message
    assert "arrays.npz" not in message.split(":")[0]


def test_norm_json_of_other_arrays_is_a_mismatch(prepared_dir):
    stats = json.loads((prepared_dir / "norm.json").read_text())
    (prepared_dir / "norm.json").write_text(json.dumps(stats | {"train": 999}))
    message = one_line_error(prepared_dir)
    assert "does not match" in message and "norm.json" in message and "dvc repro -f preprocess" in message


def test_arrays_without_a_test_split_are_rejected(prepared_dir):
    with np.load(prepared_dir / "arrays.npz") as saved:
        kept = {k: saved[k] for k in saved.files if not k.startswith("test")}
    np.savez(prepared_dir / "arrays.npz", **kept)
    assert "no test split of fashion-mnist images" in one_line_error(prepared_dir)


# ---------------------------------------------------------------- a full disk


DISK_FULL_AFTER = 20_000  # bytes: the write fails partway through arrays.npz (~270 kB)


class FullDisk(io.FileIO):
    """A file whose writes fail with ENOSPC once DISK_FULL_AFTER bytes are in it."""

    def write(self, chunk) -> int:
        room = DISK_FULL_AFTER - self.tell()
        if len(chunk) > room:
            super().write(bytes(chunk)[:max(room, 0)])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
        return super().write(chunk)


def full_disk_open(file, mode="r", *args, **kwargs):
    if "w" in mode:
        return FullDisk(file, "wb")
    return open(file, mode, *args, **kwargs)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_full_disk_while_saving_keeps_the_previous_files(prepared_dir, raw_splits, monkeypatch):
    before = snapshot(prepared_dir)
    previous = data.load_prepared(prepared_dir)
    train, test = raw_splits
    other = data.prepare(train, test, Sizes(0, 100, 20, 7))   # different sizes and contents
    monkeypatch.setattr(data, "open", full_disk_open, raising=False)  # the file save_prepared writes
    with pytest.raises(OSError) as caught:
        data.save_prepared(other, prepared_dir)
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert snapshot(prepared_dir) == before, "a failed save changed or left files in data/prepared"
    loaded = data.load_prepared(prepared_dir)
    np.testing.assert_array_equal(loaded.train.images, previous.train.images)
    assert loaded.mean == previous.mean
    # the same save with room to spare replaces both files
    data.save_prepared(other, prepared_dir)
    assert len(data.load_prepared(prepared_dir).train) == 100


def test_a_pair_half_replaced_by_a_full_disk_is_caught_on_load(prepared_dir, raw_splits,
                                                               monkeypatch):
    # arrays.npz is replaced, then the disk fills before norm.json: the stale stats must not
    # be used with the new arrays.
    train, test = raw_splits
    other = data.prepare(train, test, Sizes(40, 0, 0, 5))   # same sizes, other images and mean

    def no_space(path, content):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(data, "write_json", no_space)
    with pytest.raises(OSError):
        data.save_prepared(other, prepared_dir)
    with pytest.raises(data.DataError, match=r"norm\.json does not match .*arrays\.npz.*dvc repro -f preprocess"):
        data.load_prepared(prepared_dir)


# ---------------------------------------------------------------- the stage scripts


def small_quick_scale(p):
    p["quick"] = True
    p["quick_scale"].update(train_size=100, validation_size=30, test_size=20, tsne_size=60, pca_size=80)


def test_preprocess_stage_uses_the_preprocess_section(raw_splits, tmp_path, write_params):
    from stages.preprocess import main

    def edit(p):
        p["quick"] = False
        p["preprocess"].update(validation_size=50, subset_size=0, seed=2)
    out = tmp_path / "prepared"
    result = run_stage(main, ["--params", write_params(edit), "--raw", tmp_path / "raw", "--out", out])
    assert result.exit_code == 0, result.output
    loaded = data.load_prepared(out)
    assert (len(loaded.train), len(loaded.val), len(loaded.test)) == (250, 50, 50)
    assert "train 250, validation 50, test 50" in result.output
    expected = data.prepare(*raw_splits, Sizes(50, 0, 0, 2))
    np.testing.assert_array_equal(loaded.val.images, expected.val.images)


def test_preprocess_stage_with_quick_uses_the_quick_scale_sizes(raw_splits, tmp_path, write_params):
    from stages.preprocess import main

    def edit(p):
        small_quick_scale(p)
        p["preprocess"].update(validation_size=0, subset_size=0, seed=0)  # not used when quick
    out = tmp_path / "prepared"
    result = run_stage(main, ["--params", write_params(edit), "--raw", tmp_path / "raw", "--out", out])
    assert result.exit_code == 0, result.output
    loaded = data.load_prepared(out)
    assert (len(loaded.train), len(loaded.val), len(loaded.test)) == (100, 30, 20)
    assert np.bincount(loaded.train.labels).tolist() == [10] * 10
    assert np.bincount(loaded.test.labels).tolist() == [2] * 10


def test_preprocess_stage_without_raw_data_names_the_download_stage(tmp_path, write_params):
    from stages.preprocess import main

    out = tmp_path / "prepared"
    result = run_stage(main, ["--params", write_params(), "--raw", tmp_path / "nothing", "--out", out])
    assert result.exit_code == 2 and "dvc repro download" in result.output
    assert not out.exists()


def test_stats_stage_on_synthetic_files(raw_splits, tmp_path, write_params, monkeypatch):
    from stages import stats as stage

    def edit(p):
        small_quick_scale(p)
        p["stats"].update(sprite_per_class=2, tsne_perplexity=5.0)
    params = write_params(edit)
    metrics, report, plots = tmp_path / "stats.json", tmp_path / "dataset.json", tmp_path / "plots"
    result = run_stage(stage.main, ["--params", params, "--raw", tmp_path / "raw", "--metrics", metrics,
                                    "--report", report, "--plots", plots])
    assert result.exit_code == 0, result.output
    stats = json.loads(metrics.read_text())
    assert set(stats) == {"train_images", "test_images", "train_mean", "train_std"}  # tracked: numbers
    assert (stats["train_images"], stats["test_images"]) == (300, 50)
    described = json.loads(report.read_text())
    assert described.items() >= stats.items() and set(described["train_per_class"].values()) == {30}
    assert stats["train_mean"] == pytest.approx(raw_splits[0].images.mean() / 255, abs=1e-6)
    assert sorted(p.name for p in plots.iterdir()) == [
        "class_means.png", "pca.png", "pixel_histogram.png", "samples.png", "tsne.png"]

    # the quick scale's t-SNE and PCA sizes reach the figures; the full run uses the stats section
    seen = []
    monkeypatch.setattr(stage, "write_figures", lambda train, cfg, seed, out, dataset: seen.append(cfg))
    assert run_stage(stage.main, ["--params", params, "--raw", tmp_path / "raw", "--metrics", metrics,
                                  "--report", report, "--plots", plots]).exit_code == 0

    def full_scale(p):
        small_quick_scale(p)
        p["quick"] = False
    full = write_params(full_scale)
    assert run_stage(stage.main, ["--params", full, "--raw", tmp_path / "raw", "--metrics", metrics,
                                  "--report", report, "--plots", plots]).exit_code == 0
    section = yaml.safe_load(full.read_text())["stats"]
    assert [(c.tsne_size, c.pca_size) for c in seen] == [(60, 80), (section["tsne_size"], section["pca_size"])]


@pytest.mark.real_data
def test_real_files_statistics(real_raw):
    from fashionbench.stats import description

    train, test = data.load_raw(real_raw)
    stats = description(train, test, FASHION_MNIST.classes)
    assert set(stats["train_per_class"].values()) == {6000}
    assert set(stats["test_per_class"].values()) == {1000}
    assert f"{stats['train_mean']:.4f}" == "0.2860"
    assert f"{stats['train_std']:.4f}" == "0.3530"
    json.dumps(stats)


@pytest.mark.real_data
def test_stats_stage_writes_metrics_and_figures(real_raw, tmp_path, write_params):
    from stages.stats import main

    def small(p):
        p["stats"].update(tsne_size=200, pca_size=500, sprite_per_class=3)
        p["quick"] = False
    params = write_params(small)
    metrics, plots = tmp_path / "stats.json", tmp_path / "plots"
    result = run_stage(main, ["--params", params, "--raw", real_raw, "--metrics", metrics,
                              "--report", tmp_path / "dataset.json", "--plots", plots])
    assert result.exit_code == 0, result.output
    assert json.loads(metrics.read_text())["train_images"] == 60000
    assert sorted(p.name for p in plots.iterdir()) == [
        "class_means.png", "pca.png", "pixel_histogram.png", "samples.png", "tsne.png"]
