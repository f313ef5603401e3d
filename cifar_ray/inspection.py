"""A made-up inspection data set, the shape of a real one (README, "Your own images"): grayscale
photos of washers, most of them good, the rest with a fine scratch, in class folders. The
recipe benchmark (`bench --sections recipe`) trains on it; a real set would do, none can be
downloaded here."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from cifar_ray.files import write_bytes

CLASSES = ("good", "faulty")


def washer(rng: np.random.Generator, size: int, faulty: bool) -> np.ndarray:
    """One (size, size) uint8 photo: a lit washer on a noisy bench; a faulty one has a thin
    scratch, a few pixels long and faint, somewhere on its face."""
    s = size / 64  # every length is written for 64 pixels
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    light = rng.uniform(60, 110) + rng.uniform(-25, 25) * (xx / size) + rng.uniform(-25, 25) * (yy / size)
    image = light.copy()
    cy, cx = size / 2 + rng.uniform(-6, 6, 2) * s
    outer, inner = rng.uniform(20, 27) * s, rng.uniform(5, 8) * s
    r = np.hypot(yy - cy, xx - cx)
    face = (r < outer) & (r > inner)
    rings = 6 * np.sin(r * rng.uniform(1.2, 2.0) / s + rng.uniform(0, 6.3))  # machining marks
    image[face] = rng.uniform(140, 190) + rings[face]
    image[r <= inner] = light[r <= inner] * 0.4
    # The scratch is drawn for every washer (the same draws either way); a faulty one shows it.
    angle, phi, depth = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi), rng.uniform(10, 60)
    length = rng.uniform(7, min(13, (outer - inner) / s - 3)) * s
    at = rng.uniform(inner + length / 2 + s, outer - length / 2 - s)
    mid = np.array([cx + at * np.cos(phi), cy + at * np.sin(phi)])
    step = np.array([np.cos(angle), np.sin(angle)]) * length / 2
    scratch = np.zeros((size, size), np.float32)
    cv2.line(scratch, tuple(np.round(mid - step).astype(int).tolist()),
             tuple(np.round(mid + step).astype(int).tolist()), 1.0, max(1, round(2 * s)),
             cv2.LINE_AA)
    image -= scratch * face * depth * faulty
    image += rng.normal(0, 6, image.shape)  # sensor noise, as strong as the machining marks
    return np.clip(cv2.GaussianBlur(image, (3, 3), rng.uniform(0.3, 0.9)), 0, 255).astype(np.uint8)


def write_inspection_set(root: Path, n_train: int = 1600, n_test: int = 600, size: int = 64,
                         faulty_share: float = 0.3, seed: int = 0) -> Path:
    """train/<class>/ and test/<class>/ PNGs under `root`; returns it."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("test", n_test)):
        faulty = rng.random(count) < faulty_share
        for i, bad in enumerate(faulty):
            png = cv2.imencode(".png", washer(rng, size, bool(bad)))[1].tobytes()
            write_bytes(root / split / CLASSES[int(bad)] / f"{i:05d}.png", png)
    return root
