"""params.yaml loading: defaults merged under each recipe, the quick scale, and every kind of
mistake named by its key before any stage does work."""

import dataclasses

import pytest

from fashionbench.params import (Augment, ParamsError, TrainRecipe, load_params, load_plan,
                                 params_from_dict)
from tests.conftest import REPO, invoke

DEEP_ROWS = ("cnn", "speedrun_cpu", "resnet7", "resnet9", "resnet18", "resnet34", "mlp", "mlp512", "wrn", "wrn28",
             "se_wrn", "se_wrn64", "wrn32", "wrn32_mish")


def expect_error(params_dict, fragments, key_suffix: str | None = None) -> ParamsError:
    """params_from_dict fails with a ParamsError whose message holds every fragment."""
    with pytest.raises(ParamsError) as caught:
        params_from_dict(params_dict)
    message = str(caught.value)
    for fragment in [fragments] if isinstance(fragments, str) else fragments:
        assert fragment in message, message
    if key_suffix is not None:
        assert caught.value.key.endswith(key_suffix), caught.value.key
    assert "\n" not in message  # one line, as the stages print it
    return caught.value


# ---------------------------------------------------------------- the repository's file


def test_repository_params_load():
    params = load_params(REPO / "params.yaml")
    assert params.dataset.name == "fashion-mnist" and params.seeds
    assert set(params.svm)  # at least one SVM recipe
    assert set(DEEP_ROWS) <= set(params.recipes)
    for row, recipe in params.recipes.items():
        assert isinstance(recipe, TrainRecipe), row
        assert isinstance(recipe.augment, Augment), row
        assert not isinstance(recipe.arch, dict), row  # built into the model's arch dataclass


def test_every_recipe_inherits_train_defaults_and_its_own_keys_win(params_dict):
    params = params_from_dict(params_dict)
    defaults = params_dict["train_defaults"]
    for row in DEEP_ROWS:
        section, recipe = params_dict[row], params.recipes[row]
        for key, default in defaults.items():
            if key == "augment":
                continue
            expected = section.get(key, default)
            assert getattr(recipe, key) == expected, f"{row}.{key}"
    # a key the row does not set comes from train_defaults, one it sets wins
    assert "optimizer" not in params_dict["resnet7"]
    assert params.recipes["resnet7"].optimizer == defaults["optimizer"]
    assert params.recipes["resnet7"].batch_size == params_dict["resnet7"]["batch_size"] != defaults["batch_size"]


def test_changing_a_default_changes_every_recipe_that_does_not_set_it(params_dict):
    params_dict["train_defaults"]["grad_clip"] = 2.5
    params_dict["train_defaults"]["lr"] = 0.123
    params = params_from_dict(params_dict)
    for row in DEEP_ROWS:
        assert params.recipes[row].grad_clip == params_dict[row].get("grad_clip", 2.5), row
        assert params.recipes[row].lr == params_dict[row].get("lr", 0.123), row


def test_a_recipe_augment_key_merges_with_the_default_augment(params_dict):
    params_dict["train_defaults"]["augment"]["cutout"] = 6
    params_dict["mlp"]["augment"] = {"erase_p": 0.25}
    recipe = params_from_dict(params_dict).recipes["mlp"]
    assert recipe.augment.erase_p == 0.25      # the recipe's key
    assert recipe.augment.cutout == 6          # a default the recipe did not set is kept
    assert recipe.augment.erase_scale == tuple(params_dict["train_defaults"]["augment"]["erase_scale"])
    # cnn's section names hflip only: every other augment key is the default
    cnn = params_from_dict(params_dict).recipes["cnn"].augment
    assert cnn.hflip == 0.5 and cnn.cutout == 6 and cnn.crop_pad == 0


