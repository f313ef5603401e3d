"""The augmentation recipe, each rule checked on both engines (Albumentations, per image; the
batched tensor ops, here on CPU tensors): normalised float CHW, crops that are shifts within the
pad and uniform over them, the flip rates, rotations by 90, 180 and 270 degrees, brightness and
contrast, small rotations and scalings, one square hole filled with the mean; the default recipe
untouched by the optional ones; device batches that cover each epoch once; and a run that learns
with the tensor engine."""

import json
import math
import pickle
from collections import Counter

import numpy as np
import pytest
import torch

from cifar_ray.config import AugmentConfig
from cifar_ray.data.augment import (augment_batch, denormalize, normalize, scaled,
                                    train_transform)
from cifar_ray.data.cifar_files import SPECS
from cifar_ray.data.datamodule import DeviceBatches
from tests.conftest import FAST_FLAGS, run_cli

NORM = SPECS["cifar10"].norm
ENGINES = ["albumentations", "tensors"]
ONLY = dict(pad_to=32, flip_p=0, cutout_p=0)  # no crop, flip or hole: one transform at a time


def _batch(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)


def augmented(engine: str, image: torch.Tensor, n: int, **aug) -> torch.Tensor:
    """`n` augmentations of one (3, s, s) uint8 image by `engine`: (n, 3, s, s) floats."""
    if engine == "tensors":
        return augment_batch(image.expand(n, -1, -1, -1), AugmentConfig(**aug), NORM,
                             generator=torch.Generator().manual_seed(1))
    transform = train_transform(AugmentConfig(**aug), NORM, seed=1, size=image.shape[-1])
    hwc = image.permute(1, 2, 0).numpy()
    return torch.stack([transform(image=hwc)["image"] for _ in range(n)])


def find_shift(out, reference):
    """The (dy, dx) such that out is reference shifted by it, zero-filled; None if none fits."""
    for dy in range(-4, 5):
        for dx in range(-4, 5):
            shifted = torch.zeros_like(reference)
            ys, yd = slice(max(0, -dy), 32 - max(0, dy)), slice(max(0, dy), 32 - max(0, -dy))
            xs, xd = slice(max(0, -dx), 32 - max(0, dx)), slice(max(0, dx), 32 - max(0, -dx))
            shifted[:, yd, xd] = reference[:, ys, xs]
            if torch.allclose(out, shifted, atol=1e-5):
                return dy, dx
    return None


