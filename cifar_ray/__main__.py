"""The `cifar-ray` console script (and `python -m cifar_ray`): one command, its subcommands the
project's commands, each exactly as `python -m cifar_ray.X` runs it.

    cifar-ray tune --config experiments/search_smoke.yaml
    cifar-ray plan --config experiments/search.yaml        (= cifar-ray tune --plan ...)
    cifar-ray lr-find -h
"""

from __future__ import annotations

import importlib
import sys

from cifar_ray import cli

SUMMARIES = {
    "tune": "search, retrain the best, test it, GradCAM, report.html",
    "train": "one training run, tested once",
    "plan": "what a search would run and cost (tune --plan): no Ray, no data",
    "gradcam": "misclassification report of a checkpoint",
    "predict": "classify image files with a checkpoint",
    "export": "a checkpoint as ONNX or TorchScript",
    "app": "the demo app in the browser",
    "bench": "speed measurements",
    "lr-find": "learning-rate range test",
}


def usage() -> str:
    width = max(map(len, SUMMARIES))
    lines = [f"  {name:<{width}}  {text}" for name, text in SUMMARIES.items()]
    return ("usage: cifar-ray COMMAND [flags]   (cifar-ray COMMAND -h: its flags)\n\n"
            "Find, train and explain the best ResNet-9 for a CIFAR-style data set.\n\n"
            "commands:\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name == "plan":
        name, rest, cli.invoked_sub = "tune", ["--plan", *rest], "plan"
    module = {sub: mod for mod, sub in cli.SUBCOMMANDS.items()}.get(name)
    if module is None:
        print(f"{usage()}\n\nerror: unknown command {name!r}", file=sys.stderr)
        return 2
    cli.invoked_as = "cifar-ray"
    return importlib.import_module(f"cifar_ray.{module}").main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
