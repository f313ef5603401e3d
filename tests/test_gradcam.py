"""`python -m cifar_ray.gradcam`: the report's files, its agreement with the model, and whether
GradCAM really points at the evidence (a planted patch at a known place)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_ray.config import Config
from cifar_ray.data.augment import eval_transform
from cifar_ray.data.cifar_files import SPECS
from cifar_ray.explain import compute_cams
from cifar_ray.module import load_module
from cifar_ray.names import DEFAULT_CAM_LAYER
from cifar_ray.training import run
from tests.cifar_fixture import PATCH, planted_images
from tests.conftest import mains_in_a_fresh_process, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def weak_checkpoint(cifar10, tmp_path_factory):
    """One epoch on 400 images: a model that still makes plenty of mistakes."""
    cfg = Config()
    cfg.data.data_dir, cfg.data.val_size, cfg.data.limit_train = str(cifar10[0]), 200, 400
    cfg.data.num_workers, cfg.model.width, cfg.trainer.epochs = 0, 16, 1
    cfg.trainer.batch_size, cfg.trainer.progress_bar = 64, False
    cfg.trainer.output_dir = str(tmp_path_factory.mktemp("weak"))
    return run(cfg)["checkpoint"]


@pytest.fixture(scope="module")
def report(weak_checkpoint, cifar10, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    proc = run_cli("cifar_ray.gradcam", "--checkpoint", weak_checkpoint, "--data-dir",
                   str(cifar10[0]), "--output-dir", str(out), "--num-images", "8",
                   "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def _test_images(cifar10):
    _, _, test = cifar10
    transform = eval_transform(SPECS["cifar10"].norm)
    return torch.stack([transform(image=img)["image"] for img in test.images]), test


def test_figures_are_real_pngs_of_readable_size(report):
    out, proc = report
    for name, min_size in [("misclassified.png", (1000, 500)), ("gradcam_true_vs_pred.png", (900, 700)),
                           ("confusion_matrix.png", (500, 500)), ("per_class_accuracy.png", (500, 250))]:
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG"
            assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], (name, image.size)
    page = (out / "index.html").read_text()
    assert all(f'src="{name}"' in page for name in ("misclassified.png", "confusion_matrix.png"))
    assert "report:" in proc.stdout


def test_misclassified_json_agrees_with_the_model(report, weak_checkpoint, cifar10):
    out, _ = report
    listed = json.loads((out / "misclassified.json").read_text())
    images, test = _test_images(cifar10)
    with torch.no_grad():
        probs = load_module(weak_checkpoint)(images).exp().numpy()
    predicted = probs.argmax(1)
    wrong = set(np.flatnonzero(predicted != test.labels).tolist())
    assert wrong, "the weak model should make mistakes"
    assert {m["index"] for m in listed["misclassified"]} == wrong
    assert listed["mistakes"] == len(wrong) and listed["shown"] == 8
    confidences = [m["probability"] for m in listed["misclassified"]]
    assert confidences == sorted(confidences, reverse=True)  # most confident first
    first = listed["misclassified"][0]
    assert first["true"] == f"class_{test.labels[first['index']]}"
    assert first["probability"] == pytest.approx(probs[first["index"]].max(), abs=1e-5)
    assert listed["accuracy"] == pytest.approx(1 - len(wrong) / len(test.labels))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cams_are_in_unit_range_and_the_model_mode_is_restored(weak_checkpoint, cifar10, mode):
    module = load_module(weak_checkpoint).train(mode == "train")
    images, test = _test_images(cifar10)
    with torch.inference_mode():  # as inside Lightning's test loop: CAM must still work
        cams = compute_cams(module, images[:6], test.labels[:6].tolist(), DEFAULT_CAM_LAYER,
                            torch.device("cpu"))
    assert cams.shape == (6, 32, 32) and cams.min() >= 0 and cams.max() <= 1 and cams.max() > 0.5
    assert module.training is (mode == "train")
    assert all(m.training is (mode == "train") for m in module.modules())


@pytest.mark.parametrize("layer,batch", [(DEFAULT_CAM_LAYER, 1), (DEFAULT_CAM_LAYER, 37),
                                         ("layer1_R", 9), ("prep", 4)])
def test_batched_cams_equal_the_grad_cam_package(weak_checkpoint, cifar10, layer, batch):
    """compute_cams batches grad-cam's GradCAM on the device: the maps must be the package's."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from cifar_ray.explain import target_layer

    module = load_module(weak_checkpoint)
    images, test = _test_images(cifar10)
    ids = np.random.default_rng(batch).integers(0, 10, batch).tolist()  # any class, not the true one
    with GradCAM(model=module, target_layers=[target_layer(module, layer)]) as cam:
        expected = cam(images[:batch].clone(), [ClassifierOutputTarget(c) for c in ids])
    got = compute_cams(module, images[:batch], ids, layer, torch.device("cpu"))
    assert got.shape == expected.shape == (batch, 32, 32)
    assert expected.max() > 0.5  # real maps, not all zero
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_gradcam_peaks_on_the_planted_patch(trained_run):
    """The class is decided by a colour patch at a known place: the CAM for the true class
    must peak inside it for most images (a random peak would land there ~10% of the time)."""
    out, _ = trained_run
    module = load_module(out / "best.ckpt")
    planted = planted_images(120, 10, seed=7)
    transform = eval_transform(SPECS["cifar10"].norm)
    images = torch.stack([transform(image=img)["image"] for img in planted.images])
    cams = compute_cams(module, images, planted.labels.tolist(), DEFAULT_CAM_LAYER,
                        torch.device("cpu"))
    hits = 0
    for cam, (row, col) in zip(cams, planted.boxes):
        peak_row, peak_col = np.unravel_index(cam.argmax(), cam.shape)
        hits += row <= peak_row < row + PATCH and col <= peak_col < col + PATCH
    assert hits / len(cams) > 0.5, f"peak inside the patch for only {hits} of {len(cams)}"


