"""The demo app: `python -m cifar_ray.app --checkpoint C [--data-dir D]` serves a Gradio page
where a person classifies an image with any checkpoint this project wrote, sees GradCAM over it,
and browses the model's mistakes (README.md, "The demo app"). Bad input is a plain message in
the page, never an exception's text. It binds to 127.0.0.1 unless --host says otherwise, asks
for a login when CIFAR_RAY_APP_USERNAME/PASSWORD are set, and removes its temporary files."""

from __future__ import annotations

import argparse
import importlib.util
import io
import ipaddress
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cifar_ray import cli, explain
from cifar_ray.config import DataConfig
from cifar_ray.data.arrays import ImageArrays
from cifar_ray.data.image_folders import MAX_PIXELS, read_image
from cifar_ray.data.sources import load_dataset
from cifar_ray.errors import DataError, UserError, cli_entry
from cifar_ray.module import LitResNet9, load_module
from cifar_ray.files import read_inside
from cifar_ray.names import CAM_LAYERS, DEFAULT_CAM_LAYER, GRADCAM_FIGURES, file_name, shown_name
from cifar_ray.predict import prepare, probabilities
from cifar_ray.signals import sigterm_as_ctrl_c

PREDICTED = "the predicted class"
AUTH_ENV = ("CIFAR_RAY_APP_USERNAME", "CIFAR_RAY_APP_PASSWORD")
UPLOADS_KEPT_S = 3600  # Gradio deletes uploads older than this, this often
MAX_FIGURE_BYTES = 64 << 20  # a report's figure or JSON the app reads


def markdown(name: str) -> str:
    """A class name inside the page's Markdown: shown_name's, its markup characters escaped."""
    return "".join("\\" + c if c in "\\`*_{}[]<>()#+-.!|~" else c for c in shown_name(name))


class Classifier:
    """A checkpoint, ready to classify one image and explain it."""

    def __init__(self, checkpoint: str | Path):
        self.module: LitResNet9 = load_module(checkpoint)  # weights_only=True, eval mode, CPU
        self.classes = self.module.class_names

    def read(self, path: str | None) -> np.ndarray:
        """An uploaded file -> an (s, s, 3) uint8 RGB image at the model's size, read as `predict` and the
        training data read images; UserError if it is not an image."""
        if not path:
            raise UserError("No image yet: upload an image file (PNG, JPEG, BMP, GIF, WebP, ...) "
                            "or pick an example.")
        name = Path(path).name
        if os.path.getsize(path) == 0:
            raise UserError(f"'{name}' is empty (0 bytes): upload an image file.")
        try:
            return read_image(path, self.module.image_size)
        except DataError as exc:
            if "megapixels" in str(exc):
                raise UserError(f"'{name}' has more pixels than this app reads "
                                f"({MAX_PIXELS // 1_000_000} megapixels).") from None
            raise UserError(f"'{name}' is not an image this app can read: "
                            "upload a PNG, JPEG, BMP, GIF or WebP file.") from None

    def answer(self, path: str | None, top_k: int, cam_class: str, layer: str,
               opacity: float) -> tuple:
        """What the page shows for an upload: (probabilities, the image as the model sees it,
        the CAM overlay, a caption); an unexpected error's text goes to the server's console."""
        try:
            picture = self.read(path)
            top, shown, caption = self.explain(picture, int(top_k), cam_class, layer, opacity)
        except UserError as exc:
            return None, None, None, f"⚠️ {exc}"
        except Exception:
            traceback.print_exc(file=sys.stderr)
            return None, None, None, ("⚠️ This image could not be classified; the server's "
                                      "console has the details.")
        side = max(128, picture.shape[0])  # shown at least 128 pixels wide
        big = np.asarray(Image.fromarray(picture).resize((side, side), Image.Resampling.NEAREST))
        return top, big, shown, caption

    def explain(self, picture: np.ndarray, top_k: int, cam_class: str, layer: str,
                opacity: float) -> tuple[dict[str, float], np.ndarray, str]:
        """Top-k probabilities, the CAM overlay, and a one-line caption."""
        x = prepare(self.module, picture[None])  # (1, 3, s, s); the CAM below needs it too
        probs = probabilities(self.module, x)[0]
        order = np.argsort(-probs)[:top_k]
        top = {shown_name(self.classes[i]): float(probs[i]) for i in order}
        class_id = int(order[0]) if cam_class == PREDICTED else self.classes.index(cam_class)
        cam = explain.compute_cams(self.module, x, [class_id], layer, torch.device("cpu"))[0]
        shown = explain.heatmap_over(picture.astype(np.float32) / 255, cam, image_weight=1 - opacity)
        caption = (f"Predicted **{markdown(self.classes[order[0]])}** ({probs[order[0]]:.1%}). "
                   f"GradCAM for **{markdown(self.classes[class_id])}** at `{layer}`: red is "
                   "where the evidence for it is.")
        return top, shown, caption