def test_the_wrn_rows_read_the_shared_model_section(params_dict):
    params_dict["model"]["widen"] = 2
    params = params_from_dict(params_dict)
    for row in ("wrn", "se_wrn"):
        arch = params.recipes[row].arch
        assert (arch.depth, arch.widen, arch.dropout) == (40, 2, 0.5), row
    assert params.recipes["wrn"].arch.block == "post" and params.recipes["se_wrn"].arch.block == "pre"
    params_dict["se_wrn"]["arch"]["depth"] = 16  # a row's arch overrides the shared section
    params = params_from_dict(params_dict)
    assert params.recipes["se_wrn"].arch.depth == 16 and params.recipes["wrn"].arch.depth == 40


def test_any_section_naming_a_model_is_a_deep_row(params_dict):
    params_dict["cnn_wide"] = {"model": "cnn", "arch": {**params_dict["cnn"]["arch"], "dropout": 0.25}, "epochs": 3}
    params_dict["seeds"]["cnn_wide"] = [0]
    params = params_from_dict(params_dict)
    assert params.recipes["cnn_wide"].arch.dropout == 0.25
    assert params.recipes["cnn_wide"].epochs == 3
    assert params.recipes["cnn_wide"].lr == params_dict["train_defaults"]["lr"]


def test_svm_recipes_inherit_svm_defaults(params_dict):
    params = params_from_dict(params_dict)
    defaults = params_dict["svm_defaults"]
    for name, section in params_dict["svm"].items():
        svm = params.svm[name]
        for key, default in defaults.items():
            expected = section.get(key, default)
            expected = tuple(expected) if isinstance(expected, list) else expected
            assert getattr(svm, key) == expected, f"svm.{name}.{key}"


# ---------------------------------------------------------------- quick: sizes only


def test_quick_changes_no_architecture_or_recipe_key(params_dict):
    params_dict["quick"] = False
    full = params_from_dict(params_dict)
    params_dict["quick"] = True
    quick = params_from_dict(params_dict)
    assert quick.recipes == full.recipes
    assert quick.svm == full.svm and quick.preprocess == full.preprocess


@pytest.mark.parametrize("row", DEEP_ROWS)
def test_quick_caps_epochs_and_precise_bn_through_recipe(params_dict, row):
    params_dict["quick"] = False
    full = params_from_dict(params_dict)
    params_dict["quick"] = True
    quick = params_from_dict(params_dict)
    scale = params_dict["quick_scale"]
    assert full.recipe(row) == dataclasses.replace(full.recipes[row], input_size=full.recipe(row).input_size)
    assert full.recipe(row).input_size in (28, 32)  # 0 (as stored) is resolved to the side
    assert quick.recipes[row].epochs == params_dict[row]["epochs"]  # the table is untouched
    images = scale["epoch_images"].get(row, scale["epoch_images"]["default"])
    assert quick.epoch_images(row) == images and full.epoch_images(row) == 0
    capped, whole = quick.recipe(row), full.recipe(row)
    assert capped.epochs == min(whole.epochs, scale["epochs"]) < whole.epochs
    assert capped.precise_bn == min(whole.precise_bn, images)
    # warmup keeps its fraction of the schedule (mlp: 1 of 30 epochs)
    assert capped.warmup_epochs / capped.epochs == pytest.approx(whole.warmup_epochs / whole.epochs)
    assert dataclasses.replace(capped, epochs=whole.epochs, precise_bn=whole.precise_bn,
                               warmup_epochs=whole.warmup_epochs) == whole


def test_quick_caps_a_recipe_without_warmup_to_the_scale(params_dict):
    params_dict["quick"] = True
    params_dict["quick_scale"]["epochs"] = 2
    params_dict["quick_scale"]["epoch_images"]["cnn"] = 300
    params_dict["cnn"]["precise_bn"] = 1000
    params = params_from_dict(params_dict)
    assert params.recipe("cnn").epochs == 2 and params.recipe("cnn").precise_bn == 300
    params_dict["cnn"]["epochs"] = 1  # fewer than the scale: kept
    params_dict["cnn"]["precise_bn"] = 0  # off stays off
    params = params_from_dict(params_dict)
    assert params.recipe("cnn").epochs == 1 and params.recipe("cnn").precise_bn == 0


