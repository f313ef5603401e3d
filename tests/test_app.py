"""The demo app (`python -m cifar_ray.app`), started on a free loopback port with a small trained
checkpoint and driven in a real headless Chromium by Playwright: an upload is classified (the
page shows the right class), bad files get a message in the page and the app keeps serving, the
mistakes gallery is there. The app process is stopped by its pid."""

import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_ray.augment import eval_transform
from cifar_ray.cifar_files import SPECS
from cifar_ray.module import load_module
from tests.cifar_fixture import planted_images
from tests.conftest import ROOT, run_cli
from tests.processes import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app(trained_run, cifar10, tmp_path_factory):
    """The app on a free port: (url, process, the checkpoint it serves)."""
    out, _ = trained_run
    data_dir, _, _ = cifar10
    folder = tmp_path_factory.mktemp("app")
    checkpoint = folder / "model.ckpt"  # alone: no gradcam report beside it, so one is computed
    shutil.copy(out / "best.ckpt", checkpoint)
    port = free_port()
    log = folder / "app.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "cifar_ray.app", "--checkpoint",
                                 str(checkpoint), "--data-dir", str(data_dir), "--port", str(port)],
                                cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, log.read_text()[-3000:]
            try:
                if urllib.request.urlopen(url, timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(1)
        yield url, proc, checkpoint
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _open(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#upload input[type=file]", state="attached", timeout=60_000)
    return page


def _status_has(page, text: str) -> None:
    page.wait_for_function(
        "text => (document.querySelector('#status')?.innerText || '').includes(text)",
        arg=text, timeout=60_000)


def test_an_uploaded_image_is_classified_in_the_page(app, browser, tmp_path):
    url, proc, checkpoint = app
    # A planted-signal image the model classifies right, uploaded larger (any size is resized).
    module = load_module(checkpoint)
    planted = planted_images(40, 10, seed=99)
    x = torch.stack([eval_transform(SPECS["cifar10"].norm)(image=im)["image"] for im in planted.images])
    with torch.no_grad():
        right = np.flatnonzero(module(x).argmax(1).numpy() == planted.labels)
    assert len(right), "the fixture model classifies none of the planted images"
    i = int(right[0])
    upload = tmp_path / "upload.png"
    Image.fromarray(planted.images[i]).resize((96, 96), Image.Resampling.NEAREST).save(upload)
    true_class = module.class_names[planted.labels[i]]

    page = _open(browser, url)
    page.set_input_files("#upload input[type=file]", str(upload))
    _status_has(page, "Predicted")
    assert f"Predicted {true_class}" in page.inner_text("#status")
    lines = [line for line in page.inner_text("#prediction").splitlines() if line.strip()]
    assert lines[1] == true_class  # the top class, shown as the label's heading
    assert sum(line.endswith("%") for line in lines) == 5  # top-5 by default
    assert page.locator("#cam img").count() == 1 and page.locator("#seen img").count() == 1
    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
    with Image.open(tmp_path / "app.png") as shot:
        assert shot.size[0] >= 1280 and shot.size[1] >= 900

    page.get_by_role("tab", name="Mistakes").click()
    page.wait_for_selector("#gallery img", timeout=60_000)
    assert page.locator("#gallery img").count() >= 2  # the report's figures
    page.screenshot(path=str(tmp_path / "mistakes.png"), full_page=True)
    page.close()


@pytest.mark.parametrize("name, content, message", [
    ("notes.txt", b"not an image at all", "'notes.txt' is not an image this app can read"),
    ("empty.png", b"", "'empty.png' is empty (0 bytes)"),
])
def test_a_bad_file_gets_a_message_in_the_page_and_the_app_keeps_running(
        app, browser, tmp_path, name, content, message):
    url, proc, _ = app
    bad = tmp_path / name
    bad.write_bytes(content)
    page = _open(browser, url)
    page.set_input_files("#upload input[type=file]", str(bad))
    _status_has(page, message)
    page.close()
    assert proc.poll() is None
    assert urllib.request.urlopen(url, timeout=10).status == 200


def test_a_bad_checkpoint_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    proc = run_cli("cifar_ray.app", "--checkpoint", str(tmp_path / "bad.ckpt"), "--port",
                   str(free_port()))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'bad.ckpt'}: ")
