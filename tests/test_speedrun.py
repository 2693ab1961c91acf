"""The CPU speed-run recipe: its net (patch whitening, identity init, shape, parameter count),
the training tricks it adds to the engine (batch-norm bias lr, the linear schedule, alternating
flips, EMA), flip + translate TTA, and the bad inputs it refuses by key."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from fashionbench import augment, evaluate, train
from fashionbench.data import Prepared, Split
from fashionbench.models import build_model, count_parameters, load_trained, save_trained
from fashionbench.models.speedrun import WHITEN_EPS, SpeedrunArch, whitening_filters
from fashionbench.params import ParamsError, load_params, params_from_dict
from tests.conftest import REPO

RECIPE = load_params(REPO / "params.yaml").recipe("speedrun_cpu")
TINY = SpeedrunArch(whiten=True, whiten_kernel=2, whiten_filters=4, whiten_images=64, widths=(4, 8),
                    dirac=True, logit_scale=1 / 9)
CPU = torch.device("cpu")


def images(n: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 (n, 28, 28): smooth random blobs, so neighbouring pixels correlate as in photos."""
    rng = np.random.default_rng(seed)
    coarse = torch.as_tensor(rng.uniform(0, 255, (n, 1, 7, 7)), dtype=torch.float32)
    return nn.functional.interpolate(coarse, size=28, mode="bilinear").round().clamp(0, 255)[:, 0].to(torch.uint8).numpy()


def tiny_recipe(**changes) -> train.TrainRecipe:
    base = {"arch": TINY, "epochs": 2, "batch_size": 16, "warmup_epochs": 0.5, "precise_bn": 0,
            "device": "cpu", "checkpoint_every": 1}
    return dataclasses.replace(RECIPE, **(base | changes))


# ---------------------------------------------------------------- the net


def test_the_recipe_net_maps_a_batch_to_ten_logits_and_its_parameters_are_pinned():
    model = build_model(RECIPE.model, RECIPE.arch)
    for training in (True, False):
        out = model.train(training)(torch.randn(2, 1, 28, 28))
        assert out.shape == (2, 10) and torch.isfinite(out).all()
    # convs 162,432 (8->24, 24->24, 24->48, 48->48, 48->96, 96->96, all 3x3), BN biases 336,
    # classifier 960; the frozen whitening filters and BN scales do not train
    assert count_parameters(model) == 163_728
    assert sum(p.numel() for p in model.parameters()) == 163_728 + 32 + 336


def test_whitening_filters_are_the_patch_covariance_eigenvectors_and_whiten_the_patches():
    x = (torch.as_tensor(images(200), dtype=torch.float32)[:, None] / 255 - 0.3) / 0.35
    filters = whitening_filters(x, 2, 4).double()
    patches = nn.functional.unfold(x.double(), 2).transpose(1, 2).reshape(-1, 4)
    covariance = patches.T @ patches / len(patches)
    values, _ = torch.linalg.eigh(covariance)
    rows = filters.reshape(4, 4)
    for row, value in zip(rows, values.flip(0)):  # largest eigenvalue first
        direction = row / row.norm()
        torch.testing.assert_close(covariance @ direction, value * direction, atol=1e-6, rtol=1e-6)
    def covariance_after(filters: torch.Tensor) -> torch.Tensor:
        projected = patches @ filters.double().reshape(4, 4).T
        return projected.T @ projected / len(projected)

    exact = covariance_after(whitening_filters(x, 2, 4, eps=0.0))
    torch.testing.assert_close(exact, torch.eye(4, dtype=torch.float64), atol=1e-4, rtol=0)
    # the default eps damps only the flattest directions: variance lambda / (lambda + eps)
    damped = values.flip(0) / (values.flip(0) + WHITEN_EPS)
    torch.testing.assert_close(covariance_after(filters), torch.diag(damped), atol=1e-4, rtol=0)


def test_the_trainer_gives_the_net_its_whitening_filters_from_the_training_images():
    model = build_model("speedrun", TINY)
    assert not model.whiten.weight.requires_grad
    uint8 = torch.as_tensor(images(100))[:, None]
    train.init_from_data(model, uint8, 28, 0.3, 0.35)
    expected = whitening_filters(augment.normalise(uint8[:64], 0.3, 0.35), 2, 4)  # whiten_images
    torch.testing.assert_close(model.whiten.weight, torch.cat([expected, -expected]))


