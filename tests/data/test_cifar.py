"""CIFAR-FS and FC100 from a generated cifar-100-python.tar.gz: the papers' class lists,
the splits built from them, the cache, the archive's md5 and bad archives."""

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fewshot.data import cifar
from fewshot.data.datamodule import load_splits
from fewshot.data.files import md5sum
from fewshot.errors import DataError
from tests.helpers import CIFAR100_SUPERCLASSES, make_cifar100

CONF = Path(__file__).resolve().parents[2] / "conf"
ALL_CLASSES = {n for names in CIFAR100_SUPERCLASSES.values() for n in names}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_cifar100(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(autouse=True)
def generated_md5(root, monkeypatch):
    """The generated archive stands in for the official one, whose md5 it cannot have, nor its
    600 images per class (it has 2 train + 1 test)."""
    monkeypatch.setattr(cifar, "MD5", md5sum(root / cifar.ARCHIVE))
    monkeypatch.setattr(cifar, "IMAGES_PER_CLASS", 3)


def test_cifarfs_class_lists_are_64_16_20_disjoint_cifar100_classes():
    sizes = {split: len(names) for split, names in cifar.CIFAR_FS.items()}
    assert sizes == {"train": 64, "val": 16, "test": 20}
    assert set().union(*map(set, cifar.CIFAR_FS.values())) == ALL_CLASSES  # 100: disjoint


def test_fc100_superclasses_are_12_4_4_disjoint_and_the_tadam_split():
    supers = cifar.FC100_SUPERCLASSES
    assert {s: len(v) for s, v in supers.items()} == {"train": 12, "val": 4, "test": 4}
    assert set().union(*map(set, supers.values())) == set(CIFAR100_SUPERCLASSES)
    index = {s: sorted(list(CIFAR100_SUPERCLASSES).index(c) for c in v) for s, v in supers.items()}
    assert index == {
        "train": [1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19],
        "val": [8, 11, 13, 16],
        "test": [0, 7, 12, 14],
    }


def test_cifarfs_splits_pool_train_and_test_images_of_each_class(root, tmp_path):
    splits = cifar.load_cifarfs(root, 32, download=False, cache_dir=str(tmp_path))
    assert {s: c.num_classes for s, c in splits.items()} == {"train": 64, "val": 16, "test": 20}
    assert splits["test"].images.shape == (20, 3, 3, 32, 32)  # 2 train + 1 test image each
    assert set(splits["val"].names) == set(cifar.CIFAR_FS["val"])
    # Pixel [0, 0, 0] of every generated image is its CIFAR-100 class index.
    fine = sorted(ALL_CLASSES)
    classes = splits["train"].images[:, :, 0, 0, 0]
    assert torch.equal(
        classes, torch.tensor([fine.index(n) for n in splits["train"].names])[:, None].expand(-1, 3)
    )


def test_fc100_splits_are_whole_superclasses(root, tmp_path):
    splits = cifar.load_fc100(root, 32, download=False, cache_dir=str(tmp_path))
    assert {s: c.num_classes for s, c in splits.items()} == {"train": 60, "val": 20, "test": 20}
    test = {n for s in cifar.FC100_SUPERCLASSES["test"] for n in CIFAR100_SUPERCLASSES[s]}
    assert set(splits["test"].names) == test


def test_both_benchmarks_share_one_cache_that_is_reused(root, tmp_path, monkeypatch):
    cifar.load_cifarfs(root, 16, download=False, cache_dir=str(tmp_path))

    def no_decoding(*args):
        raise AssertionError("decoded although a cache exists")

    monkeypatch.setattr(cifar, "_decode_all", no_decoding)
    splits = cifar.load_fc100(root, 16, download=False, cache_dir=str(tmp_path))
    assert splits["val"].images.shape[-1] == 16
    assert len(list(tmp_path.glob("cifar100_16px_*.pt"))) == 1


def test_an_archive_with_another_md5_is_refused_naming_it(root, tmp_path):
    data = shutil.copytree(root, tmp_path / "data")
    with open(data / cifar.ARCHIVE, "ab") as f:
        f.write(b"extra")
    got = hashlib.md5((data / cifar.ARCHIVE).read_bytes()).hexdigest()
    with pytest.raises(DataError, match=f"cifar-100-python.tar.gz has md5 {got}, expected"):
        cifar.load_cifarfs(data, 32, download=False, cache_dir=str(tmp_path / "c"))


def test_missing_archive_without_download_says_where_to_get_it(tmp_path):
    with pytest.raises(
        DataError, match=r"cifar-100-python.tar.gz \(md5 .*\) from https://www.cs.toronto.edu"
    ):
        cifar.load_fc100(tmp_path, 32, download=False, cache_dir=str(tmp_path / "c"))


def test_download_fetches_the_archive_and_checks_it(root, tmp_path, monkeypatch):
    fetched = []

    def fake_download(url, path, md5):
        fetched.append((url, md5))
        shutil.copy(root / cifar.ARCHIVE, path)

    monkeypatch.setattr(cifar, "download", fake_download)
    splits = cifar.load_cifarfs(tmp_path / "new", 32, download=True, cache_dir=str(tmp_path / "c"))
    assert fetched == [(cifar.URL, cifar.MD5)] and splits["train"].num_classes == 64


def test_an_archive_that_is_an_html_page_is_named(tmp_path, monkeypatch):
    (tmp_path / cifar.ARCHIVE).write_bytes(b"<html>moved</html>")
    monkeypatch.setattr(cifar, "MD5", md5sum(tmp_path / cifar.ARCHIVE))
    with pytest.raises(
        DataError, match=r"cannot read .*cifar-100-python.tar.gz .*damaged or incomplete"
    ):
        cifar.load_cifarfs(tmp_path, 32, download=False, cache_dir=str(tmp_path / "c"))


@pytest.mark.parametrize("name", ["cifarfs", "fc100"])
def test_the_data_config_group_loads_its_benchmark(root, tmp_path, name):
    data = OmegaConf.load(CONF / "data" / f"{name}.yaml")
    data.root, data.cache_dir, data.download = str(root), str(tmp_path), False
    assert (data.image_size, data.channels) == (32, 3)
    splits = load_splits(data)
    assert splits["test"].images.shape[1:] == (3, 3, 32, 32)
