"""What the model gets wrong, and where it looks: `python -m cifar_ray.gradcam --checkpoint C`.
Its flags are checked here, before torch is imported; explain.analyse does the work (README.md,
"Outputs")."""

from __future__ import annotations

from pathlib import Path

from cifar_ray import cli
from cifar_ray.config import DEVICES
from cifar_ray.errors import ConfigError, cli_entry
from cifar_ray.names import CAM_BATCH, CAM_IMAGES, CAM_LAYERS, DEFAULT_CAM_LAYER


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("gradcam", "Misclassification report of a checkpoint: its mistakes on "
                                   "a split, and GradCAM's view of where the model looked.")
    parser.add_argument("--checkpoint", required=True, help="a .ckpt written by this project")
    parser.add_argument("--data-dir", default="data",
                        help="folder holding the data set the checkpoint was trained on")
    parser.add_argument("--output-dir", help="(default: gradcam/ beside the checkpoint)")
    parser.add_argument("--num-images", type=int, default=CAM_IMAGES,
                        help="mistakes to show, the most confident first")
    parser.add_argument("--target-layer", default=DEFAULT_CAM_LAYER,
                        help=f"the layer GradCAM looks at: {', '.join(CAM_LAYERS)}")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="val: the validation images the model was trained without")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto: cuda when there is a GPU")
    parser.add_argument("--batch-size", type=int, default=CAM_BATCH, help="images per forward pass")
    args = parser.parse_args(argv)
    for flag in ("num_images", "batch_size"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")

    from cifar_ray.explain import analyse  # torch: only once the flags are good

    summary = analyse(args.checkpoint, args.data_dir, args.output_dir, args.num_images,
                      args.target_layer, args.split, args.device, args.batch_size)
    print(f"{summary['split']} accuracy {summary['accuracy']:.4f}: {summary['mistakes']} mistakes "
          f"of {summary['images']}; report: {Path(summary['output_dir']) / 'index.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
