"""Your own images at their own resolution (`data.image_size`): a data set whose class is fine
detail (tests/cifar_fixture.py, `stripes`) is learned at 64 pixels and not at 32; a checkpoint
trained at 64 goes through GradCAM, export (run in ONNX Runtime), predict and the app at its own
size; bad sizes are one line. (A search over data.image_size: tests/test_tune.py.)"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_ray.errors import UserError
from tests.cifar_fixture import STRIPE_CLASSES, stripes, write_stripes
from tests.conftest import FAST_FLAGS, run_cli


@pytest.fixture(scope="module")
def stripe_runs(tmp_path_factory):
    """The stripes set, and a training run on it at each of 64 and 32 pixels: (data, {size: out})."""
    data = write_stripes(tmp_path_factory.mktemp("stripes"), n_train=300, n_test=100, n_val=60)
    runs = {}
    for size in (64, 32):
        out = tmp_path_factory.mktemp(f"stripes_{size}")
        proc = run_cli("cifar_ray.train", "--dataset", "folder", "--data-dir", str(data),
                       "--output-dir", str(out), "--image-size", str(size), "--epochs", "4",
                       "--lr", "0.01", *FAST_FLAGS)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert f"at {size}x{size}" in proc.stdout  # decoded at the size asked for
        runs[size] = out
    return data, runs


@pytest.mark.slow
def test_fine_detail_is_learned_at_64_pixels_and_lost_at_32(stripe_runs):
    _, runs = stripe_runs
    accuracy = {size: json.loads((out / "results.json").read_text())["test_acc"]
                for size, out in runs.items()}
    assert accuracy[64] > 0.9, accuracy  # two classes: chance is 0.5
    assert accuracy[32] < 0.7, accuracy  # at 32 pixels every image is the same grey
    from cifar_ray.module import load_module
    assert {size: load_module(out / "best.ckpt").image_size for size, out in runs.items()} \
        == {64: 64, 32: 32}


def _pictures(folder, n: int = 6) -> tuple[list[str], list[int]]:
    """`n` stripes images of 128 pixels written as PNG files, and their labels."""
    rng = np.random.default_rng(7)
    paths, labels = [], []
    for i in range(n):
        path = folder / f"picture{i}.png"
        Image.fromarray(stripes(i % 2, 128, rng)).save(path)
        paths.append(str(path))
        labels.append(i % 2)
    return paths, labels


@pytest.mark.slow
def test_a_64_pixel_checkpoint_is_explained_exported_and_served_at_64(stripe_runs, tmp_path):
    import onnxruntime

    from cifar_ray.app import PREDICTED, Classifier
    from cifar_ray.data.image_folders import read_image
    from cifar_ray.explain import compute_cams
    from cifar_ray.module import load_module
    from cifar_ray.predict import classify, prepare

    data, runs = stripe_runs
    checkpoint = runs[64] / "best.ckpt"
    module = load_module(checkpoint)
    paths, labels = _pictures(tmp_path)
    images = np.stack([read_image(p, 64) for p in paths])  # (6, 64, 64, 3)
    expected = classify(module, images)
    assert (expected.argmax(1) == labels).all()

    # GradCAM: the command's report, and maps as large as the image.
    proc = run_cli("cifar_ray.gradcam", "--checkpoint", str(checkpoint), "--data-dir", str(data),
                   "--output-dir", str(tmp_path / "gradcam"), "--num-images", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "gradcam" / "index.html").is_file()
    cams = compute_cams(module, prepare(module, images), labels, "layer3_R", torch.device("cpu"))
    assert cams.shape == (6, 64, 64) and cams.max() == pytest.approx(1, abs=1e-3)

    # Export: ONNX Runtime takes (N, 3, 64, 64) and answers as the checkpoint does.
    target = tmp_path / "model.onnx"
    proc = run_cli("cifar_ray.export", "--checkpoint", str(checkpoint), "--format", "onnx",
                   "--output", str(target))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sidecar = json.loads((tmp_path / "model.onnx.json").read_text())
    assert sidecar["input"]["shape"] == ["N", 3, 64, 64]
    session = onnxruntime.InferenceSession(str(target))
    assert session.get_inputs()[0].shape[1:] == [3, 64, 64]
    floats = (images.transpose(0, 3, 1, 2) / 255).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"images": floats})[0], expected, atol=1e-4)

    # predict reads each file at the checkpoint's size.
    proc = run_cli("cifar_ray.predict", "--checkpoint", str(checkpoint), *paths, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = [a["top"][0]["class"] for a in json.loads(proc.stdout)]
    assert answers == [STRIPE_CLASSES[k] for k in labels]

    # The app's classify function: the image as the model sees it is 64 pixels (shown at 128).
    top, seen, cam, caption = Classifier(checkpoint).answer(paths[1], 2, PREDICTED,
                                                            "layer3_R", 0.5)
    assert max(top, key=top.get) == STRIPE_CLASSES[1], caption
    assert seen.shape == (128, 128, 3) and cam.shape == (128, 128, 3)


@pytest.mark.parametrize("size, message", [
    ("0", "data.image_size must be a multiple of 8 from 8 to 256 (the network halves it three "
          "times), got 0"),
    ("-32", "got -32"), ("30", "got 30"), ("512", "got 512")])
def test_a_bad_image_size_is_one_line_and_exit_2(tmp_path, capsys, size, message):
    from cifar_ray.train import main
    assert main(["--image-size", size, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.image_size must be") and message in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_a_searched_image_size_takes_choice_of_sizes_the_network_can_take(tmp_path):
    from cifar_ray.search.settings import SearchConfig, parse_space
    with pytest.raises(UserError, match="image sizes are multiples of 8: use choice"):
        parse_space({"data.image_size": {"randint": [16, 64]}}, SearchConfig())
    with pytest.raises(UserError, match="20 does not fit"):
        parse_space({"data.image_size": {"choice": [32, 20]}}, SearchConfig())
    cfg = SearchConfig()
    cfg.search = {"data.image_size": {"choice": [32, 64, 48]}}
    assert cfg.largest_image_size() == 64
