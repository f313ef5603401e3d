"""What `python -m cifar_ray.tune` does with an output dir that already holds a search: it
refuses before starting Ray unless told `--resume` or `--overwrite`, and destroys nothing."""

import pytest

from cifar_ray.run_lock import LOCK_NAME
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
    # Only the output dir's lock file was added (run_lock.py).
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK_NAME} == before


def test_resume_with_nothing_to_resume_is_a_clear_error(noisy_data, tmp_path, no_leftover_ray):
    proc = run_cli("cifar_ray.tune", *SMOKE, "--data-dir", str(noisy_data), "--output-dir",
                   str(tmp_path / "empty"), "--resume", "--address", "local", timeout=300)
    assert proc.returncode == 2
    assert "--resume: no search to resume in" in proc.stderr.strip().splitlines()[-1]