def test_quick_scales_the_sizes(params_dict):
    params_dict["quick"] = False
    full = params_from_dict(params_dict)
    params_dict["quick"] = True
    quick = params_from_dict(params_dict)
    scale, pre = params_dict["quick_scale"], params_dict["preprocess"]
    assert (quick.sizes().validation_size, quick.sizes().subset_size, quick.sizes().test_size) == \
        (scale["validation_size"], scale["train_size"], scale["test_size"])
    assert (full.sizes().validation_size, full.sizes().subset_size, full.sizes().test_size) == \
        (pre["validation_size"], pre["subset_size"], 0)
    assert quick.sizes().seed == full.sizes().seed == pre["seed"]
    assert quick.stats_sizes().tsne_size == scale["tsne_size"]
    assert full.stats_sizes() == full.stats


def test_quick_must_be_a_boolean(params_dict):
    params_dict["quick"] = "yes"
    error = expect_error(params_dict, ["quick", "must be bool", "'yes'"])
    assert error.key == "quick"


def test_unknown_row_in_recipe_lists_the_rows(params_dict):
    params = params_from_dict(params_dict)
    with pytest.raises(ParamsError, match=r"vgg.*deep rows: cnn, speedrun_cpu, resnet7, resnet9, resnet18, resnet34, mlp, mlp512, wrn, wrn28, se_wrn"):
        params.recipe("vgg")


# ---------------------------------------------------------------- mistakes name their key


def test_misspelt_key_in_a_recipe_is_named_with_a_suggestion(params_dict):
    params_dict["cnn"]["epoch"] = 3
    expect_error(params_dict, ["cnn.epoch", "unknown key", "did you mean 'epochs'"], "cnn.epoch")


def test_misspelt_key_in_a_recipe_augment_is_named_with_a_suggestion(params_dict):
    params_dict["cnn"]["augment"]["hflp"] = 0.5
    expect_error(params_dict, ["cnn.augment.hflp", "did you mean 'hflip'"], "cnn.augment.hflp")


def test_misspelt_key_in_a_recipe_arch_is_named_with_a_suggestion(params_dict):
    params_dict["mlp"]["arch"]["hiden"] = [64]
    expect_error(params_dict, ["mlp.arch.hiden", "did you mean 'hidden'"], "mlp.arch.hiden")


def test_misspelt_key_in_train_defaults_is_named_with_a_suggestion(params_dict):
    params_dict["train_defaults"]["label_smothing"] = 0.1
    expect_error(params_dict, ["label_smothing", "unknown key", "did you mean 'label_smoothing'"],
                 ".label_smothing")


def test_misspelt_key_in_svm_defaults_is_named_with_a_suggestion(params_dict):
    params_dict["svm_defaults"]["gama"] = 0.1
    expect_error(params_dict, ["gama", "unknown key", "did you mean 'gamma'"], ".gama")


def test_misspelt_key_in_an_svm_recipe_is_named_with_a_suggestion(params_dict):
    params_dict["svm"]["hog"]["hog_cell"] = [4]
    expect_error(params_dict, ["svm.hog.hog_cell", "did you mean 'hog_cells'"], "svm.hog.hog_cell")


def test_misspelt_key_in_a_plain_section(params_dict):
    params_dict["preprocess"]["vaildation_size"] = params_dict["preprocess"].pop("validation_size")
    error = expect_error(params_dict, "did you mean 'validation_size'")
    assert error.key == "preprocess.vaildation_size"


@pytest.mark.parametrize("row, key, value, fragment", [
    ("cnn", "input_size", 64, "fashion-mnist trains at 0 (as stored, 28 px) or 28 or 32 px, not 64"),
    ("wrn", "input_size", 30, "or 28 or 32 px, not 30"),
    ("wrn", "optimizer", "rangr", "'adamw', 'sgd', 'ranger'"),
])
def test_an_impossible_recipe_option_names_the_key(params_dict, row, key, value, fragment):
    params_dict[row][key] = value
    expect_error(params_dict, fragment, f"{row}.{key}")