def gallery(checkpoint: Path, data_dir: str | None, arrays: ImageArrays | None,
            report_dir: str | None, workdir: Path) -> tuple[list, str]:
    """The mistakes figures: an existing report, or one computed now from the data set (into
    `workdir`)."""
    folder = Path(report_dir) if report_dir else checkpoint.parent / "gradcam"
    if not (folder / "misclassified.json").is_file():
        if arrays is None:
            return [], ("No GradCAM report beside the checkpoint; start the app with `--data-dir` "
                        "to compute one.")
        folder = workdir / "gradcam"
        print(f"app: computing the GradCAM report of the test set into {folder} ...", flush=True)
        explain.analyse(checkpoint, data_dir, folder, device="cpu", arrays=arrays)
    try:
        return figures(folder), report_summary(folder)
    except UserError as exc:  # a damaged or planted report: said in the page, not served
        print(f"app: the GradCAM report in {folder} is not served: {exc}", file=sys.stderr)
        return [], f"The GradCAM report in `{shown_name(folder)}` cannot be shown: it is damaged."


def figures(folder: Path) -> list[tuple[Image.Image, str]]:
    """The report's figures, read through files.read_inside (a link there is refused, never
    followed) and decoded here: the page gets pictures, never a path to serve."""
    items = []
    for name, caption in GRADCAM_FIGURES.items():
        if (folder / name).is_file() or (folder / name).is_symlink():
            data = read_inside(folder, name, MAX_FIGURE_BYTES)
            try:
                with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
                    if image.width * image.height > MAX_PIXELS:
                        raise UserError(f"{name}: too many pixels")
                    items.append((image.convert("RGB"), caption))
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise UserError(f"{name}: not a PNG figure ({type(exc).__name__})") from None
    return items


def report_summary(folder: Path) -> str:
    """The line above the figures, from the report's misclassified.json."""
    try:
        summary = json.loads(read_inside(folder, "misclassified.json", MAX_FIGURE_BYTES))
        return (f"{int(summary['mistakes'])} of the {int(summary['images'])} "
                f"{shown_name(summary['split'])} images misclassified (accuracy "
                f"{float(summary['accuracy']):.1%}); GradCAM at "
                f"`{shown_name(summary['target_layer'])}`. Report: `{shown_name(folder)}`")
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
        raise UserError(f"misclassified.json: {type(exc).__name__}") from None