def test_without_whitening_the_first_conv_trains_and_no_data_is_asked_for():
    model = build_model("speedrun", dataclasses.replace(TINY, whiten=False))
    before = model.whiten.weight.clone()
    train.init_from_data(model, torch.as_tensor(images(8))[:, None], 28, 0.3, 0.35)
    assert model.whiten.weight.requires_grad and torch.equal(model.whiten.weight, before)


def test_identity_init_passes_each_input_channel_through():
    model = build_model("speedrun", TINY)
    conv = model.features[2][4]  # the first group's second conv: 4 -> 4 channels
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(conv(x), x)
    first = model.features[2][0]  # 8 -> 4 channels: output i starts as input i
    wide = torch.randn(3, 8, 5, 5)
    torch.testing.assert_close(first(wide), wide[:, :4])
    plain = build_model("speedrun", dataclasses.replace(TINY, dirac=False)).features[2][4]
    assert not torch.allclose(plain(x), x)


def test_the_whitened_model_round_trips_through_a_model_file(tmp_path):
    model = build_model("speedrun", TINY)
    train.init_from_data(model, torch.as_tensor(images(64))[:, None], 28, 0.3, 0.35)
    path = tmp_path / "model.pt"
    save_trained(path, model, "speedrun", TINY, mean=0.3, std=0.35, seed=0, epochs=1, hflip=0.5,
                 tta_shift=1)
    loaded, meta = load_trained(path)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    assert meta["tta_shift"] == 1


# ---------------------------------------------------------------- bad inputs, named by key


def test_more_whitening_filters_than_patch_pixels_names_the_key(params_dict):
    params_dict["speedrun_cpu"]["arch"]["whiten_filters"] = 5  # a 2x2 grey patch has 4 pixels
    with pytest.raises(ParamsError, match="2x2 patch of 1-channel images has 4 pixels") as caught:
        params_from_dict(params_dict)
    assert caught.value.key == "speedrun_cpu.arch.whiten_filters"
    params_dict["speedrun_cpu"]["arch"] |= {"whiten_kernel": 3, "whiten_filters": 9}
    params_from_dict(params_dict)  # 3x3: 9 is the most


def test_alternating_flips_need_flip_probability_one_half(params_dict):
    params_dict["speedrun_cpu"]["augment"]["hflip"] = 0.3
    with pytest.raises(ParamsError, match="needs hflip: 0.5") as caught:
        params_from_dict(params_dict)
    assert caught.value.key == "speedrun_cpu.augment.alternate_flip"


def tiny_data(n: int) -> Prepared:
    labels = np.arange(n) % 10
    split = Split(images(n), labels.astype(np.int64))
    return Prepared(split, None, split, 0.3, 0.35)


def test_a_batch_larger_than_the_training_set_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "checkpoint_root", lambda: tmp_path / "ckpt")
    params = load_params(REPO / "params.yaml")
    data = tiny_data(100)  # the recipe's batch is 256
    with pytest.raises(ParamsError, match="256 is more than the 100 training images") as caught:
        train.train_and_save("speedrun_cpu", params, data, 0, tmp_path / "run", tmp_path / "m.json")
    assert caught.value.key == "speedrun_cpu.batch_size"
    assert not (tmp_path / "run" / "model.pt").exists()


def test_a_budget_the_first_epoch_shows_unreachable_stops_naming_the_key():
    data = tiny_data(64)
    recipe = tiny_recipe(epochs=50, time_budget_s=0.01)
    seen = []
    with pytest.raises(ParamsError, match=r"epoch 1 took .* so 50 epochs need about .* 0.01 s budget") as caught:
        train.fit("speedrun", TINY, recipe, data.train, None, mean=0.3, std=0.35, seed=0,
                  progress=False, on_epoch=seen.append)
    assert caught.value.key == "time_budget_s" and seen == []  # stopped after epoch 1
    result = train.fit("speedrun", TINY, tiny_recipe(epochs=2, time_budget_s=600.0), data.train, None,
                       mean=0.3, std=0.35, seed=0, progress=False)
    assert len(result.history) == 2


# ---------------------------------------------------------------- the training tricks