@pytest.mark.parametrize("key, value, fragment", [
    ("widths", [32, 64, 128, 256], "1 to 3 stage widths"),   # 28 px halves four times: 1 px
    ("convs", 0, "must be >= 1"),
])
def test_an_impossible_cnn_shape_names_the_key(params_dict, key, value, fragment):
    params_dict["cnn"]["arch"][key] = value
    expect_error(params_dict, fragment, f"cnn.arch.{key}")


def test_an_unknown_autoaugment_policy_names_the_key(params_dict):
    params_dict["wrn"]["augment"]["autoaugment"] = "cifar100"
    expect_error(params_dict, ["'none', 'cifar10', 'imagenet', 'svhn'"], "wrn.augment.autoaugment")


def test_a_recipe_error_names_the_key_as_written_in_params_yaml(params_dict):
    params_dict["cnn"]["epoch"] = 3
    with pytest.raises(ParamsError) as caught:
        params_from_dict(params_dict)
    assert caught.value.key == "cnn.epoch"


@pytest.mark.parametrize("section, key", [("train_defaults", "epoch"), ("svm_defaults", "gama")])
def test_a_defaults_typo_names_the_defaults_section(params_dict, section, key):
    params_dict[section][key] = 1
    with pytest.raises(ParamsError) as caught:
        params_from_dict(params_dict)
    assert caught.value.key == f"{section}.{key}"


def test_unknown_section_is_named(params_dict):
    params_dict["preprocesss"] = {"seed": 0}
    error = expect_error(params_dict, ["preprocesss", "unknown section", "did you mean 'preprocess'"])
    assert error.key == "preprocesss"


def test_missing_defaults_section_is_named(params_dict):
    del params_dict["train_defaults"]
    error = expect_error(params_dict, ["train_defaults", "missing"])
    assert error.key == "train_defaults"


def test_missing_key(params_dict):
    del params_dict["stats"]["tsne_size"]
    error = expect_error(params_dict, "missing")
    assert error.key == "stats.tsne_size"


def test_a_key_missing_from_the_defaults_is_named(params_dict):
    del params_dict["train_defaults"]["momentum"]
    expect_error(params_dict, ["momentum", "missing"], ".momentum")


def test_wrong_type(params_dict):
    params_dict["preprocess"]["seed"] = "zero"
    assert expect_error(params_dict, "must be int").key == "preprocess.seed"


def test_bool_is_not_a_number(params_dict):
    params_dict["download"]["timeout"] = True
    assert expect_error(params_dict, "must be float").key == "download.timeout"


def test_a_wrong_literal_in_a_recipe_lists_the_choices(params_dict):
    params_dict["mlp"]["schedule"] = "exponential"
    expect_error(params_dict, ["'exponential' is not one of", "'onecycle'", "'cosine'"], "mlp.schedule")


def test_compile_is_a_mode_not_a_switch(params_dict):
    params_dict["train_defaults"]["compile"] = True  # the old boolean spelling
    expect_error(params_dict, ["True is not one of", "'none'", "'reduce-overhead'"], "compile")


def test_a_resnet_needs_four_stages(params_dict):
    params_dict["resnet18"]["arch"]["blocks"] = [2, 2, 2]
    expect_error(params_dict, ["4 stages", "[2, 2, 2, 2]"], "resnet18.arch.blocks")


def test_negative_size(params_dict):
    params_dict["preprocess"]["subset_size"] = -5
    assert expect_error(params_dict, ">= 0").key == "preprocess.subset_size"


def test_validation_larger_than_train(params_dict):
    params_dict["preprocess"]["validation_size"] = 70000
    assert expect_error(params_dict, "60000").key == "preprocess.validation_size"


def test_subset_larger_than_what_is_left(params_dict):
    params_dict["preprocess"]["validation_size"] = 10000
    params_dict["preprocess"]["subset_size"] = 55000
    assert expect_error(params_dict, "50000").key == "preprocess.subset_size"


