"""The search command: `python -m cifar_ray.tune [--config experiments/search.yaml] [--flags]`.

Its flags and config are checked here, before Ray, torch or any data is touched; then
pipeline.run searches, retrains the best, tests it once, explains its mistakes and writes
report.html (the output dir's files: README.md, "Outputs").
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cifar_ray import cli, pipeline, tracking
from cifar_ray.config import add_config_flags, parse_command, purpose_of
from cifar_ray.errors import UserError, cli_entry
from cifar_ray.output_dir import check_resume_or_overwrite, output_dir_lock
from cifar_ray.search.cluster import (
    AUTO_CPUS,
    concurrency,
    configure_auth,
    machine_resources,
    trials_that_fit,
)
from cifar_ray.search.budget import Sized, apply_sized, estimate_costs, parse_budget, plan_lines, size_run
from cifar_ray.search.plan import image_counts, make_plan, space_lines
from cifar_ray.search.seeds import Seeds, gather
from cifar_ray.search.settings import (
    DISTRIBUTIONS,
    MAX_TRIALS,
    SearchConfig,
    search_flag,
)


def build_parser(cfg: SearchConfig) -> argparse.ArgumentParser:
    parser = cli.parser("tune", "Search the config's `search:` space (by default lr, weight "
                                "decay, batch size) with Ray Tune + ASHA, retrain the best on "
                                "the full training set, test it and explain its mistakes.",
                        usage="[--config YAML] [--search KEY=DIST:VALUES ...] [flags]")
    parser.add_argument("--search", action="append", default=[], metavar="KEY=DIST:VALUES",
                        help="one key of the search space, replacing that key of the YAML's "
                             "(repeatable): e.g. optim.lr=loguniform:1e-4,1e-1, "
                             "trainer.batch_size=choice:128,256,512; distributions: "
                             f"{', '.join(DISTRIBUTIONS)}")
    add_config_flags(parser, cfg)
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted search in the same output dir")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard a search already in the output dir and start again")
    parser.add_argument("--warm-start", action="append", default=[], metavar="DIR",
                        help="start from an earlier run's trials (its output dir, finished or "
                             "interrupted; repeatable): those in this space on the same data "
                             "teach Optuna's TPE before it samples, and random search tries "
                             "their best first")
    parser.add_argument("--try", action="append", default=[], metavar="KEY=VALUE,...",
                        dest="tries",
                        help="a config of your own to run first (repeatable), e.g. "
                             "optim.lr=0.01,optim.weight_decay=5e-4; keys left out are sampled")
    parser.add_argument("--more", type=int, default=0, metavar="N",
                        help="with --resume: add N trials to the search, finished or "
                             "interrupted, then choose, retrain and report again over all")
    parser.add_argument("--plan", action="store_true",
                        help="print what the search would run (trials, ASHA's rungs, "
                             "trial-epochs, time) and exit: no Ray, no data")
    parser.add_argument("--plan-epoch-seconds", type=float, metavar="S",
                        help="seconds one trial-epoch takes (e.g. from python -m "
                             "cifar_ray.bench): --plan's time and GPU-hours, and what --budget "
                             "buys (otherwise a few timed steps here measure it)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's and Lightning's worker output and Tune's per-trial "
                             "tables on the console (otherwise in <output dir>/logs/)")
    return parser


def parse(argv: list[str] | None) -> tuple[SearchConfig, argparse.Namespace]:
    """The search's config from --config, --search and the flags, with the flags that a search
    would silently override refused (one line naming the way to do it)."""
    cfg = SearchConfig()
    cfg, args = parse_command(build_parser, cfg, argv)
    for text in args.search:
        key, spec = search_flag(text)
        cfg.search[key] = spec
    cfg.validate()  # the space again, with what --search changed
    cfg.check_costs()
    flags = {dest: value for dest, value in vars(args).items()
             if "." in dest and value is not None}
    for key in cfg.search:
        if key in flags:
            flag = "--" + key.split(".", 1)[1].replace("_", "-")
            raise UserError(f"{flag} sets {key}, which the search samples: give its range with "
                            f"--search {key}=DISTRIBUTION:VALUES, or take it out of the search "
                            "space to fix it")
    if args.more and not args.resume:
        raise UserError("--more N adds trials to a search in the output dir: give it with "
                        "--resume")
    if not 0 <= args.more <= MAX_TRIALS:
        raise UserError(f"--more must be in [1, {MAX_TRIALS}], got {args.more}")
    if args.resume and not args.more and (args.warm_start or args.tries):
        raise UserError("--warm-start and --try start a new search (or a --more round); "
                        "--resume alone goes on with the saved one")
    if len(cfg.objectives()) > 1 and (args.warm_start or args.more):
        raise UserError("--warm-start and --more seed the search with earlier trials' scores; "
                        "with several objectives they are not supported yet: start a new search "
                        "(--try runs given configs first)")
    if flags.get("trainer.devices", 1) != 1:
        raise UserError("--devices does nothing in a search: each trial's workers are "
                        "--workers-per-trial (with --gpus-per-worker each)")
    return cfg, args


@dataclass
class Resources:
    """What the plan and the budget size a search on: this machine's, checked, or (a
    cluster's --address, GPUs this machine lacks) as the flags give them."""

    gpus_per_worker: float
    fits: int  # trials that fit at once (0: unknown)
    cpus: int
    gpus: int
    here: bool


