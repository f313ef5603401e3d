"""YAML configs and flags: precedence, and one clear line for each kind of mistake."""

import argparse
from pathlib import Path

import pytest

from cifar_ray.config import Config, add_config_flags, overlay, resolve
from cifar_ray.errors import ConfigError
from cifar_ray.search.settings import SearchConfig

ROOT = Path(__file__).resolve().parents[1]


def _resolve(*argv: str, kind=Config) -> Config:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, kind())
    return resolve(kind(), parser.parse_args(list(argv)))


def test_every_shipped_experiment_loads():
    paths = sorted((ROOT / "experiments").glob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        kind = SearchConfig if path.name.startswith("search") else Config
        _resolve("--config", str(path), kind=kind)


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    cfg_file = tmp_path / "x.yaml"
    cfg_file.write_text("optim:\n  lr: 0.05\n  weight_decay: 0\ntrainer:\n  epochs: 3\n")
    cfg = _resolve("--config", str(cfg_file), "--epochs", "7", "--no-progress-bar")
    assert cfg.optim.lr == 0.05 and cfg.optim.weight_decay == 0.0  # int accepted for a float
    assert cfg.trainer.epochs == 7 and cfg.trainer.progress_bar is False
    assert cfg.trainer.batch_size == 512  # untouched default


def test_numbers_in_exponent_form_are_floats_as_people_mean_them(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-3` as a string: refused as 'expected float' before."""
    cfg_file = tmp_path / "x.yaml"
    cfg_file.write_text("optim:\n  lr: 1e-3\n  weight_decay: 5E-4\n"
                        "search:\n  optim.lr: {loguniform: [1e-4, 1e-1]}\n"
                        "  optim.weight_decay: {loguniform: [.5e-6, 1.0e-3]}\n")
    cfg = _resolve("--config", str(cfg_file), kind=SearchConfig)
    assert cfg.optim.lr == 0.001 and cfg.optim.weight_decay == 0.0005
    assert cfg.space()["optim.lr"] == ("loguniform", [0.0001, 0.1])
    assert cfg.space()["optim.weight_decay"] == ("loguniform", [5e-7, 0.001])


def test_dict_round_trip_for_ray_trials():
    cfg = _resolve("--lr", "0.003", "--dataset", "cifar100")
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("yaml_text, message", [
    ("optim:\n  lrr: 0.1\n", "unknown key 'optim.lrr'"),
    ("optimiser:\n  lr: 0.1\n", "unknown section 'optimiser'"),
    ("optim:\n  lr: fast\n", "optim.lr: expected float, got 'fast'"),
    ("trainer:\n  epochs: 2.5\n", "trainer.epochs: expected int, got 2.5"),
    ("trainer:\n  progress_bar: 1\n", "expected bool"),
    ("optim:\n  lr: -1\n", "optim.lr must be > 0, got -1.0"),
    ("trainer:\n  batch_size: 0\n", "trainer.batch_size must be in [1, 65536]"),
    ("trainer:\n  epochs: 0\n", "trainer.epochs must be in [1, 10000]"),
    ("data:\n  dataset: mnist\n", "data.dataset must be one of"),
    ("augment:\n  flip_p: 1.5\n", "augment.flip_p must be in [0, 1]"),
    ("model:\n  width: 100000\n", "model.width must be in [1, 1024], got 100000"),
    ("optim:\n  lr: 0.1\n\tweight_decay: 0\n", "YAML syntax error at line 3"),
    # A few lines of aliases stand for 10^9 values (repr'd in an error message, or expanded).
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "search:\n  trainer.batch_size: {choice: [*b]}\n",
     "YAML syntax error at line 2: aliases (*name) are not supported in a config"),
    ("data:\n  val_size: 2026-13-45\n", "a value cannot be read (month must be in 1..12)"),
    # Found by tests/test_fuzz.py: a quoted name is shown escaped, the message one line.
    ('"a\\nb\\e[31m": 1\n', "unknown section 'a\\nb\\x1b[31m'"),
    ("\udcff\udcfe", "not a text file (not UTF-8)"),
    ("a: " + "x" * (1 << 20), "larger than 1024 KB; is it a config file?"),
])
def test_config_mistakes_are_one_line_errors(tmp_path, yaml_text, message):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_bytes(yaml_text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError) as err:
        _resolve("--config", str(cfg_file), kind=SearchConfig)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_flag_values_are_validated_too():
    with pytest.raises(ConfigError, match=r"data.val_size must be -1 \(a tenth\), 0 \(none\) or a count"):
        _resolve("--val-size", "-2")


def test_a_search_config_hands_out_independent_training_configs():
    cfg = SearchConfig()
    run = cfg.training_config()
    run.trainer.epochs, run.data.val_size = 1, 0
    assert cfg.trainer.epochs == 24 and cfg.data.val_size == -1
    assert not hasattr(run, "search")


def test_a_sample_is_laid_over_the_base_config_by_its_keys():
    base = SearchConfig()
    run = overlay(base, {"optim.lr": 0.003, "model.width": 32, "augment.cutout_p": 0.25})
    assert (run.optim.lr, run.model.width, run.augment.cutout_p) == (0.003, 32, 0.25)
    assert run.optim.weight_decay == base.optim.weight_decay  # the rest is the base's
    assert base.optim.lr == 0.01 and not hasattr(run, "search")  # a copy, training sections only
    with pytest.raises(ConfigError, match=r"model.width must be in \[1, 1024\]"):
        overlay(base, {"model.width": 0})


@pytest.mark.parametrize("space, message", [
    ("optim.lrr: {loguniform: [0.001, 0.1]}",
     "search: unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("lr: [0.001, 0.1]", "search: unknown config key 'lr'; did you mean 'optim.lr'?"),
    ("optim.lr: {normal: [0.01, 0.1]}", "search optim.lr: unknown distribution 'normal'"),
    ("optim.lr: {choice: [fast, slow]}", "search optim.lr: 'fast' does not fit"),
    ("optim.lr: {loguniform: [0, 0.1]}", "search optim.lr: loguniform needs low > 0, got 0"),
    ("optim.lr: {uniform: [0.1, 0.01]}", "search optim.lr: empty or inverted range"),
    ("optim.lr: {uniform: [0.1, 0.1]}", "search optim.lr: empty or inverted range"),
    ("trainer.batch_size: {choice: []}", "search trainer.batch_size: choice needs at least one"),
    ("model.width: {uniform: [8, 16]}", "uniform samples floats, but model.width is an int"),
    ("model.width: {choice: [8, 0]}", "search model.width: 0 does not fit: model.width must be in [1, 1024]"),
    ("augment.cutout_p: {uniform: [0, 2]}", "augment.cutout_p must be in [0, 1]"),
    ("augment.engine: {uniform: [0, 1]}", "search augment.engine: augment.engine is a str"),
    ("optim.lr: [0.001, 0.1]", "search optim.lr: expected one distribution"),
])
def test_search_space_mistakes_are_one_line_errors(tmp_path, space, message):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(f"search:\n  {space}\n")
    with pytest.raises(ConfigError) as err:
        _resolve("--config", str(cfg_file), kind=SearchConfig)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_any_config_key_with_any_of_tunes_helpers_is_a_valid_space(tmp_path):
    cfg_file = tmp_path / "space.yaml"
    cfg_file.write_text("search:\n"
                        "  model.width: {choice: [8, 16]}\n"
                        "  augment.cutout_p: {uniform: [0, 1]}\n"
                        "  optim.pct_start: {quniform: [0.1, 0.5, 0.1]}\n"
                        "  optim.lr: {qloguniform: [0.001, 0.1, 0.001]}\n"
                        "  trainer.batch_size: {randint: [32, 129]}\n"
                        "  augment.engine: {choice: [albumentations, tensors]}\n")
    cfg = _resolve("--config", str(cfg_file), kind=SearchConfig)
    assert cfg.space() == {"model.width": ("choice", [8, 16]),
                           "augment.cutout_p": ("uniform", [0, 1]),
                           "optim.pct_start": ("quniform", [0.1, 0.5, 0.1]),
                           "optim.lr": ("qloguniform", [0.001, 0.1, 0.001]),
                           "trainer.batch_size": ("randint", [32, 129]),
                           "augment.engine": ("choice", ["albumentations", "tensors"])}
    # The YAML's space replaces the default one whole.
    assert list(SearchConfig().space()) == ["optim.lr", "optim.weight_decay", "trainer.batch_size"]
