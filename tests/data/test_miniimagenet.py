"""Mini-ImageNet from generated JPEGs: both layouts, split sizes, pixels, the cache, errors.

The generated classes are not Ravi & Larochelle's, so they load under data.split=any;
tests/data/test_damaged_data.py has what data.split=ravi refuses."""

import logging
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fewshot.data import miniimagenet as mi
from fewshot.data.datamodule import EpisodeDataModule
from fewshot.data.episodes import FixedEpisodes
from fewshot.data.files import load_cache, raw_path
from fewshot.errors import ConfigError, DataError
from tests.helpers import make_miniimagenet, mini_arrays, write_mini_layout

CONF = Path(__file__).resolve().parents[2] / "conf"
SIZE = 12  # the generated images are 16x16: loading resizes them


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("miniimagenet")
    return {layout: make_miniimagenet(base / layout, layout) for layout in ("folders", "csv")}


@pytest.fixture
def folders(roots, tmp_path):
    """A private copy of the class-folder layout, for tests that damage it."""
    return shutil.copytree(roots["folders"], tmp_path / "data")


def test_both_layouts_load_to_the_same_tensors(roots, tmp_path):
    a = mi.load_miniimagenet(roots["folders"], SIZE, cache_dir=str(tmp_path / "a"), split="any")
    b = mi.load_miniimagenet(roots["csv"], SIZE, cache_dir=str(tmp_path / "b"), split="any")
    for split in mi.SPLITS:
        assert a[split].names == b[split].names
        assert torch.equal(a[split].images, b[split].images), split


def test_splits_have_their_classes_at_the_configured_size(roots, tmp_path):
    splits = mi.load_miniimagenet(roots["csv"], SIZE, cache_dir=str(tmp_path), split="any")
    shapes = {s: tuple(c.images.shape) for s, c in splits.items()}
    assert shapes == {
        "train": (4, 20, 3, SIZE, SIZE),
        "val": (2, 20, 3, SIZE, SIZE),
        "test": (2, 20, 3, SIZE, SIZE),
    }
    assert splits["train"].images.dtype == torch.uint8
    assert splits["val"].names == ["n00000004", "n00000005"]


def test_pixels_are_rgb_channels_first(roots, tmp_path):
    splits = mi.load_miniimagenet(roots["folders"], SIZE, cache_dir=str(tmp_path), split="any")
    means = splits["train"].images[:3].float().mean(dim=(1, 3, 4))  # [class, channel]
    # Class c is tinted in channel c: the tinted channel is the bright one.
    assert torch.equal(means.argmax(dim=1), torch.arange(3))
    assert means.diagonal().min() > 150 and means.max(dim=1).values.min() > 2 * means.median()


