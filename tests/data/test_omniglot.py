"""Omniglot from the real zips: counts, splits, rotations, the cache, both layouts, errors."""

import zipfile

import pytest
import torch

from fewshot.data import omniglot as og
from fewshot.errors import ConfigError, DataError


def test_all_characters_are_decoded_with_20_drawings(omniglot):
    assert omniglot.images.shape == (1623, 20, 1, 28, 28)
    assert omniglot.images.dtype == torch.uint8
    assert sum(n.startswith("images_background/") for n in omniglot.names) == 964
    # strokes are bright on a dark background: most pixels are background
    assert omniglot.images.float().mean() < 64


def test_background_split_keeps_validation_alphabets_out_of_training(omniglot):
    splits = og.omniglot_splits(omniglot, "background")
    sizes = {s: c.num_classes for s, c in splits.items()}
    assert sizes == {"train": 804, "val": 160, "test": 659}
    val_alphabets = {n.split("/")[1] for n in splits["val"].names}
    assert val_alphabets == set(og.VAL_ALPHABETS)
    assert not val_alphabets & {n.split("/")[1] for n in splits["train"].names}
    assert all(n.startswith("images_evaluation/") for n in splits["test"].names)


def test_vinyals_split_has_the_paper_sizes_and_rotations_as_classes(omniglot):
    splits = og.omniglot_splits(omniglot, "vinyals")
    assert {s: c.num_classes for s, c in splits.items()} == {
        "train": 4112,
        "val": 688,
        "test": 1692,
    }
    characters = {s: {n.rsplit("/", 1)[0] for n in c.names} for s, c in splits.items()}
    assert (
        not characters["train"] & characters["val"] and not characters["val"] & characters["test"]
    )
    test = splits["test"]
    upright, turned = test.names.index(test.names[0]), test.names.index(test.names[0][:-3] + "090")
    assert torch.equal(test.images[turned], test.images[upright].rot90(1, dims=(-2, -1)))


def test_unknown_split_names_the_key(omniglot):
    with pytest.raises(ConfigError, match="data.split='paper'"):
        og.omniglot_splits(omniglot, "paper")


def test_cache_is_used_instead_of_decoding_again(omniglot_root, omniglot_cache, monkeypatch):
    def no_decoding(*args):
        raise AssertionError("decoded although a cache exists")

    monkeypatch.setattr(og, "_decode_all", no_decoding)
    og.load_omniglot(omniglot_root, 28, download=False, cache_dir=str(omniglot_cache))


@pytest.fixture
def small_omniglot(tmp_path, omniglot_root):
    """Two alphabets of each official zip, as zips in one folder and extracted in another."""
    zipped, extracted = tmp_path / "zipped", tmp_path / "extracted"
    zipped.mkdir()
    for part in og.PARTS:
        with zipfile.ZipFile(omniglot_root / f"{part}.zip") as src:
            alphabets = sorted({n.split("/")[1] for n in src.namelist() if n.count("/") >= 2})[:2]
            keep = [n for n in src.namelist() if n.split("/")[1:2] and n.split("/")[1] in alphabets]
            with zipfile.ZipFile(zipped / f"{part}.zip", "w") as dst:
                for name in keep:
                    dst.writestr(name, src.read(name))
            src.extractall(extracted, members=keep)
    return zipped, extracted


def test_extracted_folders_decode_like_the_zips(small_omniglot, tmp_path):
    zipped, extracted = small_omniglot
    a = og.load_omniglot(zipped, 20, download=False, cache_dir=str(tmp_path / "c1"))
    b = og.load_omniglot(extracted, 20, download=False, cache_dir=str(tmp_path / "c2"))
    assert a.names == b.names and torch.equal(a.images, b.images)


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def flipped(data: bytes) -> bytes:
    """The same size, a few bytes inverted in the middle (inside the image tensor's bytes)."""
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 4]) + data[middle + 4 :]


@pytest.mark.parametrize(
    "damage, noticed",
    [(truncated, "it cannot be read"), (flipped, "its contents do not match their checksum")],
)
def test_damaged_cache_is_detected_and_rebuilt(small_omniglot, tmp_path, caplog, damage, noticed):
    zipped, _ = small_omniglot
    cache = tmp_path / "cache"
    good = og.load_omniglot(zipped, 20, download=False, cache_dir=str(cache))
    (path,) = cache.glob("omniglot_20px*.pt")
    path.write_bytes(damage(path.read_bytes()))
    again = og.load_omniglot(zipped, 20, download=False, cache_dir=str(cache))
    assert f"rebuilding cache {path}: {noticed}" in caplog.text
    assert torch.equal(good.images, again.images) and good.names == again.names
    caplog.clear()
    og.load_omniglot(zipped, 20, download=False, cache_dir=str(cache))
    assert "rebuilding" not in caplog.text  # the rebuilt cache is sound


def test_read_only_data_folder_gets_its_cache_elsewhere(small_omniglot, tmp_path, monkeypatch):
    zipped, _ = small_omniglot
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    zipped.chmod(0o555)
    try:
        og.load_omniglot(zipped, 20, download=False)
    finally:
        zipped.chmod(0o755)
    assert not list(zipped.glob("*.pt"))
    assert list((tmp_path / "home" / ".cache" / "fewshot").rglob("omniglot_20px*.pt"))


def test_missing_data_without_download_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match=r"data.root=.*images_background.zip.*data.download=true"):
        og.load_omniglot(tmp_path / "nowhere", 28, download=False, cache_dir=str(tmp_path))


@pytest.mark.parametrize("damage", [lambda png: b"not a png", truncated, flipped])
def test_unreadable_or_truncated_image_is_named(small_omniglot, tmp_path, damage):
    _, extracted = small_omniglot
    victim = sorted(extracted.rglob("*.png"))[5]
    victim.write_bytes(damage(victim.read_bytes()))
    with pytest.raises(DataError, match=f"cannot read Omniglot image .*{victim.name}"):
        og.load_omniglot(extracted, 20, download=False, cache_dir=str(tmp_path / "c"))


def test_truncated_archive_is_named_with_what_to_do(small_omniglot, tmp_path):
    zipped, _ = small_omniglot
    archive = zipped / "images_evaluation.zip"
    archive.write_bytes(truncated(archive.read_bytes()))
    with pytest.raises(DataError, match=f"{archive}.*damaged or incomplete.*data.download=true"):
        og.load_omniglot(zipped, 20, download=False, cache_dir=str(tmp_path / "c"))
