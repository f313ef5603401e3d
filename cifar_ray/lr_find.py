"""Learning-rate range test: `python -m cifar_ray.lr_find [--config X] [--flags]`: Lightning's
LR finder from 1e-7 up; writes lr_find.png and lr_find.json. The suggestion is an `optim.lr`."""

from __future__ import annotations

import argparse
from pathlib import Path

from cifar_ray import train
from cifar_ray.config import Config, parse_command
from cifar_ray.data.datamodule import CifarDataModule
from cifar_ray.errors import UserError, cli_entry
from cifar_ray.files import save_figure, write_json
from cifar_ray.module import LitResNet9
from cifar_ray.pl import pl
from cifar_ray.runtime import build_trainer, resolve_device


def build_parser(cfg: Config) -> argparse.ArgumentParser:
    parser = train.build_parser(cfg, "lr_find", "Learning-rate range test for ResNet-9: "
                                                "writes lr_find.png and lr_find.json into the "
                                                "output dir.")
    parser.add_argument("--min-lr", type=float, default=1e-7, help="the first rate tried")
    parser.add_argument("--max-lr", type=float, default=10.0, help="the last rate tried")
    parser.add_argument("--steps", type=int, default=100, help="batches to try, one rate each")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_command(build_parser, Config(), argv)
    if not 0 < args.min_lr < args.max_lr:
        raise UserError(f"expected 0 < --min-lr < --max-lr, got {args.min_lr} and {args.max_lr}")
    if args.steps < 2:
        raise UserError(f"--steps must be >= 2, got {args.steps}")
    out = Path(cfg.trainer.output_dir).expanduser().resolve()
    pl.seed_everything(cfg.trainer.seed, verbose=False)
    data = CifarDataModule(cfg)
    data.prepare_data()
    data.setup()
    module = LitResNet9.from_config(cfg, data.classes, data.norm)
    trainer = build_trainer(resolve_device(cfg.trainer.device), cfg.trainer.precision,
                            max_epochs=cfg.trainer.epochs, default_root_dir=out)
    finder = pl.tuner.Tuner(trainer).lr_find(module, datamodule=data, min_lr=args.min_lr,
                                             max_lr=args.max_lr, num_training=args.steps)
    suggestion = finder.suggestion()
    save_figure(finder.plot(suggest=True), out / "lr_find.png", dpi=100)
    write_json(out / "lr_find.json", {"suggested_lr": suggestion, "lrs": finder.results["lr"],
                                      "losses": finder.results["loss"]})
    print(f"suggested lr: {suggestion:.3g} (plot: {out / 'lr_find.png'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
