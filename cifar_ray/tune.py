"""The search command: `python -m cifar_ray.tune [--config experiments/search.yaml] [--flags]`.

Its flags and config are checked here, before Ray, torch or any data is touched; then
pipeline.run searches, retrains the best, tests it once, explains its mistakes and writes
report.html (the output dir's files: README.md, "Outputs").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cifar_ray import cli, pipeline, tracking
from cifar_ray.config import add_config_flags, parse_command
from cifar_ray.errors import UserError, cli_entry
from cifar_ray.output_dir import check_resume_or_overwrite, output_dir_lock
from cifar_ray.search.cluster import (
    AUTO_CPUS,
    concurrency,
    configure_auth,
    machine_resources,
    trials_that_fit,
)
from cifar_ray.search.plan import make_plan
from cifar_ray.search.settings import (
    DISTRIBUTIONS,
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
    parser.add_argument("--plan", action="store_true",
                        help="print what the search would run (trials, ASHA's rungs, "
                             "trial-epochs, time) and exit: no Ray, no data")
    parser.add_argument("--plan-epoch-seconds", type=float, metavar="S",
                        help="with --plan: seconds one trial-epoch takes (e.g. from "
                             "python -m cifar_ray.bench), for the time and GPU-hours")
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
    flags = {dest: value for dest, value in vars(args).items()
             if "." in dest and value is not None}
    for key in cfg.search:
        if key in flags:
            flag = "--" + key.split(".", 1)[1].replace("_", "-")
            raise UserError(f"{flag} sets {key}, which the search samples: give its range with "
                            f"--search {key}=DISTRIBUTION:VALUES, or take it out of the search "
                            "space to fix it")
    if flags.get("trainer.devices", 1) != 1:
        raise UserError("--devices does nothing in a search: each trial's workers are "
                        "--workers-per-trial (with --gpus-per-worker each)")
    return cfg, args


def print_plan(cfg: SearchConfig, epoch_seconds: float | None) -> None:
    """--plan: the plan on this machine's resources, checked; or, for a cluster's --address
    or GPUs this machine lacks (--gpus-per-worker G), as the flags give them."""
    t = cfg.tune
    cpus, gpus = machine_resources() if t.address == "local" else (0, 0)
    here = t.address == "local" and not (t.gpus_per_worker > 0 and not gpus)
    if here:
        gpus_per_worker, fits = pipeline.check_resources(cfg, cpus, gpus)
    else:  # resources unknown here: the automatic CPUs are those of a GPU trial, if it has one
        if t.cpus_per_worker < 0:
            t.cpus_per_worker = AUTO_CPUS if t.gpus_per_worker != 0 else 1
        gpus_per_worker, fits = trials_that_fit(t, 10**9, 10**9)
    plan = make_plan(cfg, concurrency(t, fits if here else 0), gpus_per_worker, epoch_seconds,
                     "given" if epoch_seconds else "")
    print(plan.text())
    if here and not t.max_concurrent:
        print(f"  (this machine, {cpus} CPUs and {gpus} GPUs, holds {fits} at a time; for "
              "another, give --max-concurrent N and --gpus-per-worker G)")
    if warning := plan.cpu_warning(starting=False):
        print(warning)


# The searches `tune` chooses between when no --config is given (sized_to_this_machine).
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
FULL, QUICK = EXPERIMENTS / "search.yaml", EXPERIMENTS / "search_smoke.yaml"


def sized_to_this_machine(argv: list[str]) -> list[str]:
    """Without --config, a local search is sized to this machine: the full search with a GPU,
    the quick CPU search without; one line says which. Not for -h or a cluster's --address."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config")
    first.add_argument("--address", default="local")
    first.add_argument("-h", "--help", action="store_true")
    given, _ = first.parse_known_args(argv)
    if given.config or given.help or given.address != "local" or not QUICK.is_file():
        return argv
    gpus = machine_resources()[1]
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
    argv = sys.argv[1:] if argv is None else argv
    cfg, args = parse(sized_to_this_machine(argv))
    check_resume_or_overwrite(args.resume, args.overwrite)
    # First: nothing below may pickle or print a password the URI holds.
    tracking.take_credentials(cfg.tracking, local_ray=cfg.tune.address == "local")
    configure_auth(cfg.tune.address)  # before Ray is imported, by the space's check first
    cfg.check_space()
    if args.plan_epoch_seconds is not None and args.plan_epoch_seconds <= 0:
        raise UserError(f"--plan-epoch-seconds must be > 0, got {args.plan_epoch_seconds}")
    if args.plan:
        print_plan(cfg, args.plan_epoch_seconds)
        return 0
    out = Path(cfg.trainer.output_dir).expanduser().resolve()
    cfg.trainer.output_dir = str(out)
    with output_dir_lock(out, "cifar_ray.tune", skip=("tmp",)):
        return pipeline.run(cfg, out, args.resume, args.overwrite, args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