def example_files(arrays: ImageArrays | None, workdir: Path, count: int = 8) -> list[str]:
    """The first test images of the data set, as PNG files the page can offer as examples."""
    if arrays is None:
        return []
    folder = workdir / "examples"
    folder.mkdir()
    paths = []
    for i in range(min(count, len(arrays.test_labels))):
        path = folder / f"test_{i}_{file_name(arrays.classes[arrays.test_labels[i]])}.png"
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
        arrays = load_dataset(DataConfig(dataset=classifier.module.data_config.dataset,
                                         data_dir=data_dir,
                                         image_size=classifier.module.image_size))
    # The examples and a computed report: removed with the app.
    workdir = tempfile.TemporaryDirectory(prefix="cifar_ray_app_")
    examples = example_files(arrays, Path(workdir.name))
    figures, report_note = gallery(checkpoint, data_dir, arrays, report_dir, Path(workdir.name))

    module = classifier.module
    with gr.Blocks(title="cifar_ray: ResNet-9 classifier", analytics_enabled=False,
                   delete_cache=(UPLOADS_KEPT_S, UPLOADS_KEPT_S)) as demo:
        gr.Markdown(f"# ResNet-9 on {module.data_config.dataset.upper()}\n`{checkpoint.name}`: "
                    f"{module.num_classes} classes, width {module.width}. Upload an image: it is resized to "
                    f"{module.image_size}x{module.image_size}, classified, and GradCAM shows "
                    "where the model looked.")
        with gr.Tab("Classify"):
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(label="Image file", elem_id="upload")
                    if examples:
                        gr.Examples(examples=[[p] for p in examples], inputs=[upload],
                                    label="Test images")
                    top_k = gr.Slider(1, module.num_classes, value=min(5, module.num_classes), step=1,
                                      label="Classes to show (top k)")
                    cam_class = gr.Dropdown([PREDICTED, *classifier.classes], value=PREDICTED,
                                            label="GradCAM for")
                    layer = gr.Dropdown(list(CAM_LAYERS), value=DEFAULT_CAM_LAYER, label="Layer")
                    opacity = gr.Slider(0.0, 1.0, value=0.45, step=0.05, label="CAM opacity")
                with gr.Column(scale=2):
                    status = gr.Markdown("Upload an image or pick a test image.", elem_id="status")
                    with gr.Row():
                        seen = gr.Image(label=f"What the model sees ({module.image_size}x{module.image_size})",
                                        elem_id="seen", interactive=False)
                        cam = gr.Image(label="GradCAM", elem_id="cam", interactive=False)
                    prediction = gr.Label(label="Prediction", elem_id="prediction")
            gr.on(triggers=[upload.change, top_k.release, cam_class.change, layer.change,
                            opacity.release],
                  fn=classifier.answer, inputs=[upload, top_k, cam_class, layer, opacity],
                  outputs=[prediction, seen, cam, status])
        with gr.Tab("Mistakes"):
            gr.Markdown(report_note)
            gr.Gallery(value=figures, columns=2, height=720, object_fit="contain",
                       label="Misclassified test images (click one to enlarge)", elem_id="gallery")
    demo.workdir = workdir  # lives as long as the app
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("app", "The demo app: classify an uploaded image and see its GradCAM, "
                               "and browse a checkpoint's mistakes, in the browser.")
    parser.add_argument("--checkpoint", required=True, help="a .ckpt this project wrote")
    parser.add_argument("--data-dir", help="the data set: test images as examples, and the "
                                           "mistakes report when none is beside the checkpoint")
    parser.add_argument("--report-dir", help="a gradcam stage output dir (default: gradcam/ "
                                             "beside the checkpoint)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (0.0.0.0: every network this machine is on)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--max-upload-mb", type=float, default=10.0,
                        help="largest file a visitor may upload, in megabytes")
    return parser


def credentials() -> tuple[str, str] | None:
    """The login the app asks for, from the environment (never from argv, which any user of
    the machine can read in the process list); None when neither variable is set."""
    user, password = (os.environ.get(name, "") for name in AUTH_ENV)
    if bool(user) != bool(password):
        raise UserError(f"set both {AUTH_ENV[0]} and {AUTH_ENV[1]} for a login, or neither")
    return (user, password) if user else None


def is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.max_upload_mb <= 1024:
        raise UserError(f"--max-upload-mb must be in (0, 1024], got {args.max_upload_mb}")
    auth = credentials()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if importlib.util.find_spec("gradio") is None:
        raise UserError('the app needs Gradio: pip install -e ".[app]"')
    demo = build(args.checkpoint, args.data_dir, args.report_dir)
    if not is_local(args.host):
        print(f"warning: serving on {args.host}: other machines can reach this app"
              + ("" if auth else f"; set {AUTH_ENV[0]} and {AUTH_ENV[1]} to require a login"),
              file=sys.stderr, flush=True)
    print(f"app: http://{args.host}:{args.port} (Ctrl-C to stop)"
          + (" (login required)" if auth else ""), flush=True)
    sigterm_as_ctrl_c()
    try:
        demo.launch(server_name=args.host, server_port=args.port, show_error=False, quiet=True,
                    auth=auth, max_file_size=int(args.max_upload_mb * 1024 * 1024))
    except OSError as exc:
        raise UserError(f"cannot serve on {args.host}:{args.port}: {exc}") from None
    except KeyboardInterrupt:
        pass
    finally:
        demo.workdir.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
