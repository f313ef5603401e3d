"""`python -m cifar_ray.bench [--device cpu|cuda] [--json OUT] [--sections a,b]`: how fast this
project trains, augments, starts trials and explains, on this machine, section by section (a
failed one records its error); what each measures, and the numbers: docs/benchmarks.md."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from cifar_ray import cli
from cifar_ray.config import DEVICES
from cifar_ray.errors import UserError, cli_entry
from cifar_ray.files import write_json

SECTIONS = ("framework", "compile", "augment", "gradcam", "flops", "train", "search", "budget",
            "headstart", "recipe", "recipe_cifar", "recipe_search", "pareto")
DEFAULT_SECTIONS = SECTIONS[:7]  # the others train or search for many minutes: asked by name

ROWS = [  # (key, label, format)
    ("plain_loop_images_s", "training, plain PyTorch loop", "{:,.0f} images/s"),
    ("module_images_s", "training, LightningModule", "{:,.0f} images/s"),
    ("framework_ratio", "framework ratio (module / plain)", "{:.3f}"),
    ("plain_python_calls_per_step", "Python calls per step, plain loop", "{:,.0f}"),
    ("module_python_calls_per_step", "Python calls per step, module (Lightning)", "{:,.0f}"),
    ("albumentations_one_worker_images_s", "augmentation, Albumentations, 1 process", "{:,.0f} images/s"),
    ("albumentations_all_workers_images_s", "augmentation, Albumentations, all workers", "{:,.0f} images/s"),
    ("tensor_path_images_s", "augmentation, tensor path on the device", "{:,.0f} images/s"),
    ("tensor_path_speedup", "tensor path / Albumentations (all workers)", "{:.1f}x"),
    ("compile_default_images_s", "training, module, torch.compile", "{:,.0f} images/s"),
    ("compile_reduce_overhead_images_s", "training, module, compile + CUDA graphs", "{:,.0f} images/s"),
    ("gradcam_images_s", "GradCAM", "{:,.0f} images/s"),
    ("train_images_per_second", "cifar_ray.train over a whole run", "{:,.0f} images/s"),
    ("trial_overhead_s", "trial start to first step (median)", "{:.1f} s"),
    ("search_wall_s", "search wall time", "{:.1f} s"),
    ("search_training_s", "search time with a trial training", "{:.1f} s"),
    ("search_wall_over_training", "search wall / training", "{:.2f}"),
    ("trial_epochs_per_s", "trial-epochs per second", "{:.2f}"),
    ("train_gflop_per_image", "training GFLOP per image", "{:.3f}"),
    ("achieved_tflops", "achieved by the module", "{:.3f} TFLOP/s"),
    ("peak_tflops", "device peak (bf16 matmul)", "{:.1f} TFLOP/s"),
    ("fraction_of_peak", "fraction of peak", "{:.1%}"),
]


def table(report: dict[str, Any]) -> str:
    lines = [f"{report['device']}, torch {report['torch']}, ResNet-9 width {report['width']}, "
             f"batch {report['batch_size']}"]
    for key, label, fmt in ROWS:
        value = report.get(key)
        lines.append(f"  {label:<46} {'-' if value is None else fmt.format(value)}")
    for size, row in report.get("by_batch_size", {}).items():
        lines.append(f"  batch {size:>5}: plain {row['plain_loop_images_s']:,.0f}, module "
                     f"{row['module_images_s']:,.0f} images/s (ratio {row['framework_ratio']:.3f}), "
                     f"module under DDP {row['module_ddp_images_s']:,.0f}")
    for budget, row in report.get("by_budget", {}).items():
        lines.append(f"  budget {budget}: wall {row['wall_s']:.0f} s ({row['overrun']:+.1%}; "
                     f"{row['wall_over_plan']:+.1%} against the plan's end), "
                     f"{row['trials']} trials (planned {row['trials_planned']}), retrain "
                     f"{row['retrain_epochs']} epochs (planned {row['retrain_epochs_planned']}), "
                     f"epoch {row['epoch_s_measured']:.1f} s (planned {row['epoch_s_planned']:.1f})")
    for seed, row in report.get("by_seed", {}).items():
        lines.append(f"  seed {seed}: trial-epochs to {row['target_val_acc']:.3f}: cold "
                     f"{row['cold_trial_epochs']}, warm-started {row['warm_trial_epochs']}")
    if "more_wall_s" in report:
        lines.append(f"  --more: a search plus its --more round {report['more_wall_s']:.0f} s, "
                     f"a new search of the same size {report['new_search_wall_s']:.0f} s")
    for key in ("recipe_inspection", "recipe_cifar"):
        for name, row in report.get(key, {}).items():
            lines.append(f"  {key} {name}: " + ", ".join(
                f"{metric} {row[metric]['mean']:.4f} ± {row[metric]['sd']:.4f}"
                for metric in ("test_acc", "test_balanced_acc")))
    for name, row in report.get("recipe_search", {}).items():
        lines.append(f"  search over {name}: test_acc {row['test_acc']:.4f}, balanced "
                     f"{row['test_balanced_acc']:.4f} ({row['wall_s']:.0f} s)")
    if compared := report.get("pareto", {}).get("compared"):
        fronts = {k: f"{v['points']} points, {v['latency_span']}x"
                  for k, v in compared["fronts"].items()}
        lines.append(f"  pareto: fronts (points, latency span) {fronts}; hypervolume "
                     f"{compared['hypervolume']}"
                     f" over trial-epochs {compared['trial_epochs']}; MOASHA reached the "
                     "no-stopping search's final hypervolume after "
                     f"{compared['moasha_trial_epochs_to_final_hv_of_no_stopping']}")
    for share, row in report.get("by_share", {}).items():
        lines.append(f"  search at {share} GPU per trial: {row['search_wall_s']:.0f} s wall, "
                     f"{row['trial_epochs_per_s']:.2f} trial-epochs/s, start-up "
                     f"{row['trial_overhead_s']:.1f} s")
    if report.get("startup_phases_s"):
        lines.append("  start-up phases (median s): " + ", ".join(
            f"{k} {v:.1f}" for k, v in report["startup_phases_s"].items()))
    for name in report.get("sections", []):
        if f"{name}_error" in report:
            lines.append(f"  {name}: FAILED: {report[name + '_error']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("bench", "Speed measurements: training (the module against a plain "
                                 "loop), augmentation, GradCAM, TFLOP/s, cifar_ray.train end to "
                                 "end, and searches; see docs/benchmarks.md.")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto: cuda when there is a GPU")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    parser.add_argument("--data-dir", default="data",
                        help="CIFAR-10 (downloaded there if missing), for real images")
    parser.add_argument("--width", type=int, default=0, help="ResNet-9 width (0: 64 on CUDA, 16 on CPU)")
    parser.add_argument("--image-size", type=int, default=32,
                        help="image side (data.image_size): CIFAR's files are resized to it")
    parser.add_argument("--batch-sizes", type=_ints, default=[],
                        help="training batch sizes, the first the headline (default: 512,256,128 "
                             "on CUDA, 128 on CPU)")
    parser.add_argument("--steps", type=int, default=0, help="timed training steps (0: 50 on CUDA, 8 on CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    parser.add_argument("--sections", type=_names, default=list(DEFAULT_SECTIONS),
                        help=f"comma-separated, of {','.join(SECTIONS)}")
    parser.add_argument("--section-timeout", type=float, default=600,
                        help="seconds a section may run before it is recorded as failed")
    parser.add_argument("--train-epochs", type=int, default=0, help="0: 24 on CUDA, 1 on CPU (recipe: 10, recipe_cifar: 24)")
    parser.add_argument("--search-trials", type=int, default=0,
                        help="0: 8 on CUDA, 2 on CPU (recipe_search: 6)")
    parser.add_argument("--search-epochs", type=int, default=0,
                        help="0: 4 on CUDA, 1 on CPU (recipe_search: 6)")
    parser.add_argument("--budgets", type=_budgets, default=["5m"],
                        help="budget section: a search per budget, e.g. 5m,10m,20m")
    parser.add_argument("--recipe-seeds", type=int, default=3,
                        help="recipe sections: seeds per trick")
    parser.add_argument("--recipe-size", type=int, default=64,
                        help="recipe sections: the made-up inspection set's image side")
    parser.add_argument("--pareto-grace", type=int, default=1,
                        help="pareto: multi-objective ASHA's grace period (epochs before a "
                             "trial may be stopped)")
    parser.add_argument("--pareto-size", type=int, default=32,
                        help="pareto: the inspection set's image side (the search tries it "
                             "and half of it)")
    parser.add_argument("--search-shares", type=_floats, default=[0.25],
                        help="GPU share per trial for each search (CUDA), e.g. 1,0.5,0.25")
    return parser


def _numbers(kind: type, ok: Callable[[Any], bool], rule: str) -> Callable[[str], list]:
    """An argparse type: comma-separated numbers of `kind`, each passing `ok`."""
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'")
        if not all(ok(v) for v in values):
            raise argparse.ArgumentTypeError(f"{rule}, got '{text}'")
        return values
    return parse


_ints = _numbers(int, lambda v: v >= 1, "batch sizes must be >= 1")
_floats = _numbers(float, lambda v: 0 < v <= 1, "GPU shares must be in (0, 1]")


def _budgets(text: str) -> list[str]:
    from cifar_ray.search.budget import parse_budget

    budgets = [b.strip() for b in text.split(",")]
    try:
        if all(parse_budget(b) for b in budgets):
            return budgets
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    raise argparse.ArgumentTypeError(f"expected budgets such as 5m,10m, got '{text}'")


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        what = f"unknown section(s) {', '.join(unknown)}" if unknown else "no section given"
        raise argparse.ArgumentTypeError(f"{what}; valid: {', '.join(SECTIONS)}")
    return names


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("width", "steps", "warmup", "train_epochs", "search_trials", "search_epochs"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 1 <= args.recipe_seeds <= 100:
        raise UserError(f"--recipe-seeds must be in [1, 100], got {args.recipe_seeds}")
    if args.pareto_grace < 1:
        raise UserError(f"--pareto-grace must be >= 1, got {args.pareto_grace}")
    if not (16 <= args.pareto_size <= 256 and args.pareto_size % 16 == 0):
        raise UserError(f"--pareto-size must be a multiple of 16 from 16 to 256, got "
                        f"{args.pareto_size}")
    if not (8 <= args.recipe_size <= 256 and args.recipe_size % 8 == 0):
        raise UserError("--recipe-size must be a multiple of 8 from 8 to 256 (as "
                        f"data.image_size), got {args.recipe_size}")
    if args.section_timeout <= 0:
        raise UserError(f"--section-timeout must be > 0, got {args.section_timeout}")
    from cifar_ray.measure import run  # torch, Lightning, Ray: only once the flags are good

    report = run(args, args.sections)
    print(table(report))
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
