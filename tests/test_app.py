"""The demo app (`python -m cifar_ray.app`), started on a free loopback port with a small trained
checkpoint and driven in a real headless Chromium by Playwright: an upload is classified (the
page shows the right class), bad files get a message in the page and the app keeps serving, the
mistakes gallery is there. The app process is stopped by its pid."""

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_ray.data.augment import eval_transform
from cifar_ray.data.cifar_files import SPECS
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


def _post_upload(url: str, size: int) -> int:
    """POSTs a file of `size` bytes to Gradio's upload route; the HTTP status."""
    boundary = "cifarrayboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
            f"filename=\"big.png\"\r\nContent-Type: image/png\r\n\r\n").encode() \
        + b"\0" * size + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{url}gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        return urllib.request.urlopen(request, timeout=60).status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_an_upload_over_the_size_limit_is_refused_and_a_small_one_is_not(app):
    url, proc, _ = app
    assert _post_upload(url, 1000) == 200
    assert _post_upload(url, 11 * 1024 * 1024) == 413  # default --max-upload-mb 10
    assert proc.poll() is None


def test_an_image_of_too_many_pixels_gets_a_plain_message(app, browser, tmp_path):
    """A few-KB PNG that decodes to 180 MB of RGB is refused from its header."""
    url, _, _ = app
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 6_000)).save(bomb)
    page = _open(browser, url)
    page.set_input_files("#upload input[type=file]", str(bomb))
    _status_has(page, "'bomb.png' has more pixels than this app reads (50 megapixels).")
    page.close()


def test_an_unexpected_error_shows_the_visitor_a_plain_message_not_its_text(
        trained_run, tmp_path, monkeypatch, capsys):
    from cifar_ray.app import Classifier

    out, _ = trained_run
    classifier = Classifier(out / "best.ckpt")
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)

    def broken(*args):
        raise RuntimeError("internal detail /srv/secret/path")

    monkeypatch.setattr(classifier, "explain", broken)
    *_, message = classifier.answer(str(image), 3, "the predicted class", "layer3", 0.5)
    assert message == ("⚠️ This image could not be classified; the server's console has the "
                       "details.")
    assert "/srv/secret/path" in capsys.readouterr().err  # for whoever runs the server


def test_launch_settings_from_flags_and_the_environment(trained_run, monkeypatch, capsys):
    """No exception text for visitors, the upload limit, a login from the environment only,
    and a warning when serving beyond this machine."""
    import gradio as gr

    from cifar_ray import app

    out, _ = trained_run
    launched = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.append(kwargs))
    monkeypatch.setenv("CIFAR_RAY_APP_USERNAME", "ada")
    monkeypatch.setenv("CIFAR_RAY_APP_PASSWORD", "pw-from-env")
    assert app.main(["--checkpoint", str(out / "best.ckpt"), "--host", "0.0.0.0"]) == 0
    (kwargs,) = launched
    assert kwargs["show_error"] is False and kwargs["auth"] == ("ada", "pw-from-env")
    assert kwargs["max_file_size"] == 10 * 1024 * 1024 and kwargs["server_name"] == "0.0.0.0"
    captured = capsys.readouterr()
    assert "warning: serving on 0.0.0.0: other machines can reach this app" in captured.err
    assert "pw-from-env" not in captured.out + captured.err
    monkeypatch.delenv("CIFAR_RAY_APP_PASSWORD")
    assert app.main(["--checkpoint", str(out / "best.ckpt")]) == 2
    assert capsys.readouterr().err.strip() == ("error: set both CIFAR_RAY_APP_USERNAME and "
                                               "CIFAR_RAY_APP_PASSWORD for a login, or neither")
    monkeypatch.delenv("CIFAR_RAY_APP_USERNAME")
    assert app.main(["--checkpoint", str(out / "best.ckpt"), "--port", "7861"]) == 0
    assert launched[-1]["auth"] is None
    assert "warning" not in capsys.readouterr().err  # 127.0.0.1: no warning


def test_the_app_removes_its_temporary_files_when_stopped(trained_run, cifar10, tmp_path):
    out, _ = trained_run
    data_dir, _, _ = cifar10
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    port = free_port()
    log = tmp_path / "app.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "cifar_ray.app", "--checkpoint",
                                 str(out / "best.ckpt"), "--data-dir", str(data_dir), "--port",
                                 str(port)], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "TMPDIR": str(tmp)})
    try:
        deadline = time.time() + 180
        while not list(tmp.glob("cifar_ray_app_*/examples/*.png")) or not _serves(port):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert list(tmp.glob("cifar_ray_*")) == []


def _serves(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).status == 200
    except OSError:
        return False