def resources(cfg: SearchConfig) -> Resources:
    t = cfg.tune
    cpus, gpus = machine_resources() if t.address == "local" else (0, 0)
    here = t.address == "local" and not (t.gpus_per_worker > 0 and not gpus)
    if here:
        gpus_per_worker, fits = pipeline.check_resources(cfg, cpus, gpus)
    else:  # resources unknown here: the automatic CPUs are those of a GPU trial, if it has one
        if t.cpus_per_worker < 0:
            t.cpus_per_worker = AUTO_CPUS if t.gpus_per_worker != 0 else 1
        gpus_per_worker, fits = trials_that_fit(t, 10**9, 10**9)
    return Resources(gpus_per_worker, fits if here else 0, cpus, gpus, here)


def size_to_budget(cfg: SearchConfig, given: Resources, epoch_seconds: float | None) -> Sized | None:
    """With tune.budget: the epochs, first rung and retrain epochs it buys, set on `cfg` (the
    user's values their upper bounds); UserError when even one trial does not fit."""
    seconds = parse_budget(cfg.tune.budget)
    if seconds is None:
        return None
    if not given.here and not (epoch_seconds and cfg.tune.max_concurrent):
        raise UserError("--budget on a cluster (or on GPUs this machine lacks) needs "
                        "--max-concurrent N (trials at once there) and --plan-epoch-seconds S "
                        "(one trial-epoch's seconds there: python -m cifar_ray.bench on a worker)")
    images = image_counts(cfg)
    if images is None:
        raise UserError(f"--budget: no training images under {cfg.data.data_dir}/train to size "
                        "the run by")
    t = cfg.tune
    concurrent = concurrency(t, given.fits)
    costs = estimate_costs(cfg, images, concurrent, given.gpus_per_worker, given.cpus or 1,
                           epoch_seconds)
    sized = size_run(seconds, costs, cfg.trainer.epochs, t.num_samples,
                     cfg.retrain.retrain_epochs, t.grace_period, t.reduction_factor, concurrent)
    apply_sized(cfg, sized)
    return sized


def print_plan(cfg: SearchConfig, given: Resources, epoch_seconds: float | None,
               sized: Sized | None, seeds: Seeds) -> None:
    """--plan: what the search would run and cost (with a budget: what it buys)."""
    t = cfg.tune
    if sized:
        epoch_seconds, source = sized.costs.epoch_s, sized.costs.source
    else:
        source = "given" if epoch_seconds else ""
    plan = make_plan(cfg, concurrency(t, given.fits), given.gpus_per_worker, epoch_seconds,
                     source)
    print(plan.text())
    print("\n".join(space_lines(cfg) + seeds.lines()))
    if sized:
        print("\n".join(plan_lines(sized, time.time())))
    if given.here and not t.max_concurrent:
        print(f"  (this machine, {given.cpus} CPUs and {given.gpus} GPUs, holds {given.fits} at "
              "a time; for another, give --max-concurrent N and --gpus-per-worker G)")
    if warning := plan.cpu_warning(starting=False):
        print(warning)


