"""The recipe's keys for small and imbalanced data sets each change what they should: label
smoothing spreads the target, the EMA's weights are validated and saved, test-time flips
average the views' logits (in the module and the export), class weights weight the loss, the
balanced sampler draws each class about equally (both engines), the scores of a confusion
matrix, and bad values are one line, exit 2."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from cifar_ray.config import Config
from cifar_ray.data.arrays import ImageArrays, Normalization
from cifar_ray.data.datamodule import CifarDataModule
from cifar_ray.export import Deployable
from cifar_ray.module import LitResNet9, class_weights, load_module, read_checkpoint, scores
from tests.conftest import FAST_FLAGS, run_cli

NORM = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _module(**sections) -> LitResNet9:
    cfg = Config.from_dict({"model": {"width": 8}, **sections})
    torch.manual_seed(0)
    return LitResNet9.from_config(cfg, ["good", "faulty"], NORM)


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, 16, 16, generator=gen), torch.tensor([0, 1] * (n // 2))


def _loss(module: LitResNet9, batch) -> torch.Tensor:
    module.train()
    module.log = lambda *a, **k: None  # no Trainer here
    return module.training_step(batch, 1)


def test_label_smoothing_spreads_the_target_over_the_classes():
    x, y = _batch()
    plain, smoothed = _module(), _module(optim={"label_smoothing": 0.2})
    log_probs = plain.train()(x)
    nll = F.nll_loss(log_probs, y)
    torch.testing.assert_close(_loss(plain, (x, y)), nll)
    # (1 - e) * NLL + e * (the mean over the classes of -log p)
    expected = 0.8 * nll + 0.2 * (-log_probs.mean(1)).mean()
    torch.testing.assert_close(_loss(smoothed, (x, y)), expected)


def test_class_weights_are_the_inverse_shares_and_weight_the_loss():
    labels = np.array([0] * 70 + [1] * 30)
    torch.testing.assert_close(class_weights(labels, 2), torch.tensor([100 / 140, 100 / 60]))
    torch.testing.assert_close(class_weights(np.array([0, 1, 1, 0]), 3), torch.tensor([1.0, 1.0, 0.0]) * 4 / 6)
    module = _module(data={"balance": "weights"})
    module.class_weights.copy_(torch.tensor([0.5, 2.0]))
    x, y = _batch()
    losses = F.nll_loss(module.train()(x), y, reduction="none")
    torch.testing.assert_close(_loss(module, (x, y)), (losses * torch.tensor([0.5, 2.0])[y]).mean())


def test_test_time_flips_average_the_views_logits():
    x, _ = _batch()
    for tta, views in (("hflip", [x, x.flip(3)]),
                       ("flips", [x, x.flip(3), x.flip(2), x.flip(2).flip(3)])):
        module = _module(eval={"tta": tta}).eval()
        with torch.no_grad():
            mean = torch.stack([module.model(v) for v in views]).mean(0)
            torch.testing.assert_close(module(x), F.log_softmax(mean, 1))
            # Averaged over the flips, the answer no longer depends on which way up it came.
            torch.testing.assert_close(module(x.flip(3)), module(x), atol=1e-5, rtol=1e-4)
            if tta == "flips":
                torch.testing.assert_close(module(x.flip(2)), module(x), atol=1e-5, rtol=1e-4)
            # The export averages the same views, after its own normalisation.
            pixels = torch.rand(4, 3, 16, 16)
            deployed = Deployable(module)(pixels)
            torch.testing.assert_close(deployed, module((pixels - 0.5) / 0.25).exp())
    off = _module().eval()
    with torch.no_grad():
        torch.testing.assert_close(off(x), off.model(x))
        assert not torch.allclose(off(x.flip(3)), off(x), atol=1e-4)  # the flips did that


def test_scores_of_a_confusion_matrix():
    confusion = torch.tensor([[8, 2, 0],   # rows: true, columns: predicted
                              [1, 3, 0],
                              [0, 0, 0]])  # a class the targets do not hold: left out
    got = {k: float(v) for k, v in scores(confusion).items()}
    recalls, f1s = [0.8, 0.75], [2 * 8 / (10 + 9), 2 * 3 / (4 + 5)]
    assert got == pytest.approx({"acc": 11 / 14, "balanced_acc": sum(recalls) / 2,
                                 "f1": sum(f1s) / 2})
    report = _module().class_report(torch.tensor([[8, 2], [1, 3]]))
    assert report["per_class"]["faulty"] == pytest.approx(
        {"precision": 3 / 5, "recall": 0.75, "f1": 6 / 9, "support": 4})
    assert report["balanced_acc"] == pytest.approx(0.775)


def _imbalanced(n: int = 400) -> ImageArrays:
    rng = np.random.default_rng(0)
    labels = (np.arange(n) % 10 >= 8).astype(np.int64)  # 80% class 0, 20% class 1
    images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return ImageArrays(images, labels, images[:20], labels[:20], ["good", "faulty"], NORM)


@pytest.mark.parametrize("engine", ["albumentations", "tensors"])
@pytest.mark.parametrize("balance", ["none", "sampler"])
def test_the_balanced_sampler_draws_each_class_about_equally(engine, balance):
    cfg = Config.from_dict({"data": {"val_size": 0, "image_size": 8, "num_workers": 0,
                                     "balance": balance},
                            "augment": {"engine": engine}, "trainer": {"batch_size": 50}})
    data = CifarDataModule(cfg, _imbalanced())
    data.setup()
    drawn = Counter()
    for _ in range(5):  # epochs
        for _, labels in data.train_dataloader():
            drawn.update(labels.tolist())
    share = drawn[1] / sum(drawn.values())
    assert sum(drawn.values()) == 5 * 400
    assert share == pytest.approx(0.5 if balance == "sampler" else 0.2, abs=0.04)


def _train(tmp_path, cifar10, name, *flags):
    data_dir, _, _ = cifar10
    out = tmp_path / name
    proc = run_cli("cifar_ray.train", "--data-dir", str(data_dir), "--output-dir", str(out),
                   "--epochs", "3", "--val-size", "200", *FAST_FLAGS, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), proc.stdout


@pytest.mark.slow
def test_the_ema_weights_are_validated_tested_and_saved(tmp_path, cifar10):
    out, results, stdout = _train(tmp_path, cifar10, "ema", "--ema-decay", "0.9",
                                  "--metric", "val/balanced_acc", "--tta", "hflip")
    assert results["test_acc"] > 0.5 and results["metric"] == "val/balanced_acc", results
    assert "best val/balanced_acc=" in stdout
    best = [row for row in results["history"] if row["val/balanced_acc"] == results["val_score"]]
    assert best, results["history"]  # best.ckpt went by the metric asked for
    ckpt = read_checkpoint(out / "best.ckpt")
    raw, averaged = ckpt["current_model_state"], ckpt["state_dict"]
    weight = "model.layer3_R.conv2.0.weight"
    assert not torch.allclose(raw[weight], averaged[weight])  # the EMA is not the raw weights
    module = load_module(out / "best.ckpt")  # ... and it is what a checkpoint's reader gets
    torch.testing.assert_close(module.state_dict()[weight], averaged[weight])
    assert module.tta == "hflip"
    for name in ("test_balanced_acc", "test_f1"):
        assert 0 < results[name] <= 1
    assert set(results["per_class"]) == set(results["classes"])
    from cifar_ray.errors import CheckpointError
    from cifar_ray.module import check_resumable

    with pytest.raises(CheckpointError, match="kept best.ckpt by val/balanced_acc, not val/acc"):
        check_resumable(out / "last.ckpt", Config(), results["classes"], "val/acc")


@pytest.mark.parametrize("command, flags, words", [
    ("cifar_ray.train", ["--label-smoothing", "-0.1"], "optim.label_smoothing must be in [0, 1)"),
    ("cifar_ray.train", ["--ema-decay", "1.5"], "optim.ema_decay must be 0 (off) or in [0.5, 1)"),
    ("cifar_ray.train", ["--balance", "oversample"], "invalid choice: 'oversample'"),
    ("cifar_ray.train", ["--tta", "rotations"], "invalid choice: 'rotations'"),
    ("cifar_ray.train", ["--vflip-p", "2"], "augment.vflip_p must be in [0, 1]"),
    ("cifar_ray.train", ["--rotate", "90"], "augment.rotate must be in [0, 45]"),
    ("cifar_ray.tune", ["--metric", "val/auc"], "invalid choice: 'val/auc'"),
])
def test_bad_recipe_values_are_one_line_exit_2(tmp_path, command, flags, words):
    proc = run_cli(command, "--output-dir", str(tmp_path / "out"), *flags)
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_an_unknown_metric_in_a_config_file_is_one_line(tmp_path):
    config = tmp_path / "search.yaml"
    config.write_text("tune:\n  metric: val/auc\n")
    proc = run_cli("cifar_ray.tune", "--config", str(config), "--output-dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and "tune.metric must be one of val/acc, val/balanced_acc, " \
        "val/f1, got 'val/auc'" in proc.stderr, proc.stderr


def test_the_onnx_export_averages_the_flips_at_any_batch_size(tmp_path):
    import onnxruntime as ort

    from cifar_ray.export import export_onnx

    module = _module(eval={"tta": "flips"}).eval()
    export_onnx(Deployable(module), module.class_names, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    pixels = np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)
    got = session.run(None, {session.get_inputs()[0].name: pixels})[0]
    with torch.no_grad():
        expected = module((torch.from_numpy(pixels) - 0.5) / 0.25).exp().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_what_an_earlier_version_wrote_is_not_resumed_onto_another_split(tmp_path):
    from dataclasses import asdict

    from cifar_ray.errors import CheckpointError, UserError
    from cifar_ray.module import check_resumable
    from cifar_ray.pipeline import check_same_search
    from cifar_ray.search.settings import SearchConfig

    cfg = Config.from_dict({"model": {"width": 8}, "data": {"val_size": 5000}})
    module = _module()
    old = {"model": asdict(cfg.model), "optim": asdict(cfg.optim), "data": asdict(cfg.data),
           "seed": 1, "class_names": ["good", "faulty"], "schedule": {"epochs": 24, "batch_size": 512}}
    del old["data"]["balance"], old["optim"]["label_smoothing"], old["optim"]["ema_decay"]
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": old}, tmp_path / "old.ckpt")
    assert load_module(tmp_path / "old.ckpt").tta == "off"  # still loads, to predict or export
    with pytest.raises(CheckpointError, match="written by an earlier version of cifar_ray"):
        check_resumable(tmp_path / "old.ckpt", cfg, ["good", "faulty"])
    saved = SearchConfig().to_dict()
    del saved["data"]["balance"]
    (tmp_path / "cifar_ray_config.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match="started by an earlier version of cifar_ray, without "
                                        "data.balance"):
        check_same_search(tmp_path, SearchConfig())
    # Keys added after the split changed, at their defaults, are what such a search ran with.
    saved = SearchConfig().to_dict()
    del saved["model"]["res_blocks"], saved["tune"]["objectives"], saved["tune"]["pick"]
    (tmp_path / "cifar_ray_config.json").write_text(json.dumps(saved))
    check_same_search(tmp_path, SearchConfig())
    with pytest.raises(UserError, match="without model.res_blocks"):
        check_same_search(tmp_path, SearchConfig.from_dict({"model": {"res_blocks": 2}}))
