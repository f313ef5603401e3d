"""The network's shape and size, and safe checkpoint loading."""

from pathlib import Path

import pytest
import torch

from cifar_ray.errors import CheckpointError
from cifar_ray.model import ResNet9
from cifar_ray.module import LitResNet9, load_module
from cifar_ray.names import CAM_LAYERS
from tests.conftest import MarkerPayload


def test_resnet9_has_the_reference_parameter_count():
    assert sum(p.numel() for p in ResNet9(10).parameters()) == 6_573_130


@pytest.mark.parametrize("classes, batch", [(10, 1), (100, 4)])
def test_outputs_are_log_probabilities(classes, batch):
    out = ResNet9(classes, width=8).eval()(torch.randn(batch, 3, 32, 32))
    assert out.shape == (batch, classes)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(batch))


def test_gradcams_layers_are_the_networks_spatial_maps_shallow_to_deep():
    """names.CAM_LAYERS (the GradCAM command lists them without importing torch) names modules
    of ResNet9 whose outputs are maps, each no larger than the one before, down to s/8."""
    model = ResNet9(10, width=8).eval()
    layers = dict(model.named_modules())
    sides = {}
    for name in CAM_LAYERS:
        layers[name].register_forward_hook(
            lambda _m, _i, out, name=name: sides.update({name: out.shape[-1]}))
    model(torch.randn(1, 3, 64, 64))
    assert list(sides) == list(CAM_LAYERS)
    assert [sides[n] for n in CAM_LAYERS] == sorted(sides.values(), reverse=True)
    assert sides[CAM_LAYERS[-1]] == 64 // 8


def _save_lightning_style(module: LitResNet9, path: Path) -> None:
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)


def test_checkpoint_round_trip_rebuilds_the_same_model(tmp_path):
    module = LitResNet9(model={"width": 8}, class_names=list("abcdefghij"))
    _save_lightning_style(module, tmp_path / "m.ckpt")
    loaded = load_module(tmp_path / "m.ckpt")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), module.eval()(x))
    assert loaded.class_names == list("abcdefghij")


def test_a_checkpoint_with_the_earlier_flat_hyperparameters_loads_in_sections(tmp_path):
    """Checkpoints written before the hyperparameters were the config's sections (`lr`,
    `width`, `dataset`, `mean` side by side) load, each value under its config key."""
    module = LitResNet9(model={"width": 8}, class_names=list("abcdefghij"))
    flat = {"num_classes": 10, "width": 8, "lr": 0.003, "weight_decay": 1e-5, "pct_start": 0.25,
            "div_factor": 100.0, "final_div_factor": 100.0, "class_names": list("abcdefghij"),
            "dataset": "cifar100", "val_size": 500, "seed": 7, "mean": [0.5] * 3, "std": [0.25] * 3}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": flat}, tmp_path / "old.ckpt")
    loaded = load_module(tmp_path / "old.ckpt")
    assert loaded.hparams.optim == {"lr": 0.003, "weight_decay": 1e-5, "pct_start": 0.25,
                                    "div_factor": 100.0, "final_div_factor": 100.0}
    assert (loaded.width, loaded.num_classes, loaded.hparams.seed) == (8, 10, 7)
    assert (loaded.data_config.dataset, loaded.data_config.val_size) == ("cifar100", 500)
    assert loaded.normalization.mean == (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), module.eval()(x))


def test_missing_truncated_and_foreign_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint file missing"):
        load_module(tmp_path / "nope.ckpt")
    _save_lightning_style(LitResNet9(model={"width": 8}), tmp_path / "good.ckpt")
    (tmp_path / "torn.ckpt").write_bytes((tmp_path / "good.ckpt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="torn.ckpt: not a loadable checkpoint"):
        load_module(tmp_path / "torn.ckpt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not a cifar_ray checkpoint"):
        load_module(tmp_path / "other.ckpt")
    # Another architecture's weights under our keys.
    foreign = {"state_dict": {"model.fc.weight": torch.zeros(5, 5)},
               "hyper_parameters": {"num_classes": 10, "width": 8}}
    torch.save(foreign, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="does not match this project's ResNet-9"):
        load_module(tmp_path / "foreign.ckpt")
    # Same architecture, another class count than its hyperparameters claim.
    module = LitResNet9(model={"width": 8}, class_names=[str(i) for i in range(100)])
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"num_classes": 10, "width": 8}},
               tmp_path / "classes.ckpt")
    with pytest.raises(CheckpointError, match="does not match"):
        load_module(tmp_path / "classes.ckpt")


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"state_dict": {}, "hyper_parameters": MarkerPayload(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="refused, not run"):
        load_module(tmp_path / "evil.ckpt")
    assert not marker.exists()
    # The payload is live: an unsafe loader would have run it.
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(hyper_parameters=["width", 8]),
     "its hyper_parameters and state_dict must be mappings"),
    (lambda c: c["hyper_parameters"].update(class_names=["a", "b", "c"]),
     "model.fc.weight is (10, 64), not (3, 64)"),
    (lambda c: c["hyper_parameters"].update(class_names="abcdefghij"),
     "its class_names must be a list of 1 to 1000 names"),
    (lambda c: c["hyper_parameters"].update(optim=["lr", 1]),
     "hyper_parameters: section 'optim' must be a mapping"),
    # A network 64 times wider than its weights: built before loading, it would take ~2 GB.
    (lambda c: c["hyper_parameters"]["model"].update(width=512),
     "model.prep.0.weight is (8, 3, 3, 3), not (512, 3, 3, 3)"),
])
def test_hyperparameters_that_disagree_with_the_weights_are_one_line(tmp_path, change, message):
    module = LitResNet9(model={"width": 8}, class_names=list("abcdefghij"))
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    change(ckpt)
    torch.save(ckpt, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError) as err:
        load_module(tmp_path / "m.ckpt")
    assert message in str(err.value) and "\n" not in str(err.value)
