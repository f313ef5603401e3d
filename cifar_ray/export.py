"""Export a checkpoint to run without this package:
`python -m cifar_ray.export --checkpoint C --format onnx|torchscript [--output F]`. The model
takes (N, 3, s, s) floats in [0, 1] (s: the size it was trained at), normalises them as training did, and returns class
probabilities; the class names travel inside the file and in a sidecar `<output>.json`
(README.md, "Export and predict", shows how to run it)."""

from __future__ import annotations

import argparse
import io
import json
import warnings
from pathlib import Path

import torch

from cifar_ray import cli
from cifar_ray.errors import NO_SPACE, UserError, cli_entry
from cifar_ray.files import atomic_path, write_bytes, write_json
from cifar_ray.footprint import INPUT, OUTPUT, Deployable, onnx_program
from cifar_ray.module import LitResNet9, load_module

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}


def export_onnx(model: Deployable, classes: list[str], target: Path) -> None:
    program = onnx_program(model)
    program.model.metadata_props["class_names"] = json.dumps(classes)
    with atomic_path(target) as tmp:
        program.save(str(tmp))


def export_torchscript(model: Deployable, classes: list[str], target: Path) -> None:
    with warnings.catch_warnings():  # torch marks TorchScript deprecated; asked for, it is
        warnings.filterwarnings("ignore", message=".*is deprecated.*", category=FutureWarning)
        scripted = torch.jit.trace(model, torch.rand(2, 3, model.image_size, model.image_size))
        # Into memory, then written as every output is: torch.jit.save to a file on a full
        # disk aborts the whole process (SIGABRT) and leaves its temporary file.
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer, _extra_files={"class_names.json": json.dumps(classes)})
    write_bytes(target, buffer.getbuffer())


def export(checkpoint: str | Path, fmt: str, output: str | Path | None = None) -> Path:
    """Writes the exported model and its sidecar JSON; returns the model's path."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    module = load_module(checkpoint)  # eval mode, CPU
    target = Path(output) if output else Path(checkpoint).with_suffix(FORMATS[fmt])
    model = Deployable(module).eval()
    classes = module.class_names
    try:
        with torch.no_grad():
            (export_onnx if fmt == "onnx" else export_torchscript)(model, classes, target)
        write_sidecar(module, checkpoint, fmt, target)
    except OSError as exc:  # a folder that does not exist as one, no permission, read-only
        if exc.errno in NO_SPACE:
            raise
        raise UserError(f"cannot write {exc.filename or target}: {exc.strerror or exc}") from None
    return target


def write_sidecar(module: LitResNet9, checkpoint: str | Path, fmt: str, target: Path) -> None:
    """`<target>.json`: the class names, the normalisation and the input's shape."""
    classes = module.class_names
    norm = module.normalization
    write_json(target.with_name(target.name + ".json"), {
        "format": fmt, "checkpoint": str(checkpoint), "class_names": classes,
        "input": {"name": INPUT, "shape": ["N", 3, module.image_size, module.image_size],
                  "dtype": "float32",
                  "range": [0, 1], "channels": "RGB"},
        "output": {"name": OUTPUT, "shape": ["N", len(classes)]},
        "normalization": {"mean": list(norm.mean), "std": list(norm.std)}})


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("export", "Export a checkpoint as ONNX or TorchScript: float images in "
                                  "[0, 1], (N, 3, s, s) in (s: the checkpoint's image size), class "
                                  "probabilities out; class "
                                  "names included.")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint this project wrote")
    parser.add_argument("--format", required=True, choices=list(FORMATS),
                        help="onnx needs pip install 'cifar_ray[export]'")
    parser.add_argument("--output", help="the file to write (default: beside the checkpoint, "
                                         ".onnx or .pt)")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    target = export(args.checkpoint, args.format, args.output)
    print(f"exported {args.checkpoint} as {args.format}: {target} "
          f"(class names and normalisation also in {target.name}.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
