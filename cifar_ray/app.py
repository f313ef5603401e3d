"""The demo app: `python -m cifar_ray.app --checkpoint C [--data-dir D] [--host 127.0.0.1]
[--port 7860]` serves a Gradio page (install with `pip install -e ".[app]"`) where a person can
try any checkpoint this project wrote.

  Classify   upload an image (any size, any common format: it is resized to 32x32) or pick a
             test image; see the top-k classes with their probabilities, and the GradCAM of a
             chosen class at a chosen layer, over the image at a chosen opacity.
  Mistakes   the misclassified test images and their CAMs: the gradcam stage's report beside
             the checkpoint when there is one, else computed from --data-dir at start.

Bad input (a file that is not an image, an empty file) gets a message in the page; the app
keeps running. It binds to 127.0.0.1 unless --host says otherwise, and runs on the CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cifar_ray import gradcam
from cifar_ray.config import DataConfig
from cifar_ray.cifar_files import CifarArrays, load_dataset
from cifar_ray.errors import DataError, UserError, cli_entry
from cifar_ray.image_folders import read_image
from cifar_ray.model import CAM_LAYERS
from cifar_ray.module import LitResNet9, load_module
from cifar_ray.predict import prepare, probabilities

PREDICTED = "the predicted class"


class Classifier:
    """A checkpoint, ready to classify one image and explain it."""

    def __init__(self, checkpoint: str | Path):
        self.module: LitResNet9 = load_module(checkpoint)  # weights_only=True, eval mode, CPU
        self.classes = self.module.class_names

    def read(self, path: str | None) -> np.ndarray:
        """An uploaded file -> a (32, 32, 3) uint8 RGB image, read as `predict` and the
        training data read images; UserError if it is not an image."""
        if not path:
            raise UserError("No image yet: upload an image file (PNG, JPEG, BMP, GIF, WebP, ...) "
                            "or pick an example.")
        name = Path(path).name
        if os.path.getsize(path) == 0:
            raise UserError(f"'{name}' is empty (0 bytes): upload an image file.")
        try:
            return read_image(path)
        except DataError:
            raise UserError(f"'{name}' is not an image this app can read: "
                            "upload a PNG, JPEG, BMP, GIF or WebP file.") from None

    def explain(self, picture: np.ndarray, top_k: int, cam_class: str, layer: str,
                opacity: float) -> tuple[dict[str, float], np.ndarray, str]:
        """Top-k probabilities, the CAM overlay, and a one-line caption."""
        x = prepare(self.module, picture[None])  # (1, 3, 32, 32); the CAM below needs it too
        probs = probabilities(self.module, x)[0]
        order = np.argsort(-probs)[:top_k]
        top = {self.classes[i]: float(probs[i]) for i in order}
        class_id = int(order[0]) if cam_class == PREDICTED else self.classes.index(cam_class)
        cam = gradcam.compute_cams(self.module, x, [class_id], layer, torch.device("cpu"))[0]
        shown = gradcam.overlay(picture.astype(np.float32) / 255, cam, image_weight=1 - opacity)
        caption = (f"Predicted **{self.classes[order[0]]}** ({probs[order[0]]:.1%}). GradCAM for "
                   f"**{self.classes[class_id]}** at `{layer}`: red is where the evidence for it is.")
        return top, shown, caption


def gallery(checkpoint: Path, data_dir: str | None, arrays: CifarArrays | None,
            report_dir: str | None) -> tuple[list, str]:
    """The mistakes figures: an existing report, or one computed now from the data set."""
    folder = Path(report_dir) if report_dir else checkpoint.parent / "gradcam"
    if not (folder / "misclassified.json").is_file():
        if arrays is None:
            return [], ("No GradCAM report beside the checkpoint; start the app with `--data-dir` "
                        "to compute one.")
        folder = Path(tempfile.mkdtemp(prefix="cifar_ray_app_"))
        print(f"app: computing the GradCAM report of the test set into {folder} ...", flush=True)
        gradcam.analyse(checkpoint, data_dir, folder, device="cpu", arrays=arrays)
    items = [(str(folder / name), caption) for name, caption in gradcam.FIGURES.items()
             if (folder / name).is_file()]
    summary = json.loads((folder / "misclassified.json").read_text())
    return items, (f"{summary['mistakes']} of the {summary['images']} {summary['split']} images "
                   f"misclassified (accuracy {summary['accuracy']:.1%}); GradCAM at "
                   f"`{summary['target_layer']}`. Report: `{folder}`")


def example_files(arrays: CifarArrays | None, count: int = 8) -> list[str]:
    """The first test images of the data set, as PNG files the page can offer as examples."""
    if arrays is None:
        return []
    folder = Path(tempfile.mkdtemp(prefix="cifar_ray_examples_"))
    paths = []
    for i in range(min(count, len(arrays.test_labels))):
        path = folder / f"test_{i}_{arrays.classes[arrays.test_labels[i]]}.png"
        Image.fromarray(arrays.test_images[i]).save(path)
        paths.append(str(path))
    return paths


def build(checkpoint: str | Path, data_dir: str | None = None, report_dir: str | None = None):
    """The Gradio Blocks app (a Hugging Face Space's app.py calls this, then `.launch()`)."""
    import gradio as gr

    checkpoint = Path(checkpoint).expanduser().resolve()
    classifier = Classifier(checkpoint)
    arrays = None  # read once, for the examples and for a report computed here
    if data_dir:
        arrays = load_dataset(DataConfig(dataset=classifier.module.hparams.dataset,
                                         data_dir=data_dir))
    examples = example_files(arrays)
    figures, report_note = gallery(checkpoint, data_dir, arrays, report_dir)

    def classify(path, top_k, cam_class, layer, opacity):
        try:
            picture = classifier.read(path)
        except UserError as exc:
            return None, None, None, f"⚠️ {exc}"
        top, shown, caption = classifier.explain(picture, int(top_k), cam_class, layer, opacity)
        big = np.asarray(Image.fromarray(picture).resize((128, 128), Image.Resampling.NEAREST))
        return top, big, shown, caption

    h = classifier.module.hparams
    with gr.Blocks(title="cifar_ray: ResNet-9 classifier", analytics_enabled=False) as demo:
        gr.Markdown(f"# ResNet-9 on {h.dataset.upper()}\n`{checkpoint.name}`: "
                    f"{h.num_classes} classes, width {h.width}. Upload an image: it is resized to "
                    "32x32, classified, and GradCAM shows where the model looked.")
        with gr.Tab("Classify"):
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(label="Image file", elem_id="upload")
                    if examples:
                        gr.Examples(examples=[[p] for p in examples], inputs=[upload],
                                    label="Test images")
                    top_k = gr.Slider(1, h.num_classes, value=min(5, h.num_classes), step=1,
                                      label="Classes to show (top k)")
                    cam_class = gr.Dropdown([PREDICTED, *classifier.classes], value=PREDICTED,
                                            label="GradCAM for")
                    layer = gr.Dropdown(list(CAM_LAYERS), value=gradcam.DEFAULT_LAYER, label="Layer")
                    opacity = gr.Slider(0.0, 1.0, value=0.45, step=0.05, label="CAM opacity")
                with gr.Column(scale=2):
                    status = gr.Markdown("Upload an image or pick a test image.", elem_id="status")
                    with gr.Row():
                        seen = gr.Image(label="What the model sees (32x32, shown 4x)",
                                        elem_id="seen", interactive=False)
                        cam = gr.Image(label="GradCAM", elem_id="cam", interactive=False)
                    prediction = gr.Label(label="Prediction", elem_id="prediction")
            gr.on(triggers=[upload.change, top_k.release, cam_class.change, layer.change,
                            opacity.release],
                  fn=classify, inputs=[upload, top_k, cam_class, layer, opacity],
                  outputs=[prediction, seen, cam, status])
        with gr.Tab("Mistakes"):
            gr.Markdown(report_note)
            gr.Gallery(value=figures, columns=2, height=720, object_fit="contain",
                       label="Misclassified test images (click one to enlarge)", elem_id="gallery")
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a .ckpt this project wrote")
    parser.add_argument("--data-dir", help="the data set: test images as examples, and the "
                                           "mistakes report when none is beside the checkpoint")
    parser.add_argument("--report-dir", help="a gradcam stage output dir (default: gradcam/ "
                                             "beside the checkpoint)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=7860)
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if importlib.util.find_spec("gradio") is None:
        raise UserError('the app needs Gradio: pip install -e ".[app]"')
    demo = build(args.checkpoint, args.data_dir, args.report_dir)
    print(f"app: http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    try:
        demo.launch(server_name=args.host, server_port=args.port, show_error=True, quiet=True)
    except OSError as exc:
        raise UserError(f"cannot serve on {args.host}:{args.port}: {exc}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
