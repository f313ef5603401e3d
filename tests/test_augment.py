"""The batched tensor augmentation (cifar_ray/augment.py's tensor engine), run here on CPU tensors: the same
distribution as the Albumentations recipe (crop offsets within the pad, flip rate, hole size and
fill), device batches that cover each epoch once, and a run that learns with it."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from cifar_ray.config import AugmentConfig
from cifar_ray.data.augment import augment_batch, normalize, train_transform
from cifar_ray.data.cifar_files import SPECS
from cifar_ray.data.datamodule import DeviceBatches
from tests.conftest import FAST_FLAGS, run_cli
from tests.test_data import find_shift

NORM = SPECS["cifar10"].norm


def _batch(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)


def _augment(images: torch.Tensor, seed: int = 0, **aug) -> torch.Tensor:
    return augment_batch(images, AugmentConfig(**aug), NORM,
                         generator=torch.Generator().manual_seed(seed))


def test_normalisation_matches_albumentations():
    image = _batch(1)
    ours = normalize(image, NORM)[0]
    theirs = train_transform(AugmentConfig(pad_to=32, flip_p=0, cutout_p=0), NORM, seed=0)(
        image=image[0].permute(1, 2, 0).numpy())["image"]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_crops_are_shifts_within_the_pad_distributed_like_albumentations():
    images = _batch(1).expand(900, -1, -1, -1)
    reference = normalize(images[:1], NORM)[0]
    out = _augment(images, flip_p=0, cutout_p=0)
    ours = [find_shift(o, reference) for o in out]
    assert None not in ours  # each crop is the image shifted by at most 4 pixels, zero-filled
    album = train_transform(AugmentConfig(flip_p=0, cutout_p=0), NORM, seed=1)
    image = images[0].permute(1, 2, 0).numpy()
    theirs = [find_shift(album(image=image)["image"], reference) for _ in range(900)]
    for axis in (0, 1):  # both uniform over the 9 offsets: about 100 each of 900
        for counts in (Counter(s[axis] for s in ours), Counter(s[axis] for s in theirs)):
            assert set(counts) == set(range(-4, 5)) and all(60 < c < 140 for c in counts.values())


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_flip_rate_is_the_configured_probability(p):
    images = _batch(1).expand(1000, -1, -1, -1)
    reference = normalize(images[:1], NORM)[0]
    out = _augment(images, pad_to=32, flip_p=p, cutout_p=0)
    flipped = torch.tensor([torch.equal(o, reference.flip(-1)) for o in out])
    kept = torch.tensor([torch.equal(o, reference) for o in out])
    assert bool((flipped | kept).all())
    assert abs(flipped.float().mean().item() - p) < 0.05


def test_cutout_is_one_square_hole_inside_the_image_filled_with_the_mean():
    images = torch.full((400, 3, 32, 32), 200, dtype=torch.uint8)  # far from the mean
    out = _augment(images, pad_to=32, flip_p=0, cutout_p=0.5, cutout_size=8)
    holes = (out == 0).all(dim=1)  # (B, H, W): pixels at the mean in every channel
    with_hole = holes.any(dim=(1, 2))
    assert 0.4 < with_hole.float().mean().item() < 0.6
    corners = []
    for hole in holes[with_hole]:
        rows, cols = hole.any(dim=1).nonzero().flatten(), hole.any(dim=0).nonzero().flatten()
        assert len(rows) == len(cols) == 8 and int(hole.sum()) == 64  # one 8x8 square
        corners.append((int(rows[0]), int(cols[0])))
    # Fully inside, anywhere: top-left corners span [0, 24] (Albumentations' CoarseDropout).
    assert min(min(c) for c in corners) == 0 and max(max(c) for c in corners) == 24
    assert torch.equal(out[~with_hole], normalize(images[:1], NORM)
                       .expand(int((~with_hole).sum()), -1, -1, -1))


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
