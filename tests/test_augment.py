"""Batched augmentations: deterministic under a seeded generator, shape and dtype kept."""

import pytest
import torch

from fashionbench import augment
from fashionbench.params import Augment

ALL_ON = Augment(crop_pad=4, translate=0.1, hflip=0.5, jitter=0.2, jitter_p=0.5, erase_p=0.9,
                 erase_scale=(0.1, 0.2), cutout=8, mixup=0.4, cutmix=1.0, autoaugment="cifar10")


def batch(dtype=torch.float32):
    images = torch.randint(0, 256, (16, 1, 28, 28), generator=torch.Generator().manual_seed(1))
    return images.float() / 255.0 if dtype.is_floating_point else images.to(dtype)


OPS = {
    "crop": lambda x, g: augment.random_crop(x, 4, g),
    "translate": lambda x, g: augment.translate(x, 0.1, g),
    "hflip": lambda x, g: augment.hflip(x, 0.5, g),
    "jitter": lambda x, g: augment.jitter(x, 0.2, 0.5, g),
    "erase": lambda x, g: augment.random_erase(x, 0.9, (0.1, 0.2), g),
    "cutout": lambda x, g: augment.cutout(x, 8, g),
    "mixup": lambda x, g: augment.mixup(x, torch.arange(16) % 10, 0.4, g)[0],
    "cutmix": lambda x, g: augment.cutmix(x, torch.arange(16) % 10, 1.0, g)[0],
}


@pytest.mark.parametrize("name", OPS)
def test_deterministic_and_shape_dtype_preserving(name):
    x = batch()
    first = OPS[name](x, torch.Generator().manual_seed(0))
    again = OPS[name](x, torch.Generator().manual_seed(0))
    other = OPS[name](x, torch.Generator().manual_seed(1))
    assert first.shape == x.shape and first.dtype == x.dtype
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("name", ["crop", "translate", "hflip"])
def test_geometric_ops_work_on_uint8(name):
    x = batch(torch.uint8)
    assert OPS[name](x, torch.Generator().manual_seed(0)).dtype == torch.uint8


def test_shift_moves_pixels_and_fills_zeros():
    x = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4)
    out = augment.shift(x, torch.tensor([1]), torch.tensor([-1]))
    assert out[0, 0].tolist() == [[0, 0, 0, 0], [2, 3, 4, 0], [6, 7, 8, 0], [10, 11, 12, 0]]


def test_certain_and_impossible_probabilities():
    x, g = batch(), torch.Generator().manual_seed(0)
    assert torch.equal(augment.hflip(x, 1.0, g), x.flip(-1))
    assert torch.equal(augment.hflip(x, 0.0, g), x)
    assert torch.equal(augment.random_erase(x, 0.0, (0.1, 0.2), g), x)
    erased = augment.random_erase(x + 1, 1.0, (0.1, 0.2), g)
    area = (erased == 0).flatten(1).float().mean(1)
    assert ((area > 0.05) & (area < 0.3)).all()


def test_mixed_targets_are_distributions():
    x, y = batch(), torch.arange(16) % 10
    for op in (augment.mixup, augment.cutmix):
        _, targets = op(x, y, 1.0, torch.Generator().manual_seed(0))
        assert targets.shape == (16, 10)
        assert torch.allclose(targets.sum(1), torch.ones(16))


def test_beta_draws_have_the_right_moments():
    draws = augment.sample_beta(0.4, 20000, torch.Generator().manual_seed(0))
    assert abs(draws.mean() - 0.5) < 0.01 and abs(draws.var() - 1 / (4 * 1.8)) < 0.01


def test_augment_batch_normalises_and_is_deterministic():
    x = batch(torch.uint8)
    out = augment.augment_batch(x, ALL_ON, torch.Generator().manual_seed(0), 0.286, 0.353)
    again = augment.augment_batch(x, ALL_ON, torch.Generator().manual_seed(0), 0.286, 0.353)
    assert out.dtype == torch.float32 and out.shape == x.shape and torch.equal(out, again)
    mixed, targets = augment.mix_batch(out, torch.arange(16) % 10, ALL_ON, torch.Generator().manual_seed(0))
    assert mixed.shape == x.shape and targets.shape == (16, 10)
    plain = Augment(0, 0.0, 0.0, 0.0, 0.0, 0.0, (0.1, 0.2), 0, 0.0, 0.0, "none")
    normalised = augment.augment_batch(x, plain, torch.Generator(), 0.5, 0.25)
    assert torch.allclose(normalised, (x / 255.0 - 0.5) / 0.25)


def test_autoaugment_draws_a_sub_policy_per_image_from_the_seeded_generator():
    same = batch(torch.uint8)[:1].repeat(32, 1, 1, 1)  # 32 copies of one image
    first = augment.autoaugment(same, "cifar10", torch.Generator().manual_seed(0))
    again = augment.autoaugment(same, "cifar10", torch.Generator().manual_seed(0))
    other = augment.autoaugment(same, "cifar10", torch.Generator().manual_seed(1))
    assert first.shape == same.shape and first.dtype == torch.uint8
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len({bytes(image.numpy()) for image in first}) > 4  # not one draw for the whole batch
    state = torch.get_rng_state()
    augment.autoaugment(same, "cifar10", torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)  # torch's global generator is left alone


def test_a_32px_recipe_crops_random_windows_of_the_enlarged_frame():
    x = batch(torch.uint8)
    frame = augment.enlarge(x, 32)
    assert frame.shape == (16, 1, 36, 36) and frame.dtype == torch.uint8
    assert augment.enlarge(x, 28) is x
    crops = augment.random_crop_to(frame, 32, torch.Generator().manual_seed(0))
    assert crops.shape == (16, 1, 32, 32)
    for image, crop in zip(frame, crops):  # each crop is a window of its own image
        windows = [image[:, i:i + 32, j:j + 32] for i in range(5) for j in range(5)]
        assert any(torch.equal(crop, w) for w in windows)
    assert torch.equal(augment.input_view(x, 32), frame[..., 2:34, 2:34])
    assert torch.equal(augment.input_view(x, 28), x)
    out = augment.augment_batch(frame, ALL_ON, torch.Generator().manual_seed(0), 0.286, 0.353, size=32)
    assert out.shape == (16, 1, 32, 32) and out.dtype == torch.float32