def test_an_unknown_dataset_is_named_with_a_suggestion(params_dict):
    params_dict["data"]["name"] = "fashion_mnist"
    expect_error(params_dict, ["unknown dataset 'fashion_mnist'", "did you mean 'fashion-mnist'"], "data.name")


def test_a_missing_data_section_says_what_to_add(params_dict):
    del params_dict["data"]
    expect_error(params_dict, ["missing section", "name: fashion-mnist"], "data")


def test_an_idx_set_needs_its_class_names(params_dict):
    params_dict["data"]["name"] = "idx"
    expect_error(params_dict, "class names in label order", "data.idx.classes")


@pytest.mark.parametrize("name, shape, classes", [
    ("mnist", (1, 28, 28), 10), ("kmnist", (1, 28, 28), 10), ("cifar-10", (3, 32, 32), 10)])
def test_the_dataset_decides_shapes_and_sizes(params_dict, name, shape, classes):
    params_dict["data"]["name"] = name
    params = params_from_dict(params_dict)
    assert params.dataset.shape == shape and params.dataset.num_classes == classes
    assert params.recipe("cnn").input_size == shape[1]  # 0: as stored


def test_sizes_are_checked_against_the_dataset_named(params_dict):
    params_dict["data"] = {"name": "idx", "idx": {"classes": ["a", "b", "c"], "image_side": 12,
                                                  "light_on_dark": True}}
    params_dict["svm"]["rbf"]["hog_cells"] = [8]  # fits 28 px, not 12
    expect_error(params_dict, "between 1 and 6", "svm.rbf.hog_cells")


@pytest.mark.parametrize("depth", [12, 41, 4])
def test_impossible_wrn_depth_is_named_with_the_rule(params_dict, depth):
    params_dict["model"]["depth"] = depth
    expect_error(params_dict, [f"depth: {depth} is impossible", "6n+4"], "model.depth")


def test_a_bad_recipe_value_is_named_even_when_quick(params_dict):
    params_dict["quick"] = True
    params_dict["model"]["depth"] = 12  # quick scales sizes: it must not hide a model error
    expect_error(params_dict, "6n+4", "depth")


def test_a_recipe_naming_an_unregistered_model_lists_the_registered_ones(params_dict):
    params_dict["resnet7"]["model"] = "vgg16"
    error = expect_error(params_dict, ["unknown model 'vgg16'", "registered:", "cnn", "mlp", "resnet7", "wrn"])
    assert error.key == "resnet7.model"


def test_ensemble_of_an_unknown_row(params_dict):
    params_dict["compare"]["ensemble"] = ["cnn", "vgg"]
    assert expect_error(params_dict, "'vgg'").key == "compare.ensemble"


# ---------------------------------------------------------------- the torch-free plan


@pytest.mark.parametrize("seeds, fragments, key", [
    ({"cnn": [0]}, ["missing", "resnet7: [0]"], "seeds.resnet7"),
    ({"cnnn": [0]}, ["not a deep row", "did you mean 'cnn'"], "seeds.cnnn"),
    ({"wrn": []}, ["at least one"], "seeds.wrn"),
    ({"wrn": [1, 1]}, ["distinct"], "seeds.wrn"),
])
def test_every_deep_row_lists_its_own_distinct_seeds(params_dict, seeds, fragments, key):
    params_dict["seeds"] = {**params_dict["seeds"], **seeds}
    if "cnnn" not in seeds and "wrn" not in seeds:
        del params_dict["seeds"]["resnet7"]
    expect_error(params_dict, fragments, key)


