"""tieredImageNet from a generated release: classes, categories, the cache, bad files.

The real split sizes (351/97/160 classes) are a property of the release's label files, which
are not here: the generated release is smaller, so it loads under data.split=any, and
tests/data/test_damaged_data.py has what data.split=ren refuses."""

import io
import logging
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot.data import tieredimagenet as ti
from fewshot.data.pickles import load_pickle
from fewshot.errors import DataError
from tests.helpers import make_tiered


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_tiered(tmp_path_factory.mktemp("tiered"))


@pytest.mark.parametrize("workers", [0, 2])
def test_classes_are_decoded_by_label_with_their_categories(root, tmp_path, workers, caplog):
    with caplog.at_level(logging.INFO):
        splits = ti.load_tieredimagenet(
            root, 84, cache_dir=str(tmp_path), workers=workers, split="any"
        )
    assert {s: c.num_classes for s, c in splits.items()} == {"train": 3, "val": 2, "test": 2}
    # Classes hold 4 or 5 images: every class of a split keeps 4, and the log says so.
    assert all(c.per_class == 4 for c in splits.values())
    assert "meta-train classes hold 4 to 5 images" in caplog.text
    assert splits["train"].names == [
        "train_category0/ntrain00000",
        "train_category0/ntrain00001",
        "train_category1/ntrain00002",
    ]
    assert splits["val"].images.shape == (2, 4, 3, 84, 84)
    # The PNGs are lossless: pixels are those generated (class 1 of train is images 4..8).
    png = load_pickle(root / "train_images_png.pkl")[4].tobytes()
    first = torch.from_numpy(np.array(Image.open(io.BytesIO(png)))).permute(2, 0, 1)
    assert torch.equal(splits["train"].images[1, 0], first)


def test_workers_give_the_same_cache_and_it_is_reused(root, tmp_path, monkeypatch):
    a = ti.load_tieredimagenet(root, 32, cache_dir=str(tmp_path / "a"), workers=0, split="any")
    b = ti.load_tieredimagenet(root, 32, cache_dir=str(tmp_path / "b"), workers=2, split="any")
    assert all(torch.equal(a[s].images, b[s].images) for s in ti.SPLITS)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although a cache exists")

    monkeypatch.setattr(ti, "_decode", no_decoding)
    again = ti.load_tieredimagenet(root, 32, cache_dir=str(tmp_path / "a"), split="any")
    assert torch.equal(again["test"].images, a["test"].images)


def test_missing_files_are_listed(tmp_path):
    with pytest.raises(
        DataError, match=r"tieredImageNet not found under data.root=.*_images_png.pkl"
    ):
        ti.load_tieredimagenet(tmp_path, 84, cache_dir=str(tmp_path / "c"), split="any")


@pytest.mark.parametrize(
    "victim, content, message",
    [
        (
            "val_images_png.pkl",
            b"<!doctype html><title>404</title>",
            "val_images_png.pkl is an HTML page",
        ),
        ("val_labels.pkl", {"label_specific": [0]}, r"val_labels.pkl: expected a dict with keys"),
        (
            "val_images_png.pkl",
            [b"\x89PNG"],
            r"val_images_png.pkl: expected a list of 9 PNG images",
        ),
        (
            "test_images_png.pkl",
            [b"not a png"] * 9,
            r"cannot decode tieredImageNet image 0 of test_images_png.pkl",
        ),
    ],
    ids=["html", "keys", "count", "not-png"],
)
def test_a_bad_file_is_named_in_one_line(root, tmp_path, victim, content, message):
    data = shutil.copytree(root, tmp_path / "data")
    (data / victim).write_bytes(content if isinstance(content, bytes) else pickle.dumps(content))
    with pytest.raises(DataError, match=message) as error:
        ti.load_tieredimagenet(data, 84, cache_dir=str(tmp_path / "c"), split="any")
    assert "\n" not in str(error.value)
    assert not list((tmp_path / "c").iterdir())
