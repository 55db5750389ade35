"""predict.py and fewshot.evaluation.predict: a checkpoint on images of one's own, adapted as at test time."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from fewshot.errors import ConfigError
from fewshot.evaluation.predict import Predictor, class_folders, images_in, read_image
from fewshot.methods.passes import EagerPasses
from fewshot.methods.tasks import score_task
from tests.helpers import OLD_CHECKPOINTS, run_script

CLASSES = ("circle", "cross", "dash", "dot", "wave")


def scan(c: int, variant: int, size: int = 105) -> Image.Image:
    """A black drawing on white, as Omniglot's scans are: class c a bar at its own height and
    angle, `variant` shifting it a little."""
    pixels = torch.full((size, size), 255, dtype=torch.uint8)
    row = 10 + 18 * c + 2 * variant
    pixels[row : row + 6, 10 + 20 * (c % 2) : 95] = 0
    return Image.fromarray(pixels.numpy(), mode="L")


@pytest.fixture
def own_images(tmp_path) -> tuple[Path, Path]:
    """support/<class>/a.png (one per class, 5-way 1-shot) and query/<class>_<i>.png."""
    support, query = tmp_path / "support", tmp_path / "query"
    query.mkdir()
    for c, name in enumerate(CLASSES):
        (support / name).mkdir(parents=True)
        scan(c, 0).save(support / name / "a.png")
        scan(c, 0).save(query / f"{name}_0.png")
        scan(c, 1).save(query / f"{name}_1.png")
    return support, query


def test_an_omniglot_image_is_read_greyscale_resized_and_inverted(tmp_path):
    path = tmp_path / "a.png"
    scan(0, 0).convert("RGB").save(path)  # a colour file still reads as one channel
    pixels = read_image(path, "omniglot", 28)
    assert pixels.shape == (1, 28, 28) and pixels.dtype == torch.uint8
    assert pixels[0, 0, 0] == 0  # the white background becomes zero
    assert pixels.max() > 200  # the black stroke becomes bright


def test_predictions_are_the_test_protocols_on_the_same_task(own_images):
    support, query = own_images
    predictor = Predictor.from_checkpoint(OLD_CHECKPOINTS / "maml.ckpt")
    classes = class_folders(support)
    files = [f for name in CLASSES for f in classes[name]]
    support_x, query_x = predictor.read(files), predictor.read(images_in(query, "query"))
    support_y = torch.arange(5)
    logits = predictor.logits(support_x, support_y, query_x)
    # What a test episode scores: the query labels are the files' classes.
    query_y = torch.arange(5).repeat_interleave(2)
    learner = predictor.module.learner
    with torch.no_grad():
        _, acc, _ = score_task(
            learner,
            EagerPasses(learner.backbone),
            support_x / 255.0,
            support_y,
            query_x / 255.0,
            query_y,
            training=False,
            track_steps=False,
        )
    assert (logits.argmax(-1) == query_y).float().mean() == acc
    names = predictor.predict(classes, images_in(query, "query"))
    assert names == [CLASSES[i] for i in logits.argmax(-1).tolist()]


def test_a_support_set_of_another_way_is_refused_naming_the_checkpoints_way(own_images):
    support, query = own_images
    predictor = Predictor.from_checkpoint(OLD_CHECKPOINTS / "maml.ckpt")
    four = dict(list(class_folders(support).items())[:4])
    with pytest.raises(ConfigError, match="support has 4 classes .* 5-way tasks: give 5"):
        predictor.predict(four, images_in(query, "query"))


@pytest.mark.parametrize("ckpt", ["maml.ckpt", "metalstm.ckpt"])  # the two adapt loops
def test_predict_prints_each_query_file_with_a_support_class(own_images, ckpt):
    support, query = own_images
    proc = run_script(
        "predict.py", f"ckpt={OLD_CHECKPOINTS / ckpt}", f"support={support}", f"query={query}"
    )
    lines = [line.split("\t") for line in proc.stdout.splitlines() if "\t" in line]
    assert [Path(path).name for path, _ in lines] == sorted(p.name for p in query.iterdir())
    assert all(name in CLASSES for _, name in lines)


def test_predict_without_a_support_folder_is_one_line_naming_the_key(tmp_path):
    proc = run_script(
        "predict.py",
        f"ckpt={OLD_CHECKPOINTS / 'maml.ckpt'}",
        f"support={tmp_path / 'none'}",
        f"query={tmp_path}",
        expect_ok=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: support={tmp_path / 'none'} is not a folder (expected one sub-folder per class)"
    ]
