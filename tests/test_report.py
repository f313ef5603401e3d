"""The search's report page (`report.py`) from made-up trials, without Ray: every figure it
names is drawn, the page's parts come in order, and what cannot be drawn is said; ASHA's rungs;
the curves of a run without validation; the search settings' one-line errors."""

import argparse
import html
import re
from pathlib import Path

import pytest
from PIL import Image

from cifar_ray.config import add_config_flags, resolve
from cifar_ray.errors import ConfigError
from cifar_ray.plots import curve_panels
from cifar_ray.report import write_report
from cifar_ray.search.settings import SearchConfig
from tests.conftest import ROOT

SPACE = {"optim.lr": ("loguniform", [1e-4, 1e-1]), "trainer.batch_size": ("choice", [64, 128]),
         "augment.cutout_p": ("quniform", [0.0, 1.0, 0.25])}


def _rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        epochs = 3 if i % 2 == 0 else 1
        curve = [(e, 0.2 + 0.1 * e + 0.05 * i) for e in range(1, epochs + 1)]
        rows.append({"trial_id": f"t{i}", "optim.lr": 10 ** (-4 + 3 * i / max(n - 1, 1)),
                     "trainer.batch_size": [64, 128][i % 2], "augment.cutout_p": 0.25 * (i % 5),
                     "epochs": epochs, "best_score": max(a for _, a in curve),
                     "status": "completed" if epochs == 3 else "stopped early",
                     "startup_s": 20.0 + i, "curve": curve})
    return rows


def _results(rows: list[dict]) -> dict:
    best = max(rows, key=lambda r: r["best_score"])
    return {"best_config": {k: best[k] for k in SPACE}, "best_trial": best["trial_id"],
            "best_score": best["best_score"], "test_acc": 0.81, "test_loss": 0.6,
            "test_balanced_acc": 0.7, "test_f1": 0.72, "metric": "val/balanced_acc",
            "per_class": {"good": {"precision": 0.9, "recall": 0.95, "f1": 0.92, "support": 70},
                          "<faulty>": {"precision": 0.5, "recall": 0.45, "f1": 0.47,
                                       "support": 30}},
            "retrain_epochs": 2, "retrain_init": "checkpoint", "num_trials": len(rows),
            "trials_stopped_early": sum(r["status"] == "stopped early" for r in rows),
            "search_alg": "optuna", "search_seconds": 100.0, "training_seconds": 60.0,
            "total_seconds": 130.0, "checkpoint": "/x/retrain/best.ckpt"}


def _gradcam(out: Path) -> dict:
    folder = out / "gradcam"
    folder.mkdir(parents=True)
    for name in ("misclassified.png", "confusion_matrix.png"):
        Image.new("RGB", (8, 8)).save(folder / name)
    return {"output_dir": str(folder), "figures": ["misclassified.png", "confusion_matrix.png"]}


def test_the_report_draws_every_figure_it_shows_in_order(tmp_path):
    rows = _rows(10)
    page = write_report(tmp_path, _results(rows), rows, SPACE, [1, 2], _gradcam(tmp_path))
    text = page.read_text()
    sources = re.findall(r'<img src="([^"]+)"', text)
    assert sources == ["report/curves.png", "report/parallel_coordinates.png", "report/slices.png",
                       "report/importance.png", "retrain/curves.png",
                       "gradcam/misclassified.png", "gradcam/confusion_matrix.png"]
    for src in sources[:4]:
        with Image.open(tmp_path / src) as image:
            assert image.format == "PNG" and image.size[0] > 300
    # In order: the outcome, the figures, the table, the retrain, GradCAM (linked).
    headings = re.findall(r"<h2>(.*?)</h2>", text)
    assert headings == ["Outcome", "Trials", "Trials table", "The retrain",
                        "Mistakes of the retrained model (GradCAM)"]
    assert 'href="gradcam/index.html"' in text and "fANOVA" in text
    table = text.split("<h2>Trials table</h2>")[1].split("<h2>")[0]
    ids = re.findall(r"<tr(?: class=best)?><td>(t\d+)</td>", table)
    best = max(rows, key=lambda r: r["best_score"])
    assert len(ids) == 10 and ids[0] == best["trial_id"]  # best first, highlighted
    assert f"<tr class=best><td>{best['trial_id']}</td>" in table
    assert "stopped early" in table and html.escape("optim.lr = ") in text
    assert "<th>best val/balanced_acc</th>" in table  # tune.metric names the column


