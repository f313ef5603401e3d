"""What `python -m cifar_ray.tune` does with an output dir that already holds a search: it
refuses before starting Ray unless told `--resume` or `--overwrite`, and destroys nothing; a
damaged saved state is one line. And the trials' times as trials.csv counts them."""

import pandas as pd
import pytest

from cifar_ray.output_dir import LOCK_NAME
from cifar_ray.search.tuner import training_seconds, training_spans
from tests.conftest import SMOKE, run_cli


@pytest.mark.parametrize("existing, message", [
    ("results.json", "already holds a finished search (results.json); pass --overwrite"),
    ("search/experiment_state-x.json", "holds an interrupted search (search/); pass --resume"),
])
def test_an_output_dir_with_a_search_is_refused(noisy_data, tmp_path, existing, message):
    out = tmp_path / "out"
    (out / existing).parent.mkdir(parents=True, exist_ok=True)
    (out / existing).write_text('{"test_acc": 0.9}')
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = run_cli("cifar_ray.tune", *SMOKE, "--data-dir", str(noisy_data), "--output-dir", str(out))
    assert proc.returncode == 2
    assert message in proc.stderr.strip().splitlines()[-1]
    # Only the output dir's lock file was added (output_dir.py).
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK_NAME} == before


def test_resume_with_nothing_to_resume_is_a_clear_error(noisy_data, tmp_path, no_leftover_ray):
    proc = run_cli("cifar_ray.tune", *SMOKE, "--data-dir", str(noisy_data), "--output-dir",
                   str(tmp_path / "empty"), "--resume", "--address", "local", timeout=300)
    assert proc.returncode == 2
    assert "--resume: no search to resume in" in proc.stderr.strip().splitlines()[-1]


def test_a_damaged_saved_state_is_one_line_on_resume(tmp_path):
    out = tmp_path / "search"
    (out / "search").mkdir(parents=True)
    (out / "search" / "experiment_state-2026-11-29_00-00-00.json").write_text('{"trial_data": [')
    proc = run_cli("cifar_ray.tune", *SMOKE, "--output-dir", str(out), "--resume", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().startswith("error: --resume: the search's saved state ")
    assert proc.stderr.strip().endswith("is damaged (Expecting value: line 1 column 17 (char 16)); "
                                        "start again with --overwrite")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_trials_time_leaves_out_the_time_it_was_down():
    """Two epochs, the search down for 1,000 s, two more epochs from a new worker (its first
    step 20 s after it started): 4 x 5 s of training, not 1,040 s."""
    history = pd.DataFrame({"time/first_step_at": [100.0, 100.0, 1120.0, 1120.0],
                            "time/reported_at": [105.0, 110.0, 1125.0, 1130.0]})
    spans = training_spans(history)
    assert spans == [(100, 105), (105, 110), (1120, 1125), (1125, 1130)]
    other = [(108.0, 112.0)]  # a second trial, overlapping the first one's second epoch
    assert training_seconds([{"spans": spans}, {"spans": other}]) == 22