def test_cache_is_reused_instead_of_decoding_again(roots, tmp_path, monkeypatch):
    first = mi.load_miniimagenet(roots["csv"], SIZE, cache_dir=str(tmp_path), split="any")
    assert len(list(tmp_path.glob("miniimagenet_12px_*.pt"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although a cache exists")

    monkeypatch.setattr(mi, "_decode", no_decoding)
    again = mi.load_miniimagenet(roots["csv"], SIZE, cache_dir=str(tmp_path), split="any")
    assert torch.equal(first["test"].images, again["test"].images)


def test_a_changed_image_list_gets_a_new_cache(folders, tmp_path, caplog):
    cache = tmp_path / "cache"
    mi.load_miniimagenet(folders, SIZE, cache_dir=str(cache), split="any")
    for file in sorted((folders / "val" / "n00000005").iterdir())[:3]:
        file.unlink()
    with caplog.at_level(logging.WARNING):
        splits = mi.load_miniimagenet(folders, SIZE, cache_dir=str(cache), split="any")
    assert len(list(cache.glob("*.pt"))) == 2
    # Unequal classes: every class of the split keeps the smallest count, and it is logged.
    assert splits["val"].per_class == 17 and splits["train"].per_class == 20
    assert "meta-val classes hold 17 to 20 images (fewest: n00000005)" in caplog.text


def test_damaged_cache_is_rebuilt(roots, tmp_path):
    good = mi.load_miniimagenet(roots["csv"], SIZE, cache_dir=str(tmp_path), split="any")
    (path,) = tmp_path.glob("*.pt")
    path.write_bytes(path.read_bytes()[:1000])  # truncated, as by a crash mid-write
    again = mi.load_miniimagenet(roots["csv"], SIZE, cache_dir=str(tmp_path), split="any")
    assert torch.equal(good["train"].images, again["train"].images)


def test_read_only_data_folder_gets_its_cache_elsewhere(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folders.chmod(0o555)
    try:
        mi.load_miniimagenet(folders, SIZE, split="any")
    finally:
        folders.chmod(0o755)
    assert not list(folders.glob("*.pt"))
    assert list((tmp_path / "home" / ".cache" / "fewshot").rglob("miniimagenet_12px_*.pt"))


def test_missing_data_says_what_files_are_expected_and_where_to_get_them(tmp_path):
    for root in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(DataError, match=r"data.root=.*train.csv.*train/<wnid>.*image-net.org"):
            mi.load_miniimagenet(root, SIZE, cache_dir=str(tmp_path / "c"), split="any")


def test_unreadable_image_is_named(folders, tmp_path):
    victim = sorted((folders / "test" / "n00000006").iterdir())[4]
    victim.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=f"cannot read Mini-ImageNet image .*{victim.name}"):
        mi.load_miniimagenet(folders, SIZE, cache_dir=str(tmp_path / "c"), split="any")


def test_file_listed_in_a_split_csv_but_missing_is_named(roots, tmp_path):
    root = shutil.copytree(roots["csv"], tmp_path / "data")
    (root / "images" / "n0000000300000007.jpg").unlink()
    with pytest.raises(DataError, match=r"n0000000300000007.jpg is listed in train.csv \(line"):
        mi.load_miniimagenet(root, SIZE, cache_dir=str(tmp_path / "c"), split="any")


def test_empty_class_folder_is_named(folders, tmp_path):
    (folders / "train" / "n00000099").mkdir()
    with pytest.raises(DataError, match="n00000099 holds no"):
        mi.load_miniimagenet(folders, SIZE, cache_dir=str(tmp_path / "c"), split="any")


def test_class_in_two_splits_is_refused(folders, tmp_path):
    shutil.copytree(folders / "train" / "n00000000", folders / "test" / "n00000000")
    with pytest.raises(DataError, match=r"\['n00000000'\] are in both meta-train and meta-test"):
        mi.load_miniimagenet(folders, SIZE, cache_dir=str(tmp_path / "c"), split="any")


def test_a_class_with_fewer_images_than_shot_plus_query_stops_the_run(folders, tmp_path):
    for file in sorted((folders / "val" / "n00000004").iterdir())[5:]:
        file.unlink()
    data = OmegaConf.load(CONF / "data" / "miniimagenet.yaml")
    data.root, data.image_size, data.cache_dir = str(folders), SIZE, str(tmp_path / "c")
    data.split = "any"
    datamodule = EpisodeDataModule(data, 2, 1, 15, 1, 2, 2, 0)
    with pytest.raises(
        ConfigError,
        match="shot \\+ query = 1 \\+ 15 is out of range: expected at most 5, the images per class of the meta-val",
    ):
        datamodule.setup()


PICKLED = ("cache", "cache-validation", "metaoptnet", "png")  # PNG: lossless, so pixels agree


@pytest.fixture(scope="module")
def pickled_roots(tmp_path_factory):
    """The same 84 px images in every lossless layout."""
    base, arrays = tmp_path_factory.mktemp("pickled"), mini_arrays()
    return {layout: write_mini_layout(base / layout, layout, arrays) for layout in PICKLED}, arrays


@pytest.mark.parametrize("size", [84, SIZE])
def test_every_pickled_layout_gives_the_same_images_and_episodes(pickled_roots, tmp_path, size):
    roots, arrays = pickled_roots
    loaded = {
        layout: mi.load_miniimagenet(root, size, cache_dir=str(tmp_path / layout), split="any")
        for layout, root in roots.items()
    }
    reference = loaded["png"]
    assert reference["train"].images.shape == (4, 5, 3, size, size)
    if size == 84:  # not resized: the pixels are the generated ones
        assert torch.equal(
            reference["val"].images[1],
            torch.from_numpy(arrays["val"]["n00000005"]).permute(0, 3, 1, 2),
        )
    for layout, splits in loaded.items():
        for split in mi.SPLITS:
            assert splits[split].names == reference[split].names, (layout, split)
            assert torch.equal(splits[split].images, reference[split].images), (layout, split)
        a, b = (FixedEpisodes(s["test"], "test", 2, 2, 3, 4, seed=0) for s in (splits, reference))
        assert all(torch.equal(x, y) for i in range(4) for x, y in zip(a[i], b[i]))


def test_a_cache_from_one_source_is_not_reused_for_another(pickled_roots, tmp_path):
    roots, _ = pickled_roots
    root = shutil.copytree(roots["cache"], tmp_path / "data")
    cache = tmp_path / "cache"
    mi.load_miniimagenet(root, SIZE, cache_dir=str(cache), split="any")
    # Another release of the same data.root takes precedence: MetaOptNet's beside the cache files.
    for file in roots["metaoptnet"].iterdir():
        shutil.copy(file, root)
    (root / "mini-imagenet-cache-test.pkl").unlink()
    mi.load_miniimagenet(root, SIZE, cache_dir=str(cache), split="any")
    # And a changed file of the same name is another source too.
    with open(root / "miniImageNet_category_split_val.pickle", "ab") as f:
        f.write(b"\0")  # bytes after STOP: the pickle still reads, but its size differs
    mi.load_miniimagenet(root, SIZE, cache_dir=str(cache), split="any")
    headers = sorted(cache.glob("*.pt"))
    assert len(headers) == 3
    sources = [load_cache(h, mmap=True, verify=False)["sources"] for h in headers]
    assert sum("mini-imagenet-cache-train.pkl" in s for s in sources) == 1
    assert len({tuple(sorted(s.items())) for s in sources}) == 3  # each with its sizes


def test_a_truncated_raw_cache_file_is_rebuilt(pickled_roots, tmp_path):
    roots, _ = pickled_roots
    good = mi.load_miniimagenet(roots["cache"], SIZE, cache_dir=str(tmp_path), split="any")
    (header,) = tmp_path.glob("*.pt")
    raw = raw_path(header)
    raw.write_bytes(raw.read_bytes()[:-100])
    again = mi.load_miniimagenet(roots["cache"], SIZE, cache_dir=str(tmp_path), split="any")
    assert torch.equal(good["val"].images, again["val"].images)
    assert raw.stat().st_size == sum(s.images.numel() for s in again.values())


@pytest.mark.parametrize(
    "content, message",
    [
        (
            b"<html><body>Sign in to continue</body></html>",
            "mini-imagenet-cache-val.pkl is an HTML page",
        ),
        (None, "mini-imagenet-cache-val.pkl is truncated"),
        (
            {"image_data": torch.zeros(2).numpy()},
            r"expected a dict with keys \['image_data', 'class_dict'\]",
        ),
        (
            {"image_data": torch.zeros(2, 84, 84).numpy(), "class_dict": {}},
            r"mini-imagenet-cache-val.pkl: expected 'image_data' to be uint8 images \[N, H, W, 3\]",
        ),
    ],
    ids=["html", "truncated", "keys", "shape"],
)
def test_a_bad_pickle_is_named_in_one_line(pickled_roots, tmp_path, content, message):
    import pickle

    roots, _ = pickled_roots
    root = shutil.copytree(roots["cache"], tmp_path / "data")
    victim = root / "mini-imagenet-cache-val.pkl"
    if content is None:
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        victim.write_bytes(content if isinstance(content, bytes) else pickle.dumps(content))
    with pytest.raises(DataError, match=message) as error:
        mi.load_miniimagenet(root, SIZE, cache_dir=str(tmp_path / "c"), split="any")
    assert "\n" not in str(error.value)
    assert not list((tmp_path / "c").iterdir())  # no partial cache is left


def test_no_layout_names_every_layout_looked_for(tmp_path):
    (tmp_path / "mini-imagenet-cache-train.pkl").write_bytes(b"")  # one of three is not a layout
    with pytest.raises(
        DataError, match=r"mini-imagenet-cache-.*MetaOptNet.*train.csv.*train/<wnid>"
    ):
        mi.load_miniimagenet(tmp_path, SIZE, cache_dir=str(tmp_path / "c"), split="any")
