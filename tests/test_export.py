"""A checkpoint exported as ONNX (run in ONNX Runtime) and TorchScript predicts what the
checkpoint predicts, with its class names and normalisation beside it."""

import json

import numpy as np
import pytest
import torch

from cifar_ray.data.image_folders import read_folders
from tests.cifar_fixture import FOLDER_CLASSES
from tests.conftest import run_cli


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*torch.jit.load.* is deprecated")  # TorchScript, as asked
def test_exported_models_predict_what_the_checkpoint_predicts(folder_run, tmp_path):
    import onnx
    import onnxruntime

    from cifar_ray.module import load_module
    from cifar_ray.predict import classify

    data, out, _ = folder_run
    checkpoint = out / "best.ckpt"
    module = load_module(checkpoint)
    images = read_folders(data, quiet=True).test_images[:40]  # (40, 32, 32, 3) uint8
    expected = classify(module, images)
    floats = (images.transpose(0, 3, 1, 2) / 255).astype(np.float32)  # (N, 3, 32, 32) in [0, 1]
    for fmt in ("onnx", "torchscript"):
        target = tmp_path / f"model.{fmt}"
        proc = run_cli("cifar_ray.export", "--checkpoint", str(checkpoint), "--format", fmt,
                       "--output", str(target))
        assert proc.returncode == 0, proc.stderr[-3000:]
        sidecar = json.loads((tmp_path / f"model.{fmt}.json").read_text())
        assert sidecar["class_names"] == FOLDER_CLASSES
        assert sidecar["normalization"]["mean"] == pytest.approx(list(module.normalization.mean))
        if fmt == "onnx":
            session = onnxruntime.InferenceSession(str(target))
            got = session.run(None, {"images": floats})[0]
            meta = {p.key: p.value for p in onnx.load(str(target)).metadata_props}
            assert json.loads(meta["class_names"]) == FOLDER_CLASSES
            assert session.run(None, {"images": floats[:3]})[0].shape == (3, 4)  # any N
        else:
            files = {"class_names.json": ""}
            model = torch.jit.load(str(target), _extra_files=files)
            got = model(torch.from_numpy(floats)).detach().numpy()
            assert json.loads(files["class_names.json"]) == FOLDER_CLASSES
        assert (got.argmax(1) == expected.argmax(1)).all(), fmt
        assert np.allclose(got, expected, atol=1e-4), (fmt, np.abs(got - expected).max())