@pytest.mark.parametrize("engine", ENGINES)
def test_the_output_is_normalised_float_chw(engine):
    image = torch.full((3, 32, 32), 128, dtype=torch.uint8)
    out = augmented(engine, image, 1, pad_to=32, flip_p=0, cutout_p=0)
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32
    expected = (128 / 255 - torch.tensor(NORM.mean)) / torch.tensor(NORM.std)
    torch.testing.assert_close(out[0, :, 0, 0], expected, atol=1e-5, rtol=1e-4)
    random = _batch(1)[0]
    torch.testing.assert_close(augmented(engine, random, 1, pad_to=32, flip_p=0, cutout_p=0),
                               normalize(random[None], NORM), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_crops_are_shifts_within_the_pad_uniform_over_it(engine):
    image = _batch(1)[0]
    reference = normalize(image[None], NORM)[0]
    shifts = [find_shift(o, reference) for o in augmented(engine, image, 900, flip_p=0, cutout_p=0)]
    assert None not in shifts  # each crop is the image shifted by at most 4 pixels, zero-filled
    for axis in (0, 1):  # uniform over the 9 offsets: about 100 each of 900
        counts = Counter(s[axis] for s in shifts)
        assert set(counts) == set(range(-4, 5)) and all(60 < c < 140 for c in counts.values())


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_flip_rate_is_the_configured_probability(engine, p):
    image = _batch(1)[0]
    reference = normalize(image[None], NORM)[0]
    out = augmented(engine, image, 600, pad_to=32, flip_p=p, cutout_p=0)
    flipped = torch.tensor([torch.allclose(o, reference.flip(-1), atol=1e-5) for o in out])
    kept = torch.tensor([torch.allclose(o, reference, atol=1e-5) for o in out])
    assert bool((flipped | kept).all())
    assert abs(flipped.float().mean().item() - p) < 0.06


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_vertical_flip_rate_is_the_configured_probability(engine, p):
    image = _batch(1)[0]
    reference = normalize(image[None], NORM)[0]
    out = augmented(engine, image, 600, **ONLY, vflip_p=p)
    flipped = torch.tensor([torch.allclose(o, reference.flip(-2), atol=1e-5) for o in out])
    kept = torch.tensor([torch.allclose(o, reference, atol=1e-5) for o in out])
    assert bool((flipped | kept).all())
    assert abs(flipped.float().mean().item() - p) < 0.06


def _turns(out: torch.Tensor, reference: torch.Tensor) -> list[int | None]:
    """Each output's k such that it is `reference` turned by k * 90 degrees; None if none."""
    return [next((k for k in range(4) if torch.allclose(o, reference.rot90(k, (1, 2)), atol=1e-5)),
                 None) for o in out]


@pytest.mark.parametrize("engine", ENGINES)
def test_rot90_turns_by_90_180_or_270_degrees_equally_often(engine):
    image = _batch(1)[0]
    reference = normalize(image[None], NORM)[0]
    always = Counter(_turns(augmented(engine, image, 600, **ONLY, rot90_p=1), reference))
    assert set(always) == {1, 2, 3} and all(150 < c < 250 for c in always.values())  # 200 each
    half = Counter(_turns(augmented(engine, image, 600, **ONLY, rot90_p=0.5), reference))
    assert None not in half and 250 < half[0] < 350  # about half unrotated
    assert all(60 < half[k] < 140 for k in (1, 2, 3))  # the rest split three ways


def _pixels(out: torch.Tensor) -> torch.Tensor:
    """Normalised (B, 3, H, W) -> grey levels in [0, 1], (B, H, W)."""
    return denormalize(out, NORM).mean(dim=-1)


@pytest.mark.parametrize("engine", ENGINES)
def test_brightness_and_contrast_are_uniform_over_their_ranges(engine):
    """On two grey levels 80 and 176 (none clipped), each output's levels are p * alpha + beta:
    alpha ~ U(0.8, 1.2), beta ~ U(-0.1, 0.1) of the full range."""
    low, high = 80 / 255, 176 / 255
    image = torch.full((3, 32, 32), 80, dtype=torch.uint8)
    image[:, 16:] = 176
    aug = dict(ONLY, color_p=1, brightness=0.1, contrast=0.2)
    levels = _pixels(augmented(engine, image, 1000, **aug))
    top, bottom = levels[:, :16].mean(dim=(1, 2)), levels[:, 16:].mean(dim=(1, 2))
    alpha = (bottom - top) / (high - low)
    beta = (top + bottom) / 2 - alpha * (low + high) / 2
    for x, centre, half_width in ((alpha, 1.0, 0.2), (beta, 0.0, 0.1)):
        # Albumentations truncates pixels to uint8 after the change: allow a few levels of 255.
        assert abs(x.mean().item() - centre) < 0.1 * half_width + 0.01
        assert abs(x.std().item() / (half_width / math.sqrt(3)) - 1) < 0.1  # uniform's spread
        assert centre - 1.05 * half_width - 0.01 < x.min() < centre - 0.9 * half_width
        assert centre + 0.9 * half_width < x.max() < centre + 1.05 * half_width + 0.01
    bright = _pixels(augmented(engine, torch.full((3, 32, 32), 250, dtype=torch.uint8), 100,
                               **ONLY, color_p=1, brightness=0.2, contrast=0))
    assert bright.max() <= 1 + 1e-5 and (bright > 1 - 1e-5).float().mean() > 0.3  # clipped at white
    unchanged = augmented(engine, image, 20, **ONLY, color_p=1, brightness=0, contrast=0)
    torch.testing.assert_close(unchanged, normalize(image[None], NORM).expand(20, -1, -1, -1),
                               atol=1e-5, rtol=1e-5)


def _dot_angles(engine: str, n: int) -> torch.Tensor:
    """Degrees about the centre of a white dot 12 pixels above it, after rotations of up to 30."""
    image = torch.zeros((3, 32, 32), dtype=torch.uint8)
    image[:, 3:5, 15:17] = 255  # centred on (row 3.5, col 15.5); the centre is (15.5, 15.5)
    weight = (_pixels(augmented(engine, image, n, **ONLY, affine_p=1, rotate=30, scale=0)) - 0.6)
    weight = weight.clamp(min=0)  # the dot only: not black, nor the mean-grey corners
    ys, xs = torch.arange(32.0)[None, :, None], torch.arange(32.0)[None, None, :]
    row = (weight * ys).sum(dim=(1, 2)) / weight.sum(dim=(1, 2))
    col = (weight * xs).sum(dim=(1, 2)) / weight.sum(dim=(1, 2))
    return torch.rad2deg(torch.atan2(col - 15.5, 15.5 - row))


def _square_sides(engine: str, n: int) -> torch.Tensor:
    """(n, 2) sides across and down, in units of 16 pixels, of a centred 16-pixel white square
    scaled by up to 20%: the grey summed along the middle rows and columns, clear of the mean
    grey filling the border of a zoom-out."""
    image = torch.zeros((3, 32, 32), dtype=torch.uint8)
    image[:, 8:24, 8:24] = 255
    grey = _pixels(augmented(engine, image, n, **ONLY, affine_p=1, rotate=0, scale=0.2))
    across = grey[:, 15:17, 4:28].sum(dim=2).mean(dim=1)
    down = grey[:, 4:28, 15:17].sum(dim=1).mean(dim=1)
    return torch.stack([across, down], dim=1) / 16


def test_affine_rotations_and_scales_spread_the_same_in_both_engines():
    angles = {engine: _dot_angles(engine, 400) for engine in ENGINES}
    for a in angles.values():  # uniform on [-30, 30]: mean |angle| 15, reaching both ends
        assert abs(a.abs().mean().item() - 15) < 1.5 and a.abs().max() < 32
        assert a.min() < -27 and a.max() > 27
    assert abs(angles["tensors"].abs().mean() - angles["albumentations"].abs().mean()) < 1.5
    sides = {engine: _square_sides(engine, 400) for engine in ENGINES}
    for s in sides.values():  # uniform on [0.8, 1.2], the same both ways (one scale per image)
        assert (s[:, 0] - s[:, 1]).abs().max() < 0.03
        assert abs(s.mean().item() - 1) < 0.02
        assert abs(s[:, 0].std().item() / (0.2 / math.sqrt(3)) - 1) < 0.1
        assert 0.77 < s.min() < 0.83 and 1.17 < s.max() < 1.23
    assert abs(sides["tensors"].mean() - sides["albumentations"].mean()) < 0.02


@pytest.mark.parametrize("engine", ENGINES)
def test_affine_leaves_the_image_at_zero_range_and_fills_corners_with_the_mean(engine):
    image = _batch(1)[0]
    torch.testing.assert_close(augmented(engine, image, 10, **ONLY, affine_p=1, rotate=0, scale=0),
                               normalize(image[None], NORM).expand(10, -1, -1, -1),
                               atol=1e-4, rtol=1e-4)
    white = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    out = augmented(engine, white, 200, **ONLY, affine_p=1, rotate=30, scale=0)
    corners = out[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # (B, 3, 4)
    level = normalize(white[None], NORM)[0, :, 0, 0][None, :, None]
    assert bool(((corners >= -1e-5) & (corners <= level + 1e-4)).all())  # mean to white
    assert (corners == 0).all(dim=1).float().mean() > 0.8  # the mean, unless nearly upright


def test_the_default_recipe_draws_as_before():
    """The optional transforms, at probability 0, draw no random numbers: the default batch and
    the generator's state after it are those of the crop, flip and cutout alone."""
    batch = _batch(16)
    gen = torch.Generator().manual_seed(3)
    out = augment_batch(batch, AugmentConfig(), NORM, generator=gen)
    off = AugmentConfig(vflip_p=0, rot90_p=0, color_p=0, affine_p=0)
    again = augment_batch(batch, off, NORM, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    replay = torch.Generator().manual_seed(3)
    for high in (8, 8, None, 24, 24, None):  # crop top and left, flip, hole top and left, cutout
        if high is None:
            torch.rand(16, generator=replay)
        else:
            torch.randint(0, high + 1, (16,), generator=replay)
    assert torch.equal(gen.get_state(), replay.get_state())


def test_the_full_recipe_pickles_for_dataloader_workers():
    aug = AugmentConfig(vflip_p=0.5, rot90_p=0.5, color_p=0.5, affine_p=0.5)
    image = _batch(1)[0].permute(1, 2, 0).numpy()
    transform = pickle.loads(pickle.dumps(train_transform(aug, NORM, seed=0)))
    assert transform(image=image)["image"].shape == (3, 32, 32)


@pytest.mark.parametrize("engine", ENGINES)
def test_cutout_is_one_square_hole_inside_the_image_filled_with_the_mean(engine):
    image = torch.full((3, 32, 32), 200, dtype=torch.uint8)  # far from the mean
    out = augmented(engine, image, 400, pad_to=32, flip_p=0, cutout_p=0.5, cutout_size=8)
    holes = (out == 0).all(dim=1)  # (B, H, W): pixels at the mean in every channel
    with_hole = holes.any(dim=(1, 2))
    assert 0.4 < with_hole.float().mean().item() < 0.6
    corners = []
    for hole in holes[with_hole]:
        rows, cols = hole.any(dim=1).nonzero().flatten(), hole.any(dim=0).nonzero().flatten()
        assert len(rows) == len(cols) == 8 and int(hole.sum()) == 64  # one 8x8 square
        corners.append((int(rows[0]), int(cols[0])))
    # Fully inside, anywhere: top-left corners span [0, 24].
    assert min(min(c) for c in corners) == 0 and max(max(c) for c in corners) == 24
    torch.testing.assert_close(out[~with_hole], normalize(image[None], NORM)
                               .expand(int((~with_hole).sum()), -1, -1, -1), atol=1e-5, rtol=1e-5)


def test_device_batches_cover_each_epoch_reshuffled_and_split_across_ranks():
    """Training batches are all full (each epoch leaves out the last 3 of a new order); the
    evaluation batches cover every image once, the last batch partial."""
    images, labels = _batch(103), torch.arange(103)
    batches = DeviceBatches(images, labels, batch_size=10, shuffle=True, seed=0)
    assert len(batches) == 10
    epochs = [[y for _, y in batches] for _ in range(2)]
    for order in epochs:
        assert [len(y) for y in order] == [10] * 10
        assert len(set(torch.cat(order).tolist())) == 100
    assert set(torch.cat(epochs[0]).tolist()) != set(torch.cat(epochs[1]).tolist())
    evaluation = DeviceBatches(images, labels, 10, shuffle=False)
    assert len(evaluation) == 11 and torch.equal(torch.cat([y for _, y in evaluation]), labels)
    x, y = next(iter(evaluation))
    assert torch.equal(x, images[:10]) and torch.equal(y, labels[:10])
    ranks = [torch.cat([y for _, y in DeviceBatches(images, labels, 10, True, seed=3, rank=r,
                                                    world=2)]) for r in (0, 1)]
    assert len(set(torch.cat(ranks).tolist())) == 100  # 51 + 52 images: 50 + 50 trained
    small = DeviceBatches(images[:7], labels[:7], 10, shuffle=True)  # no full batch: keep it
    assert [len(y) for _, y in small] == [7]


@pytest.mark.slow
def test_training_with_the_tensor_augmentation_learns(cifar10, tmp_path):
    data_dir, _, _ = cifar10
    proc = run_cli("cifar_ray.train", "--data-dir", str(data_dir), "--output-dir", str(tmp_path),
                   "--epochs", "3", "--val-size", "200", "--lr", "0.01", *FAST_FLAGS,
                   "--engine", "tensors")
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["test_acc"] > 0.6, results["test_acc"]  # 10 classes: chance is 0.1
    assert np.isfinite(results["test_loss"])


@pytest.mark.parametrize("engine", ENGINES)
def test_the_pad_and_the_hole_grow_with_the_image(engine):
    """At 64 pixels the recipe's pad to 40 (for 32) pads to 80, and its 8-pixel hole is 16."""
    assert scaled(AugmentConfig(), 64) == (80, 16) and scaled(AugmentConfig(), 32) == (40, 8)
    image = torch.full((3, 64, 64), 200, dtype=torch.uint8)  # far from the mean
    holes = (augmented(engine, image, 50, pad_to=32, flip_p=0, cutout_p=1) == 0).all(dim=1)
    assert [int(h.sum()) for h in holes] == [16 * 16] * 50
    shifted = (augmented(engine, image, 300, flip_p=0, cutout_p=0) == 0).all(dim=1)
    rows = {int(h.all(dim=1).sum()) for h in shifted}  # rows of padding: the vertical shift
    assert rows == set(range(9))  # shifts of up to 8 pixels, each way
