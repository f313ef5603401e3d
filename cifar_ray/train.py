"""One training run: `python -m cifar_ray.train [--config experiments/X.yaml] [--flags]`.

Reads (or downloads) the data set, trains ResNet-9 with validation each epoch, reloads the best
checkpoint safely and tests it once, then writes into the output dir:

    best.ckpt        best --metric (validation accuracy; the last epoch without validation)
    last.ckpt        the latest epoch
    tensorboard/     TensorBoard event files (`tensorboard --logdir <output-dir>`)
    curves.png       loss and accuracy against epoch
    results.json     test/val numbers, per-class accuracy, confusion matrix, timings, config

Flags, config, output dir and data are checked before torch and Lightning are imported, so a
mistake answers at once. The run itself is `training.run(cfg)`, the search's retrain too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cifar_ray import cli
from cifar_ray.config import Config, add_config_flags, parse_command
from cifar_ray.data.sources import load_dataset
from cifar_ray.errors import Interrupted, cli_entry
from cifar_ray.names import METRIC, METRICS
from cifar_ray.output_dir import check_resume_or_overwrite, output_dir_lock, resume_point
from cifar_ray.signals import raise_on_signals


def interrupted(out: Path, name: str, exit_code: int) -> Interrupted:
    """What a signal raises inside Lightning's loop, which then tears down: how to go on."""
    if (out / "last.ckpt").is_file():
        return Interrupted(f"{name}: stopped; the last finished epoch is saved in "
                           f"{out / 'last.ckpt'}: run the same command with --resume to go on",
                           exit_code)
    return Interrupted(f"{name}: stopped before the first epoch finished; nothing to resume",
                       exit_code)


def build_parser(cfg: Config, module: str = "train",
                 description: str = "Train and test ResNet-9 once on a CIFAR data set."
                 ) -> argparse.ArgumentParser:
    parser = cli.parser(module, description, usage="[--config YAML] [flags]")
    add_config_flags(parser, cfg)
    if module == "train":
        parser.add_argument("--resume", action="store_true",
                            help="continue an interrupted run from last.ckpt in the output dir")
        parser.add_argument("--overwrite", action="store_true",
                            help="replace a finished run already in the output dir")
        parser.add_argument("--metric", choices=tuple(METRICS), default=METRIC,
                            help="what best.ckpt goes by, as a search's tune.metric "
                                 "(default: %(default)s)")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_command(build_parser, Config(), argv)
    check_resume_or_overwrite(args.resume, args.overwrite)
    out = Path(cfg.trainer.output_dir).expanduser().resolve()
    with output_dir_lock(out, "cifar_ray.train"), raise_on_signals(lambda name, code: interrupted(out, name, code)):
        resume_point(out, args.overwrite, args.resume)
        arrays = load_dataset(cfg.data)  # downloads CIFAR when it is missing
        from cifar_ray.training import run  # torch, Lightning: only once the input is good

        results = run(cfg, arrays, overwrite=args.overwrite, resume=args.resume,
                      metric=args.metric)
    val = f"{results['val_score']:.4f}" if results["val_score"] is not None else "n/a"
    print(f"done: test_acc={results['test_acc']:.4f} test_loss={results['test_loss']:.4f} "
          f"test_balanced_acc={results['test_balanced_acc']:.4f} "
          f"best {results['metric']}={val} epochs={results['epochs']} "
          f"({results['train_seconds']:.0f}s, {results['train_images_per_second']:.0f} images/s); "
          f"results in {Path(results['checkpoint']).parent / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