def test_batch_norm_biases_get_the_lr_multiple_and_keep_their_decay_per_step():
    model = build_model("speedrun", TINY)
    optimizer = train.make_optimizer(model, tiny_recipe(bn_bias_lr=64.0, lr=0.5, weight_decay=0.01), CPU)
    rest, fast = optimizer.param_groups
    biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert {id(p) for p in fast["params"]} == biases and not biases & {id(p) for p in rest["params"]}
    assert (fast["lr"], rest["lr"]) == (32.0, 0.5)
    assert fast["lr"] * fast["weight_decay"] == pytest.approx(rest["lr"] * rest["weight_decay"])
    single = train.make_optimizer(model, tiny_recipe(bn_bias_lr=1.0), CPU)
    assert len(single.param_groups) == 1


@pytest.mark.parametrize("schedule", ["linear", "onecycle"])
def test_the_schedule_keeps_the_bias_lr_ratio(schedule):
    model = build_model("speedrun", TINY)
    recipe = tiny_recipe(bn_bias_lr=64.0, lr=0.5, schedule=schedule, epochs=4, warmup_epochs=1.0)
    optimizer = train.make_optimizer(model, recipe, CPU)
    scheduler = train.make_scheduler(optimizer, recipe, steps_per_epoch=10)
    for _ in range(15):
        optimizer.step()
        scheduler.step()
        rest, fast = (g["lr"] for g in optimizer.param_groups)
        assert fast == pytest.approx(64 * rest)


def test_the_linear_schedule_warms_up_then_falls_linearly_to_zero():
    model = nn.Linear(2, 2)
    recipe = tiny_recipe(schedule="linear", lr=1.0, epochs=5, warmup_epochs=1.0, bn_bias_lr=1.0)
    optimizer = train.make_optimizer(model, recipe, CPU)
    scheduler = train.make_scheduler(optimizer, recipe, steps_per_epoch=4)  # 20 steps, 4 warm
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert lrs[5:] == pytest.approx([1 - k / 16 for k in range(1, 16)])
    assert optimizer.param_groups[0]["lr"] == 0.0  # after the last step


def test_alternating_flips_are_fixed_by_index_and_seed_and_alternate_by_epoch():
    x = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 1, 1, 4).expand(6, 1, 2, 4).clone()
    index = torch.arange(100, 106)
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    one = augment.alternating_flip(x, index, 1, gen)
    assert torch.equal(gen.get_state(), state)  # nothing drawn: derandomised
    again = augment.alternating_flip(x, index, 1, torch.Generator().manual_seed(3))
    assert torch.equal(one, again)
    flipped1 = (one != x).flatten(1).any(1)
    flipped2 = (augment.alternating_flip(x, index, 2, gen) != x).flatten(1).any(1)
    flipped3 = (augment.alternating_flip(x, index, 3, gen) != x).flatten(1).any(1)
    assert torch.equal(flipped2, ~flipped1) and torch.equal(flipped3, flipped1)
    many = torch.zeros(10_000, 1, 1, 2)
    many[..., 0] = 1
    share = (augment.alternating_flip(many, torch.arange(10_000), 1, gen)[..., 0] == 0).float().mean()
    assert 0.48 < share < 0.52
    other = augment.alternating_flip(many, torch.arange(10_000), 1, torch.Generator().manual_seed(4))
    assert not torch.equal(other, augment.alternating_flip(many, torch.arange(10_000), 1, gen))


def test_the_batch_augmentation_uses_alternating_flips_when_asked():
    cfg = RECIPE.augment
    x = torch.as_tensor(images(8))[:, None]
    index = torch.arange(8)
    out = [augment.augment_batch(x, dataclasses.replace(cfg, crop_pad=0), torch.Generator().manual_seed(0),
                                 0.3, 0.35, index=index, epoch=e) for e in (1, 2)]
    torch.testing.assert_close(out[0], out[1].flip(-1))
    with pytest.raises(ValueError, match="index"):
        augment.augment_batch(x, cfg, torch.Generator().manual_seed(0), 0.3, 0.35)


def test_the_ema_follows_the_weights_by_its_decay():
    model = nn.Linear(3, 2)
    ema = train.EMA(model, decay=0.9)
    start = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    torch.testing.assert_close(ema.model.weight, start + 0.1)
    for _ in range(200):
        ema.update()
    torch.testing.assert_close(ema.model.weight, model.weight)