def test_the_report_shows_the_metric_and_each_class_of_the_test_set(tmp_path):
    rows = _rows(9)
    results = {**_results(rows), "config_file": "experiments/search_smoke.yaml",
               "purpose": "A CPU smoke search. It checks the machinery.",
               "runner_up": {"trial": "t6", "best_score": rows[6]["best_score"]},
               "checkpoint": "/x/my runs/retrain/best.ckpt"}
    text = write_report(tmp_path, results, rows, SPACE, [1, 2], _gradcam(tmp_path)).read_text()
    outcome = text.split("<h2>Trials</h2>")[0]
    assert "experiments/search_smoke.yaml: A CPU smoke search. It checks the machinery." in outcome
    assert "+0.1000 over the runner-up, trial t6" in outcome
    # 100 test images at 0.81: Wilson's 95% interval
    assert "100 images: accuracy 0.8100, 95% interval 0.722 to 0.875" in outcome
    assert html.escape("python -m cifar_ray.export --checkpoint '/x/my runs/retrain/best.ckpt' "
                       "--format onnx") in outcome
    assert "left out below 10 scored trials (9 here)" in text
    assert "report/importance.png" not in text
    assert "val/balanced_acc" in outcome and "balanced accuracy 0.7000" in outcome
    assert "macro F1 0.7200" in outcome
    classes = outcome.split("class by class")[1]
    assert re.findall(r"<tr><td>([^<]+)</td><td>([\d.]+)</td><td>([\d.]+)</td>", classes) == [
        ("good", "0.900", "0.950"), ("&lt;faulty&gt;", "0.500", "0.450")]  # escaped once


def test_a_report_of_one_trial_says_what_it_cannot_draw(tmp_path):
    rows = _rows(1)
    page = write_report(tmp_path, _results(rows), rows, SPACE, [1], _gradcam(tmp_path))
    text = page.read_text()
    assert "report/curves.png" in text and "report/importance.png" not in text
    assert text.count("needs at least 2 scored trials (1 here)") == 3


def test_curves_of_a_run_without_validation_have_no_validation_panels():
    history = [{"epoch": 1, "train/loss": 1.0, "train/acc": 0.5},
               {"epoch": 2, "train/loss": 0.8, "train/acc": 0.6}]
    assert [key for key, _ in curve_panels(history)] == ["train/loss", "train/acc"]
    history[1]["val/acc"] = 0.55
    assert [key for key, _ in curve_panels(history)] == ["train/loss", "train/acc", "val/acc"]


def test_search_settings_are_checked():
    parser = argparse.ArgumentParser()
    add_config_flags(parser, SearchConfig())
    cfg = resolve(SearchConfig(), parser.parse_args(["--search-alg", "optuna",
                                                     "--mlflow-uri", "sqlite:///x.db"]))
    assert cfg.tune.search_alg == "optuna" and cfg.tracking.mlflow_uri == "sqlite:///x.db"
    with pytest.raises(SystemExit):  # the flag lists its choices (argparse's usage error)
        parser.parse_args(["--search-alg", "tpe"])
    cfg = SearchConfig()
    cfg.tune.search_alg = "tpe"  # what a YAML file can hold
    with pytest.raises(ConfigError, match="tune.search_alg must be one of .*got 'tpe'"):
        cfg.validate()


def test_mlflow_missing_is_one_line_naming_the_install(tmp_path, monkeypatch, capsys):
    from cifar_ray import tune

    monkeypatch.setitem(__import__("sys").modules, "mlflow", None)  # as if not installed
    code = tune.main(["--config", str(ROOT / "experiments/search_smoke.yaml"), "--output-dir",
                      str(tmp_path / "o"), "--mlflow-uri", f"sqlite:///{tmp_path}/m.db"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: tracking.mlflow_uri needs MLflow: pip install 'cifar_ray[mlflow]'")
    assert not (tmp_path / "o").exists()
