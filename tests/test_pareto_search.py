"""A search of several objectives from the command line: every trial measures its model's
latency and parameters, multi-objective ASHA runs it, the pick's trial is retrained, exported
and measured again; the report draws the front. Then a pick nothing meets, on --resume: one
line naming the closest trial, exit 2, the earlier results kept."""

import csv
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, SMOKE, search_env

pytestmark = pytest.mark.slow

SEARCH = [*SMOKE, "--objectives", "val/acc,latency_ms,params", "--pick", "params <= 120000",
          "--search", "model.width=choice:8,16", "--search", "model.res_blocks=choice:0,1",
          "--epochs", "2", "--retrain-epochs", "2", "--latency-batch", "16"]


def test_a_search_of_accuracy_against_latency_picks_under_a_constraint(noisy_data, tmp_path,
                                                                        sys_tmp, no_leftover_ray,
                                                                        browser):
    import onnxruntime as ort

    out = tmp_path / "search"
    run = [sys.executable, "-m", "cifar_ray.tune", *SEARCH, "--data-dir", str(noisy_data),
           "--output-dir", str(out)]
    proc = subprocess.run(run, cwd=ROOT, env=search_env(sys_tmp), capture_output=True, text=True,
                          timeout=800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "objectives   val/acc (max), latency_ms (min), params (min)" in proc.stdout
    assert "by Pareto rank" in proc.stdout

    with open(out / "trials.csv") as f:
        trials = list(csv.DictReader(f))
    assert len(trials) == 4
    for t in trials:  # each measured its own model
        assert 0 < float(t["latency_ms"]) < 1000 and int(float(t["params"])) > 1000, t
    sizes = {(t["model.width"], t["model.res_blocks"]): int(float(t["params"])) for t in trials}
    assert len(set(sizes.values())) == len(sizes)  # the shape decides the count

    results = json.loads((out / "results.json").read_text())
    assert results["objectives"] == ["val/acc", "latency_ms", "params"]
    front = results["front"]
    assert front and all(f["params"] is not None for f in front)
    on_front = {f["trial"] for f in front}
    for t in trials:  # every trial off the front is dominated by one on it
        if t["trial_id"] not in on_front and t["best_score"]:
            mine = (-float(t["best_score"]), float(t["latency_ms"]), float(t["params"]))
            assert any(all(a <= b for a, b in zip((-f["val/acc"], f["latency_ms"],
                                                   f["params"]), mine)) for f in front), t
    pick = results["pick"]
    assert pick["constraints"] == ["params <= 120000"]
    chosen = next(t for t in trials if t["trial_id"] == pick["trial"])
    assert int(float(chosen["params"])) <= 120000
    meeting = [t for t in trials if float(t["params"]) <= 120000 and t["best_score"]]
    assert float(chosen["best_score"]) == max(float(t["best_score"]) for t in meeting)
    # The retrained model, exported and measured again.
    assert pick["retrained"]["params"] == int(float(chosen["params"]))
    assert pick["retrained"]["latency_ms"] > 0 and pick["meets"] == {"params <= 120000": True}
    session = ort.InferenceSession(pick["onnx"])
    size = session.get_inputs()[0].shape[2]
    probabilities = session.run(None, {"images": np.random.rand(3, 3, size, size)
                                       .astype(np.float32)})[0]
    assert probabilities.shape == (3, 10)
    assert results["test_acc"] > 0.6  # the picked model learned
    assert 0 < results["hypervolume"] <= 1
    history = [hv for _, hv in results["hypervolume_history"]]
    assert history == sorted(history)  # a front only grows
    assert re.search(r"pick: +trial \w+; the retrained model measured again: latency_ms "
                     r"[\d.e-]+, params \d+; params <= 120000: met", proc.stdout)
    page = (out / "report.html").read_text()
    assert 'src="report/pareto.png"' in page and 'src="report/hypervolume.png"' in page
    assert "<table class=sortable>" in page and page.count("<tr") >= 4
    assert (out / "report" / "pareto.png").stat().st_size > 10_000
    _sorts_by_a_click(browser, out / "report.html", "latency_ms")

    # Another pick of the same trials, on --resume: nothing meets it.
    before = (out / "results.json").read_bytes()
    proc = subprocess.run([*run, "--resume", "--pick", "params <= 10"], cwd=ROOT,
                          env=search_env(sys_tmp), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: --pick params <= 10: no trial meets it; the "
                        r"closest is trial \w+ \(val/acc [\d.]+, latency_ms [\d.]+, params "
                        r"\d+\); .*", error), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "retrain epoch" not in proc.stdout
    assert (out / "results.json").read_bytes() == before


def _sorts_by_a_click(browser, page_file, column: str) -> None:
    """In a browser, a click on the objective's header sorts the table by it, a second the
    other way."""
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(page_file.as_uri())
    table = page.locator("table.sortable")
    headers = table.locator("th").all_inner_texts()
    index = next(i for i, h in enumerate(headers) if h.startswith(column + " "))
    cell = f"tbody tr td:nth-child({index + 1})"
    for order in (sorted, lambda v: sorted(v, reverse=True)):
        table.locator("th").nth(index).click()
        values = [float(v) for v in table.locator(cell).evaluate_all(
            "cells => cells.map(c => c.dataset.value)")]
        assert values == order(values), values
    assert not errors, errors
    page.close()