# The searches `tune` chooses between when no --config is given (sized_to_this_machine).
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
FULL, QUICK = EXPERIMENTS / "search.yaml", EXPERIMENTS / "search_smoke.yaml"
FOLDER = EXPERIMENTS / "search_folder.yaml"
CPU_FOLDER = ["--width", "16", "--budget", "1h"]


def sized_to_this_machine(argv: list[str]) -> list[str]:
    """Without --config, a local search is sized to this machine: the full search with a GPU,
    the quick CPU search without; one line says which. Your own images (--dataset folder) get
    their own search, never cut. Not for -h or a cluster's --address."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config")
    first.add_argument("--address", default="local")
    first.add_argument("--dataset")
    first.add_argument("--resume", action="store_true")
    first.add_argument("-h", "--help", action="store_true")
    given, _ = first.parse_known_args(argv)
    if given.config or given.help or given.address != "local" or not QUICK.is_file():
        return argv
    gpus = machine_resources()[1]
    if given.dataset == "folder" and FOLDER.is_file():
        # Every image, never fewer: without a GPU a smaller network, fitted to an hour (the
        # user's own --width or --budget come later in argv, and win).
        fitted = [] if gpus or given.resume else CPU_FOLDER  # a resume keeps its own
        print(f"your own images: {_shown_path(FOLDER)}, every image used"
              + ("; no GPU here: width 16, fitted to --budget 1h (give --width or --budget to "
                 "change them)" if fitted else ""), flush=True)
        return ["--config", str(FOLDER), *fitted, *argv]
    chosen, other = (FULL, QUICK) if gpus else (QUICK, FULL)
    what = (f"{gpus} GPU{'s' if gpus > 1 else ''} here: the full search" if gpus
            else "no GPU here: the quick CPU search (a few minutes)")
    print(f"{what}, {_shown_path(chosen)}; for the {'quick check' if gpus else 'full search'} "
          f"give --config {_shown_path(other)}", flush=True)
    return ["--config", str(chosen), *argv]


def _shown_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    started = time.time()  # a budget counts from here
    argv = sys.argv[1:] if argv is None else argv
    cfg, args = parse(sized_to_this_machine(argv))
    check_resume_or_overwrite(args.resume, args.overwrite)
    # First: nothing below may pickle or print a password the URI holds.
    tracking.take_credentials(cfg.tracking, local_ray=cfg.tune.address == "local")
    configure_auth(cfg.tune.address)  # before Ray is imported, by the space's check first
    cfg.check_space()
    if args.plan_epoch_seconds is not None and not 0 < args.plan_epoch_seconds <= 86400:
        raise UserError(f"--plan-epoch-seconds must be in (0, 86400], got {args.plan_epoch_seconds}")
    seeds = gather(args.warm_start, args.tries, cfg)
    budgeted = bool(cfg.tune.budget) and not args.resume  # a resumed search keeps its sizing
    given = resources(cfg) if args.plan or budgeted else None
    sized = size_to_budget(cfg, given, args.plan_epoch_seconds) if budgeted else None
    if args.plan:
        print_plan(cfg, given, args.plan_epoch_seconds, sized, seeds)
        return 0
    out = Path(cfg.trainer.output_dir).expanduser().resolve()
    cfg.trainer.output_dir = str(out)
    asked = pipeline.Asked(args.resume, args.overwrite, args.verbose, sized, started, seeds,
                           args.more, _shown_path(Path(args.config)) if args.config else "",
                           purpose_of(args.config) if args.config else "")
    with output_dir_lock(out, "cifar_ray.tune", skip=("tmp",)):
        return pipeline.run(cfg, out, asked)


if __name__ == "__main__":
    raise SystemExit(main())