def test_a_short_run_of_the_recipe_lowers_the_loss():
    data = tiny_data(64)
    result = train.fit("speedrun", TINY, tiny_recipe(epochs=6, lr=0.2), data.train, None,
                       mean=0.3, std=0.35, seed=0, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- flip + translate TTA


def test_a_shifted_view_moves_the_image_and_fills_black():
    uint8 = torch.as_tensor(images(3))[:, None]
    x = augment.normalise(uint8, 0.3, 0.35)
    view = evaluate.view(x, "hflip shift 1 -1", black=-0.3 / 0.35)
    expected = augment.normalise(augment.shift(uint8.flip(-1), torch.ones(3, dtype=torch.long),
                                               -torch.ones(3, dtype=torch.long)), 0.3, 0.35)
    torch.testing.assert_close(view, expected)
    assert evaluate.shifted_views(1) == ("shift -1 -1", "hflip shift -1 -1", "shift 1 1", "hflip shift 1 1")
    with pytest.raises(ValueError, match="unknown TTA view"):
        evaluate.view(x, "rotate 5", black=0.0)


def test_tta_probabilities_average_the_shifted_views():
    torch.manual_seed(0)
    model = build_model("speedrun", TINY).eval()
    x = images(4)
    kw = {"mean": 0.3, "std": 0.35, "batch_size": 2, "device": CPU}
    views = evaluate.shifted_views(1)
    both = evaluate.predict_proba(model, x, views=views, **kw)
    each = [evaluate.predict_proba(model, x, views=(v,), **kw) for v in views]
    np.testing.assert_allclose(both, sum(each) / 4, atol=1e-6)
    assert not np.allclose(each[0], evaluate.predict_proba(model, x, **kw))


# ---------------------------------------------------------------- the ablation bench


def test_the_ablation_probes_change_one_thing_and_the_widths_probes_keep_the_time():
    from bench.speedrun_ablation import probe_recipe

    params = REPO / "params.yaml"
    base = probe_recipe(params, "recipe", 5, ["augment.crop_pad=2", "batch_size=512"])
    assert (base.epochs, base.batch_size, base.augment.crop_pad) == (5, 512, 2)
    assert base.warmup_epochs == pytest.approx(RECIPE.warmup_epochs * 5 / RECIPE.epochs)
    assert base.time_budget_s == 0  # probes are timed, not stopped
    off = probe_recipe(params, "no whitening", 5, ["augment.crop_pad=2", "batch_size=512"])
    assert off.arch == dataclasses.replace(base.arch, whiten=False)
    assert dataclasses.replace(off, arch=base.arch) == base
    wide = probe_recipe(params, "widths 32-64-128 (equal time)", 5)
    assert wide.arch.widths == (32, 64, 128) and wide.epochs == 3


def test_the_ablation_table_compares_each_probe_with_the_recipe_of_its_seeds():
    from bench.speedrun_ablation import table

    def row(probe, seed, acc, tta, epochs=5):
        return {"probe": probe, "seed": seed, "epochs": epochs, "val_acc": acc, "val_acc_flip_tta": acc,
                "val_acc_tta": tta, "settings": ["augment.crop_pad=2"]}

    text = table([row("recipe", 0, 0.930, 0.934), row("recipe", 1, 0.932, 0.936),
                  row("no whitening", 0, 0.922, 0.928), row("widths 32-64-128 (equal time)", 0, 0.931, 0.935, 3),
                  row("recipe", 0, 0.940, 0.944, 30), row("no whitening", 0, 0.937, 0.939, 30)])
    line = next(x for x in text.splitlines() if x.startswith("| no whitening"))
    assert "(--set augment.crop_pad=2)" in line and "| -0.0080 |" in line and line.endswith("| -0.0060 |")
    assert "0.9310 ± 0.0014" in text  # the recipe's two seeds at 5 epochs, not the 30-epoch run
    assert "| +0.0010 |" in next(x for x in text.splitlines() if x.startswith("| widths"))  # equal time: 5
    longer = [x for x in text.splitlines() if "| 30 |" in x]
    assert len(longer) == 2 and longer[1].endswith("| -0.0050 |")  # against the 30-epoch recipe
    # --epochs 9 gives the widths probe 5 epochs: its recorded base groups it, not 5 / 0.6
    nine = table([row("recipe", 0, 0.936, 0.94, 9) | {"base_epochs": 9},
                  row("widths 32-64-128 (equal time)", 0, 0.937, 0.94, 5) | {"base_epochs": 9},
                  row("a probe since removed", 0, 0.5, 0.5)])
    assert next(x for x in nine.splitlines() if x.startswith("| widths")).split("|")[5].strip() == "+0.0010"
    assert "since removed" not in nine
