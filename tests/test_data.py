"""Download, verification and splits on synthetic IDX files; the real files when present."""

import gzip
import json

import numpy as np
import pytest

from fashionbench import data
from fashionbench.data import DataError, parse_idx
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
    assert sorted(p.name for p in dest.iterdir()) == sorted(data.FILES)
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


def test_split_is_stratified_seeded_and_normalised_on_train_only(synthetic_source, tmp_path):
    data.download((str(synthetic_source),), tmp_path / "raw", timeout=1)
    train, test = data.load_raw(tmp_path / "raw")
    first = data.prepare(train, test, validation_size=50, subset_size=100, seed=3)
    again = data.prepare(train, test, validation_size=50, subset_size=100, seed=3)
    other = data.prepare(train, test, validation_size=50, subset_size=100, seed=4)
    assert np.bincount(first.val.labels).tolist() == [5] * 10
    assert np.bincount(first.train.labels).tolist() == [10] * 10
    np.testing.assert_array_equal(first.train.images, again.train.images)
    assert not np.array_equal(first.val.images, other.val.images)
    assert first.mean == pytest.approx(first.train.images.mean() / 255)
    # no validation image leaks into the training part
    train_rows = {row.tobytes() for row in first.train.images}
    assert not any(row.tobytes() in train_rows for row in first.val.images)


def test_validation_size_zero(synthetic_source, tmp_path):
    from stages.preprocess import main

    data.download((str(synthetic_source),), tmp_path / "raw", timeout=1)
    train, test = data.load_raw(tmp_path / "raw")
    prepared = data.prepare(train, test, validation_size=0, subset_size=0, seed=0)
    data.save_prepared(prepared, tmp_path / "prepared")
    loaded = data.load_prepared(tmp_path / "prepared")
    assert loaded.val is None and len(loaded.train) == 300 and len(loaded.test) == 50
    assert main.__doc__


def test_load_prepared_names_the_missing_stage(tmp_path):
    with pytest.raises(DataError, match="dvc repro preprocess"):
        data.load_prepared(tmp_path)


@pytest.mark.real_data
def test_real_files_statistics(real_raw):
    from fashionbench.stats import summary

    train, test = data.load_raw(real_raw)
    stats = summary(train, test)
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
                              "--plots", plots])
    assert result.exit_code == 0, result.output
    assert json.loads(metrics.read_text())["train_images"] == 60000
    assert sorted(p.name for p in plots.iterdir()) == [
        "class_means.png", "pca.png", "pixel_histogram.png", "samples.png", "tsne.png"]
