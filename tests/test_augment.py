"""The augmentation recipe, each rule checked on both engines (Albumentations, per image; the
batched tensor ops, here on CPU tensors): normalised float CHW, crops that are shifts within the
pad and uniform over them, the flip rate, one square hole filled with the mean; device batches
that cover each epoch once; and a run that learns with the tensor engine."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from cifar_ray.config import AugmentConfig
from cifar_ray.data.augment import augment_batch, normalize, scaled, train_transform
from cifar_ray.data.cifar_files import SPECS
from cifar_ray.data.datamodule import DeviceBatches
from tests.conftest import FAST_FLAGS, run_cli

NORM = SPECS["cifar10"].norm
ENGINES = ["albumentations", "tensors"]


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
