"""The command lines: every `-h` names the command as it was called and shows each default once,
with help on every flag; the `cifar-ray` console script runs each command as a subcommand; a
search refuses flags it would silently override, and takes its space from `--search` too."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cifar_ray.errors import UserError
from tests.conftest import ROOT

COMMANDS = ["tune", "train", "gradcam", "predict", "export", "app", "bench", "lr_find"]


def _help(module: str, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"cifar_ray.{module}").main([*argv, "-h"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _options(text: str) -> dict[str, str]:
    """Each option's help text, from -h's output."""
    options, current = {}, None
    for line in text.splitlines():
        match = re.match(r"^  (-\S+(?:, --\S+)?)(?: \S+)?(?:\s{2,}(.*))?$", line)
        if match:
            current = match.group(1).split(", ")[-1]
            options[current] = match.group(2) or ""
        elif current and line.startswith(" " * 10):
            options[current] += " " + line.strip()
        elif not line.strip():
            current = None
    return options


@pytest.mark.parametrize("module", COMMANDS)
def test_every_help_names_the_command_shows_each_default_once_and_explains_every_flag(
        module, capsys):
    text = _help(module, [], capsys)
    assert text.startswith(f"usage: python -m cifar_ray.{module} "), text[:200]
    assert "(default: None)" not in text and "[default:" not in text
    options = _options(text)
    assert len(options) >= 3, options
    for flag, help_text in options.items():
        assert help_text.strip(), f"{flag} has no help"
        assert help_text.count("(default") <= 1, (flag, help_text)
        assert not re.search(r"\d\.\d{5,}", help_text), (flag, help_text)  # floats rounded


def test_help_shows_the_defaults_a_config_file_gives(capsys):
    text = _help("tune", ["--config", "experiments/search_smoke.yaml"], capsys)
    options = _options(text)
    assert "(default: 3)" in options["--epochs"] and "(default: 16)" in options["--width"]
    assert "(default: outputs/search_smoke)" in options["--output-dir"]
    assert "(default: 0.208)" in options["--pct-start"]
    assert "{cifar10,cifar100,folder}" in text  # choices listed


def test_the_search_writes_where_its_help_says_and_where_it_is_told():
    from cifar_ray.tune import parse

    assert parse([])[0].trainer.output_dir == "outputs/search"
    # An explicit --output-dir outputs/train used to be changed to outputs/search.
    assert parse(["--output-dir", "outputs/train"])[0].trainer.output_dir == "outputs/train"


@pytest.mark.parametrize("argv, message", [
    (["--lr", "0.05"], "--lr sets optim.lr, which the search samples: give its range with "
                       "--search optim.lr=DISTRIBUTION:VALUES, or take it out of the search space"),
    (["--batch-size", "64"], "--batch-size sets trainer.batch_size, which the search samples"),
    (["--search", "model.width=choice:8,16", "--width", "32"],
     "--width sets model.width, which the search samples"),
    (["--devices", "4"], "--devices does nothing in a search: each trial's workers are "
                         "--workers-per-trial"),
    (["--search", "optim.lr=loguniform:0.1,0.001"], "search optim.lr: empty or inverted range"),
    (["--search", "optim.lr"], "--search 'optim.lr': expected KEY=DISTRIBUTION:VALUE,VALUE,..."),
    (["--search", "optim.momentum=uniform:0.8,0.9"], "unknown config key 'optim.momentum'"),
])
def test_a_flag_the_search_would_override_or_a_bad_search_flag_is_one_line(argv, message):
    from cifar_ray.tune import parse

    with pytest.raises(UserError) as err:
        parse(argv)
    assert message in str(err.value), str(err.value)


def test_search_flags_replace_their_keys_of_the_yamls_space():
    from cifar_ray.tune import parse

    cfg, _ = parse(["--config", "experiments/search_smoke.yaml",
                    "--search", "optim.lr=loguniform:1e-4,1e-1",
                    "--search", "model.width=choice:8,16"])
    space = cfg.space()
    assert space["optim.lr"] == ("loguniform", [0.0001, 0.1])  # replaced
    assert space["model.width"] == ("choice", [8, 16])  # added
    assert space["trainer.batch_size"] == ("choice", [64, 128])  # the YAML's, kept


def test_the_console_script_runs_each_command_as_a_subcommand():
    script = Path(sys.executable).parent / "cifar-ray"
    assert script.is_file(), "pip install -e . puts the cifar-ray script beside python"
    listing = subprocess.run([script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0
    for name in ("tune", "train", "plan", "gradcam", "predict", "export", "app", "bench",
                 "lr-find"):
        assert f"\n  {name} " in listing.stdout, listing.stdout
    train = subprocess.run([script, "train", "-h"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert train.returncode == 0 and train.stdout.startswith("usage: cifar-ray train "), \
        train.stdout[:200]
    plan = subprocess.run([script, "plan", "--config", "experiments/search_smoke.yaml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0 and "trials       4, 2 at a time" in plan.stdout, plan.stderr
    unknown = subprocess.run([script, "nope"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines()[-1] == "error: unknown command 'nope'"