def test_a_wrong_layer_name_lists_the_valid_ones(weak_checkpoint, cifar10, tmp_path):
    proc = run_cli("cifar_ray.gradcam", "--checkpoint", weak_checkpoint, "--data-dir",
                   str(cifar10[0]), "--output-dir", str(tmp_path), "--target-layer", "layer9")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown target layer 'layer9'" in lines[0] and "layer3_R" in lines[0]


def test_a_bad_checkpoint_is_one_line_and_exit_2(tmp_path, cifar10):
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    proc = run_cli("cifar_ray.gradcam", "--checkpoint", str(tmp_path / "bad.ckpt"), "--data-dir",
                   str(cifar10[0]))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "not a loadable checkpoint" in proc.stderr


def test_validation_split_uses_the_training_split(weak_checkpoint, cifar10, tmp_path):
    from cifar_ray.explain import analyse

    summary = analyse(weak_checkpoint, cifar10[0], tmp_path, num_images=4, split="val",
                      device="cpu")
    assert summary["images"] == 200 and summary["split"] == "val"


def test_help_and_bad_flags_answer_before_torch_is_imported(tmp_path):
    given = ["--checkpoint", str(tmp_path / "model.ckpt"), "--output-dir", str(tmp_path / "g")]
    calls = [["--help"], [*given, "--batch-size", "0"], [*given, "--num-images", "0"]]
    codes, imported, stderr = mains_in_a_fresh_process("gradcam", calls)
    assert codes == [0, 2, 2] and imported == [], (codes, imported, stderr)
    assert stderr.strip().splitlines() == ["error: --batch-size must be >= 1, got 0",
                                           "error: --num-images must be >= 1, got 0"]
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_into_a_place_that_cannot_be_written_is_one_line(weak_checkpoint, tmp_path, fmt):
    (tmp_path / "taken").write_text("a file, where a folder should be")
    target = tmp_path / "taken" / "model.bin"
    proc = run_cli("cifar_ray.export", "--checkpoint", weak_checkpoint, "--format", fmt,
                   "--output", str(target))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {tmp_path / 'taken'}"), \
        proc.stderr[-2000:]