def test_load_plan_gives_rows_seeds_and_epochs(write_params):
    def edit(raw):
        raw["seeds"] = {row: [0, 7] for row in raw["seeds"]} | {"cnn_small": [3]}
        raw["quick"] = True
        raw["cnn_small"] = {"model": "cnn", "arch": {**raw["cnn"]["arch"], "dropout": 0.1}}  # epochs from train_defaults
    plan = load_plan(write_params(edit))
    raw = load_params(write_params(edit))
    assert plan.quick is True and plan.seeds == {row: (0, 7) for row in DEEP_ROWS} | {"cnn_small": (3,)}
    assert plan.deep == (*DEEP_ROWS, "cnn_small") == tuple(raw.recipes)
    assert plan.svm == tuple(raw.svm)
    assert plan.epochs == {row: recipe.epochs for row, recipe in raw.recipes.items()}
    assert plan.epochs["cnn_small"] == 30
    assert plan.ensemble == raw.compare.ensemble and plan.tolerance == raw.compare.tolerance
    assert plan.rows() == [f"svm-{k}" for k in raw.svm] + list(plan.deep)
    runs = plan.runs()
    assert ("cnn-seed7", "cnn", 7) in runs and ("svm-rbf", "svm-rbf", None) in runs
    assert ("cnn_small-seed3", "cnn_small", 3) in runs and ("cnn_small-seed0", "cnn_small", 0) not in runs
    assert len(runs) == len(raw.svm) + 2 * len(DEEP_ROWS) + 1
    assert plan.row_of("se_wrn-seed7") == "se_wrn" and plan.row_of("svm-hog_seed") == "svm-hog_seed"


def test_load_plan_does_not_import_torch(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from fashionbench.params import load_plan; load_plan(); "
            "assert 'torch' not in sys.modules, 'load_plan imported torch'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_load_plan_of_a_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_plan(tmp_path / "params.yaml")


# ---------------------------------------------------------------- the stages stop first


def test_check_params_writes_its_marker_only_for_valid_params(tmp_path, write_params):
    from stages.check_params import main

    marker = tmp_path / "data" / "params-checked"
    good = write_params()
    assert invoke(main, ["--params", good, "--marker", marker]).exit_code == 0
    assert marker.is_file()
    marker.unlink()
    bad = write_params(lambda raw: raw["train_defaults"].update(epoch=3))
    result = invoke(main, ["--params", bad, "--marker", marker])
    assert result.exit_code == 2
    assert result.output.startswith("error: params.yaml:") and "did you mean 'epochs'" in result.output
    assert len(result.output.strip().splitlines()) == 1  # one line, no traceback
    assert not marker.exists()


def test_stage_stops_before_any_work_on_a_params_error(tmp_path, write_params):
    from stages.preprocess import main

    params = write_params(lambda raw: raw["preprocess"].update(validation_size=70000, subset_size=0)
                          or raw.update(quick=False))
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "arrays.npz").write_bytes(b"previous output")
    result = invoke(main, ["--params", params, "--out", out])
    assert result.exit_code == 2
    assert "preprocess.validation_size" in result.output
    assert (out / "arrays.npz").read_bytes() == b"previous output"


def test_dvc_repro_stops_at_check_params_before_any_stage_runs(tmp_path):
    """Under DVC a bad key stops the pipeline before any stage deletes its outputs."""
    import shutil
    import subprocess

    import yaml

    root = tmp_path / "repo"
    for package in ("fashionbench", "stages"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["model"]["depth"] = 41
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for command in ("git init -q", "git config user.email ci@example.com", "git config user.name ci",
                    "dvc init -q", "git add -A", "git commit -qm init"):
        subprocess.run(command.split(), cwd=root, check=True)
    result = subprocess.run(["dvc", "repro"], cwd=root, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "depth: 41 is impossible" in output and "6n+4" in output
    assert "Running stage 'check_params'" in output
    assert "Running stage 'download'" not in output
    assert not (root / "data" / "params-checked").exists()


@pytest.mark.parametrize("section", ["train_defaults", "cnn", "evaluate"])
def test_a_cuda_device_without_cuda_fails_in_the_params_check(params_dict, section, monkeypatch):
    import fashionbench.params as params_module

    monkeypatch.setattr(params_module, "_cuda_available", lambda: False)
    params_dict[section]["device"] = "cuda"
    expect_error(params_dict, ["cuda is not available"], "device")
