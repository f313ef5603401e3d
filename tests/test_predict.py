"""`predict` names the planted class of image files of any size and format, as a table or JSON;
a file that is not an image is one line."""

import json

import pytest
from PIL import Image

from tests.cifar_fixture import FOLDER_CLASSES, planted_images
from tests.conftest import run_cli


@pytest.mark.slow
def test_predict_names_the_planted_class(folder_run, tmp_path, capsys):
    _, out, _ = folder_run
    planted = planted_images(6, len(FOLDER_CLASSES), seed=99)
    paths = []
    for i, image in enumerate(planted.images):
        path = tmp_path / f"img{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(image).resize((50, 50), Image.Resampling.NEAREST).save(path)
        paths.append(str(path))
    proc = run_cli("cifar_ray.predict", "--checkpoint", str(out / "best.ckpt"), *paths,
                   "--top-k", "2", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = json.loads(proc.stdout)
    predicted = [a["top"][0]["class"] for a in answers]
    truth = [FOLDER_CLASSES[k] for k in planted.labels]
    assert sum(p == t for p, t in zip(predicted, truth)) >= 5, (predicted, truth)
    assert all(len(a["top"]) == 2 and a["top"][0]["probability"] >= a["top"][1]["probability"]
               for a in answers)
    # The table, and a file that is not an image: in-process (the command itself ran above).
    from cifar_ray.predict import main
    assert main(["--checkpoint", str(out / "best.ckpt"), paths[0]]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == paths[0] and table[1].split()[1] == predicted[0]
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert main(["--checkpoint", str(out / "best.ckpt"), str(bad)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {bad}: not a readable image (UnidentifiedImageError)")
