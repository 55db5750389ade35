"""A damaged dataset is refused (issue 21): a paper split takes its official data and nothing
else, whether decoded now or read from a cache made before; every unreadable file, image, cache
or folder is one line naming its path and the key to fix.

Omniglot's cases start from the real zips (the `release` fixture) with one thing removed or
added; their images decode to blank pixels (`blank_images`), since which characters there are
is what is checked, and decoding all 32,460 again would be most of the time spent here.
"""

import csv
import io
import os
import pickle
import shutil
import struct
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from fewshot.data import cifar
from fewshot.data import miniimagenet as mi
from fewshot.data import omniglot as og
from fewshot.data import tieredimagenet as ti
from fewshot.data.datamodule import load_splits
from fewshot.data.files import md5sum, raw_path
from fewshot.errors import ConfigError, DataError
from fewshot.evaluation.predict import read_image
from tests.helpers import (
    CONF,
    OLD_CHECKPOINTS,
    REPO,
    make_cifar100,
    make_miniimagenet,
    make_tiered,
    run_script,
)

MINI_SPLITS = Path(
    os.environ.get(
        "FEWSHOT_MINIIMAGENET_SPLITS", REPO.parent / "shared" / "data" / "miniimagenet" / "splits"
    )
)
BACKGROUND, EVALUATION = og.PARTS
FIRST_DRAWING = "images_background/Alphabet_of_the_Magi/character01/0709_01.png"


def png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header (IHDR) claims width x height grey pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


BOMB = png_claiming(20000, 20000)
# PIL refuses to decode past twice Image.MAX_IMAGE_PIXELS (below that it only warns).
BOMB_REASON = (
    f"its header claims 400,000,000 pixels (PIL's limit: {2 * Image.MAX_IMAGE_PIXELS:,}), so it "
    "was not decoded: the file is damaged or built to exhaust memory; replace it"
)
NOT_AN_IMAGE = "not an image file PIL can read (unknown format, or damaged)"


# --- Omniglot ---------------------------------------------------------------------------------

Entries = dict[str, dict[str, bytes]]  # part -> zip entry name -> PNG bytes


@pytest.fixture(scope="module")
def release(omniglot_root) -> Entries:
    """The PNGs of the real zips, read once."""
    entries = {}
    for part in og.PARTS:
        with zipfile.ZipFile(omniglot_root / f"{part}.zip") as archive:
            entries[part] = {n: archive.read(n) for n in archive.namelist() if n.endswith(".png")}
    return entries


def write_release(
    root: Path, release: Entries, change: Callable[[str, dict[str, bytes]], None] | None = None
) -> Path:
    """The two zips in `root`, `change(part, entries)` having edited a copy of each's entries."""
    root.mkdir(parents=True, exist_ok=True)
    for part, original in release.items():
        entries = dict(original)
        if change is not None:
            change(part, entries)
        with zipfile.ZipFile(root / f"{part}.zip", "w") as archive:  # stored: quick both ways
            for name, data in entries.items():
                archive.writestr(name, data)
    return root


def without(prefix: str) -> Callable[[str, dict[str, bytes]], None]:
    """A change removing every entry under `prefix` (an alphabet, a character, a drawing)."""

    def change(part: str, entries: dict[str, bytes]) -> None:
        for name in [n for n in entries if n.startswith(prefix)]:
            del entries[name]

    return change


def copied(source: str, target: str) -> Callable[[str, dict[str, bytes]], None]:
    """A change adding, beside every entry under `source`, a copy of it under `target`."""

    def change(part: str, entries: dict[str, bytes]) -> None:
        for name in [n for n in entries if n.startswith(source)]:
            entries[target + name[len(source) :]] = entries[name]

    return change


def replaced(entry: str, data: bytes) -> Callable[[str, dict[str, bytes]], None]:
    def change(part: str, entries: dict[str, bytes]) -> None:
        if entry in entries:
            entries[entry] = data

    return change


def first_alphabets(count: int) -> Callable[[str, dict[str, bytes]], None]:
    """A change keeping the first `count` alphabets of each zip: data smaller than the release."""

    def change(part: str, entries: dict[str, bytes]) -> None:
        keep = sorted({n.split("/")[1] for n in entries})[:count]
        for name in [n for n in entries if n.split("/")[1] not in keep]:
            del entries[name]

    return change


@pytest.fixture
def blank_images(monkeypatch):
    monkeypatch.setattr(
        og, "decode_image", lambda png, size: torch.zeros(1, size, size, dtype=torch.uint8)
    )


def paper_split_refusal(source: Path, what: str, split: str) -> str:
    part = source.name.removesuffix(".zip")
    return (
        f"{source} {what}; data.split={split} is a paper split, defined on the official "
        f"Omniglot release: replace the zip with the official {part}.zip (or delete it and set "
        "data.download=true)"
    )


def test_the_official_table_is_what_the_real_zips_hold(release, omniglot):
    table = {}
    for part, entries in release.items():
        drawings = Counter(name.rsplit("/", 1)[0] for name in entries)
        assert set(drawings.values()) == {og.DRAWINGS}
        table[part] = dict(Counter(character.split("/")[1] for character in drawings))
    assert table == og.RELEASE
    assert [len(og.RELEASE[part]) for part in og.PARTS] == [30, 20]
    assert [sum(og.RELEASE[part].values()) for part in og.PARTS] == [964, 659]
    # The cached names of the session's decode are the release, folder names included.
    assert og.release_differences(omniglot.names) == []


@pytest.mark.parametrize("split", og.OFFICIAL_SPLITS)
def test_a_zip_missing_an_alphabet_is_refused_by_the_paper_splits(
    release, tmp_path, blank_images, split
):
    root = write_release(tmp_path / "data", release, without(f"{BACKGROUND}/Korean/"))
    with pytest.raises(DataError) as error:
        og.omniglot(root, 8, False, str(tmp_path / "cache"), split)
    assert str(error.value) == paper_split_refusal(
        root / f"{BACKGROUND}.zip", "lacks the alphabet Korean (40 characters)", split
    )


@pytest.mark.parametrize(
    "change, part, what",
    [
        (without(f"{EVALUATION}/Tibetan/character07/"), EVALUATION, "lacks Tibetan/character07"),
        (
            copied(f"{BACKGROUND}/Korean/character01/", f"{BACKGROUND}/Korean/character41/"),
            BACKGROUND,
            "holds Korean/character41, beyond the official 40 characters",
        ),
        (
            copied(f"{EVALUATION}/ULOG/", f"{EVALUATION}/ULOG_copy/"),
            EVALUATION,
            "holds the folder ULOG_copy (26 characters), no official alphabet",
        ),
        (
            lambda part, entries: (
                without(f"{BACKGROUND}/Korean/")(part, entries),
                without(f"{EVALUATION}/ULOG/character26/")(part, entries),
            ),
            BACKGROUND,
            "lacks the alphabet Korean (40 characters) (and 1 more difference)",
        ),
    ],
    ids=["missing-character", "extra-character", "extra-folder", "two-differences"],
)
def test_a_missing_or_extra_character_or_folder_is_named(
    release, tmp_path, blank_images, change, part, what
):
    root = write_release(tmp_path / "data", release, change)
    with pytest.raises(DataError) as error:
        og.omniglot(root, 8, False, str(tmp_path / "cache"), "vinyals")
    assert str(error.value) == paper_split_refusal(root / f"{part}.zip", what, "vinyals")


@pytest.mark.parametrize("count", [19, 21])
def test_a_character_of_other_than_20_drawings_is_named_with_its_zip(
    release, tmp_path, blank_images, count
):
    character = f"{EVALUATION}/Tibetan/character07"
    first = min(n for n in release[EVALUATION] if n.startswith(character + "/"))

    def change(part: str, entries: dict[str, bytes]) -> None:
        if part != EVALUATION:
            return
        if count == 19:
            del entries[first]
        else:  # a drawing more, as a stray copy would add it
            entries[first.replace("_01.png", "_21.png")] = entries[first]

    root = write_release(tmp_path / "data", release, change)
    with pytest.raises(DataError) as error:
        og.omniglot(root, 8, False, str(tmp_path / "cache"), "vinyals")
    assert str(error.value) == (
        f"{root / f'{EVALUATION}.zip'} holds {count} drawings of {character}, and every "
        f"Omniglot character has 20: replace the zip with the official {EVALUATION}.zip (or "
        "delete it and set data.download=true)"
    )


def test_a_cache_decoded_from_a_damaged_zip_is_refused_and_replacing_the_zip_is_enough(
    release, tmp_path, blank_images, monkeypatch
):
    root = write_release(tmp_path / "data", release, without(f"{BACKGROUND}/Korean/"))
    cache = str(tmp_path / "cache")
    og.load_omniglot(root, 8, False, cache)  # decoded, as before the check existed, unchecked

    def no_decoding(*args):
        raise AssertionError("decoded again although the cache fits its zips")

    with monkeypatch.context() as patch:
        patch.setattr(og, "_decode_all", no_decoding)
        with pytest.raises(DataError) as error:
            og.omniglot(root, 8, False, cache, "vinyals")
    assert str(error.value) == paper_split_refusal(
        root / f"{BACKGROUND}.zip", "lacks the alphabet Korean (40 characters)", "vinyals"
    )
    # The official zip in its place is decoded anew, not read from the damaged one's cache.
    write_release(root, release)
    splits = og.omniglot(root, 8, False, cache, "vinyals")
    assert {s: c.num_classes for s, c in splits.items()} == {
        "train": 4 * 1028,
        "val": 4 * 172,
        "test": 4 * 423,
    }


def test_a_downloaded_zip_missing_an_alphabet_is_refused_too(
    release, tmp_path, blank_images, monkeypatch
):
    served = write_release(tmp_path / "served", release, without(f"{EVALUATION}/Angelic/"))
    monkeypatch.setattr(
        og, "download", lambda url, path, md5: shutil.copy(served / path.name, path)
    )
    root = tmp_path / "data"
    with pytest.raises(DataError) as error:
        og.omniglot(root, 8, True, str(tmp_path / "cache"), "background")
    assert str(error.value) == paper_split_refusal(
        root / f"{EVALUATION}.zip", "lacks the alphabet Angelic (20 characters)", "background"
    )


def test_an_extracted_folder_missing_alphabets_is_refused_naming_the_folder(
    release, tmp_path, blank_images
):
    def one_background_alphabet(part: str, entries: dict[str, bytes]) -> None:
        if part == BACKGROUND:
            first_alphabets(1)(part, entries)

    zipped = write_release(tmp_path / "zips", release, one_background_alphabet)
    root = tmp_path / "data"
    with zipfile.ZipFile(zipped / f"{BACKGROUND}.zip") as archive:
        archive.extractall(root)
    shutil.copy(zipped / f"{EVALUATION}.zip", root)
    with pytest.raises(DataError) as error:
        og.omniglot(root, 8, False, str(tmp_path / "cache"), "vinyals")
    assert str(error.value) == (
        f"{root / BACKGROUND} lacks the alphabet Anglo-Saxon_Futhorc (29 characters) (and 28 "
        "more differences); data.split=vinyals is a paper split, defined on the official "
        f"Omniglot release: replace the folder with the official {BACKGROUND}.zip (or delete it "
        "and set data.download=true)"
    )


def test_data_smaller_than_the_release_goes_through_the_any_split(release, tmp_path, blank_images):
    root = write_release(tmp_path / "data", release, first_alphabets(2))
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError, match="lacks the alphabet"):
        og.omniglot(root, 8, False, cache, "vinyals")
    splits = og.omniglot(root, 8, False, cache, "any")
    characters = {s: {n.rsplit("/", 1)[0] for n in c.names} for s, c in splits.items()}
    # 20 + 29 characters of background, 20 + 26 of evaluation, cut 1028:172:423 (rounded).
    assert {s: len(c) for s, c in characters.items()} == {"train": 60, "val": 10, "test": 25}
    assert not (characters["train"] & characters["val"] or characters["val"] & characters["test"])
    assert not characters["train"] & characters["test"]
    assert all(c.num_classes == 4 * len(characters[s]) for s, c in splits.items())  # rotations


def test_the_any_split_of_the_complete_release_is_vinyals(omniglot):
    # The release's names over one blank pixel each: splits compare names, not pixels.
    names = og.ClassImages(torch.zeros(len(omniglot.names), 1, 1, 1, 1), list(omniglot.names))
    ours, paper = og.omniglot_splits(names, "any"), og.omniglot_splits(names, "vinyals")
    assert {s: c.names for s, c in ours.items()} == {s: c.names for s, c in paper.items()}


def test_an_unknown_omniglot_split_is_refused_before_reading_any_data(tmp_path):
    with pytest.raises(ConfigError, match=r"data.split='custom' is not an Omniglot split"):
        og.omniglot(tmp_path / "nowhere", 28, False, None, "custom")


# --- Mini-ImageNet -----------------------------------------------------------------------------


def test_the_ravi_table_is_the_split_csvs():
    assert (MINI_SPLITS / "train.csv").is_file(), (
        f"Ravi & Larochelle's split CSVs not found in {MINI_SPLITS}; set "
        "FEWSHOT_MINIIMAGENET_SPLITS to their folder"
    )
    for split in mi.SPLITS:
        with open(MINI_SPLITS / f"{split}.csv", newline="") as f:
            counts = Counter(row["label"] for row in csv.DictReader(f))
        assert sorted(counts) == sorted(mi.RAVI[split]), split
        assert set(counts.values()) == {mi.IMAGES_PER_CLASS}, split
    assert [len(mi.RAVI[s]) for s in mi.SPLITS] == [64, 16, 20]


def ravi_release(root: Path, change: Callable[[str, dict], None] | None = None) -> Path:
    """Ravi & Larochelle's split as mini-imagenet-cache pickles of 1-pixel images, every class
    and every image count of the release; `change(split, class_dict)` edits a split first."""
    root.mkdir(parents=True, exist_ok=True)
    for split, wnids in mi.RAVI.items():
        class_dict = {w: list(range(i * 600, (i + 1) * 600)) for i, w in enumerate(wnids)}
        if change is not None:
            change(split, class_dict)
        images = np.zeros((len(wnids) * 600 + 600, 1, 1, 3), np.uint8)  # room for one class more
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": images, "class_dict": class_dict}, f, protocol=4)
    return root


def in_split(split: str, edit: Callable[[dict], None]) -> Callable[[str, dict], None]:
    return lambda s, class_dict: edit(class_dict) if s == split else None


# damage -> (change, the split it is in, the line when decoding, the line from a cache: a cache
# keeps the fewest images of any class of a split, so it cannot tell which class is short).
RAVI_DAMAGE = {
    "missing-class": (
        in_split("train", lambda d: d.pop("n01532829")),
        "train",
        "lacks the meta-train class n01532829",
        "lacks the meta-train class n01532829",
    ),
    "599-images": (
        in_split("train", lambda d: d["n01558993"].pop()),
        "train",
        "holds 599 images of n01558993",
        "holds 599 images of a meta-train class",
    ),
    "extra-class": (
        in_split("val", lambda d: d.update(n09999999=list(range(9600, 10200)))),
        "val",
        "holds n09999999, not a meta-val class of the split",
        "holds n09999999, not a meta-val class of the split",
    ),
}


def ravi_refusal(origin: Path, what: str) -> str:
    return (
        f"{origin} {what}; data.split=ravi is Ravi & Larochelle's split (64/16/20 classes of 600 "
        "images): replace it with a complete copy of the release"
    )


def test_the_ravi_split_takes_its_64_16_20_classes_of_600(tmp_path):
    splits = mi.load_miniimagenet(ravi_release(tmp_path / "data"), 1, str(tmp_path / "cache"))
    assert {s: tuple(c.images.shape[:2]) for s, c in splits.items()} == {
        "train": (64, 600),
        "val": (16, 600),
        "test": (20, 600),
    }
    assert OmegaConf.load(CONF / "data" / "miniimagenet.yaml").split == "ravi"


@pytest.mark.parametrize("damage", RAVI_DAMAGE, ids=list(RAVI_DAMAGE))
def test_the_ravi_split_refuses_a_missing_or_extra_class_or_image_leaving_no_cache(
    tmp_path, damage
):
    change, split, what, _ = RAVI_DAMAGE[damage]
    root = ravi_release(tmp_path / "data", change)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as error:
        mi.load_miniimagenet(root, 1, str(cache))
    assert str(error.value) == ravi_refusal(root / f"mini-imagenet-cache-{split}.pkl", what)
    assert not list(cache.glob("*.pt"))


@pytest.mark.parametrize("damage", RAVI_DAMAGE, ids=list(RAVI_DAMAGE))
def test_the_ravi_split_refuses_a_cache_decoded_from_damaged_data(tmp_path, monkeypatch, damage):
    change, split, _, what = RAVI_DAMAGE[damage]
    root = ravi_release(tmp_path / "data", change)
    mi.load_miniimagenet(root, 1, str(tmp_path / "cache"), split="any")  # decoded unchecked

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although a cache exists")

    monkeypatch.setattr(mi, "_decode", no_decoding)
    with pytest.raises(DataError) as error:
        mi.load_miniimagenet(root, 1, str(tmp_path / "cache"))
    assert str(error.value) == ravi_refusal(root / f"mini-imagenet-cache-{split}.pkl", what)


@pytest.mark.parametrize("classes", [64, 63])
def test_metaoptnet_pickles_without_class_names_are_counted_by_the_ravi_split(tmp_path, classes):
    root = tmp_path / "data"
    root.mkdir()
    label = 0
    for split, count in zip(mi.SPLITS, (classes, 16, 20)):
        labels = [label + c for c in range(count) for _ in range(600)]
        label += count
        images = np.zeros((len(labels), 1, 1, 3), np.uint8)
        name = "train_phase_train" if split == "train" else split
        with open(root / f"miniImageNet_category_split_{name}.pickle", "wb") as f:
            pickle.dump({"data": images, "labels": labels}, f, protocol=2)
    if classes == 64:
        splits = mi.load_miniimagenet(root, 1, str(tmp_path / "cache"))
        assert [splits[s].num_classes for s in mi.SPLITS] == [64, 16, 20]
        return
    with pytest.raises(DataError) as error:
        mi.load_miniimagenet(root, 1, str(tmp_path / "cache"))
    origin = root / "miniImageNet_category_split_train_phase_train.pickle"
    assert str(error.value) == ravi_refusal(origin, "holds 63 meta-train classes")


def test_generated_mini_imagenet_goes_through_the_any_split_only(tmp_path):
    root = make_miniimagenet(tmp_path / "data", "csv", classes=(2, 1, 1), per_class=3)
    with pytest.raises(DataError) as error:
        mi.load_miniimagenet(root, 8, str(tmp_path / "cache"))
    assert str(error.value) == ravi_refusal(
        root / "train.csv", "lacks the meta-train class n01532829 (and 63 more)"
    )
    splits = mi.load_miniimagenet(root, 8, str(tmp_path / "cache"), split="any")
    assert [splits[s].num_classes for s in mi.SPLITS] == [2, 1, 1]


# --- tieredImageNet ----------------------------------------------------------------------------


def ren_release(root: Path, classes=(351, 97, 160), categories=(20, 6, 8)) -> Path:
    """A release with the split's class and category counts, one 1-pixel PNG per class."""
    root.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    png = np.frombuffer(buffer.getvalue(), np.uint8).reshape(-1, 1)
    for split, count, groups in zip(ti.SPLITS, classes, categories):
        labels = {
            "label_specific": np.arange(count),
            "label_general": np.arange(count) % groups,
            "label_specific_str": [f"n{split}{k:05d}" for k in range(count)],
            "label_general_str": [f"{split}_category{g}" for g in range(groups)],
        }
        with open(root / f"{split}_labels.pkl", "wb") as f:
            pickle.dump(labels, f, protocol=2)
        with open(root / f"{split}_images_png.pkl", "wb") as f:
            pickle.dump([png] * count, f, protocol=2)
    return root


def ren_refusal(origin: Path, split: str, found: tuple[int, int], official: tuple[int, int]):
    return (
        f"{origin} holds {found[0]} meta-{split} classes in {found[1]} categories, and Ren et "
        f"al.'s split, which data.split=ren is, has {official[0]} in {official[1]}: replace it "
        "with a complete copy of the release"
    )


def test_the_ren_split_takes_351_97_160_classes_of_20_6_8_categories(tmp_path):
    splits = ti.load_tieredimagenet(ren_release(tmp_path / "data"), 1, str(tmp_path / "cache"))
    assert [splits[s].num_classes for s in ti.SPLITS] == [351, 97, 160]
    assert OmegaConf.load(CONF / "data" / "tieredimagenet.yaml").split == "ren"


@pytest.mark.parametrize(
    "classes, categories, split, found",
    [
        ((351, 96, 160), (20, 6, 8), "val", (96, 6)),
        ((351, 97, 160), (19, 6, 8), "train", (351, 19)),
    ],
    ids=["a-class-fewer", "a-category-fewer"],
)
def test_the_ren_split_refuses_other_class_or_category_counts_decoded_or_cached(
    tmp_path, monkeypatch, classes, categories, split, found
):
    root = ren_release(tmp_path / "data", classes, categories)
    cache = str(tmp_path / "cache")
    origin = root / f"{split}_labels.pkl"
    official = ti.REN[split]
    with pytest.raises(DataError) as error:
        ti.load_tieredimagenet(root, 1, cache)
    assert str(error.value) == ren_refusal(origin, split, found, official)
    ti.load_tieredimagenet(root, 1, cache, split="any")  # decoded unchecked

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although a cache exists")

    monkeypatch.setattr(ti, "_decode", no_decoding)
    with pytest.raises(DataError) as error:
        ti.load_tieredimagenet(root, 1, cache)
    assert str(error.value) == ren_refusal(origin, split, found, official)


# --- CIFAR-FS / FC100 --------------------------------------------------------------------------


@pytest.mark.parametrize("load", [cifar.load_cifarfs, cifar.load_fc100], ids=["cifarfs", "fc100"])
def test_a_cifar_archive_whose_classes_hold_fewer_than_600_images_is_refused(
    tmp_path, monkeypatch, load
):
    root = make_cifar100(tmp_path / "data", train=2, test=1)
    monkeypatch.setattr(cifar, "MD5", md5sum(root / cifar.ARCHIVE))  # stands in for the official
    with pytest.raises(DataError) as error:
        load(root, 32, download=False, cache_dir=str(tmp_path / "cache"))
    assert str(error.value) == (
        f"{root / cifar.ARCHIVE}: class apple has 3 images, and every CIFAR-100 class has 600; "
        "delete the archive and set data.download=true to fetch it again"
    )


# --- caches, data.root, cache folders ---------------------------------------------------------


def test_an_omniglot_cache_of_another_image_size_is_rebuilt(
    release, tmp_path, blank_images, caplog
):
    root = write_release(tmp_path / "data", release, first_alphabets(1))
    cache = tmp_path / "cache"
    og.load_omniglot(root, 8, False, str(cache))
    (built,) = cache.glob("omniglot_8px_*.pt")
    misplaced = built.with_name(built.name.replace("_8px_", "_10px_"))
    built.rename(misplaced)  # as a copy or a rename by hand would put it
    data = og.load_omniglot(root, 10, False, str(cache))
    assert data.images.shape[-2:] == (10, 10)
    assert f"rebuilding cache {misplaced}: it holds 8x8 px images, and data.image_size=10" in (
        caplog.text
    )


def test_a_mini_imagenet_cache_of_another_image_size_is_rebuilt(tmp_path, caplog):
    root = make_miniimagenet(tmp_path / "data", "folders", classes=(2, 1, 1), per_class=3)
    cache = tmp_path / "cache"
    mi.load_miniimagenet(root, 8, str(cache), split="any")
    (built,) = cache.glob("miniimagenet_8px_*.pt")
    misplaced = built.with_name(built.name.replace("_8px_", "_12px_"))
    built.rename(misplaced)
    raw_path(built).rename(raw_path(misplaced))
    splits = mi.load_miniimagenet(root, 12, str(cache), split="any")
    assert splits["train"].images.shape[-2:] == (12, 12)
    assert f"rebuilding cache {misplaced}: it holds 8x8 px images, and data.image_size=12" in (
        caplog.text
    )


HOLDS = {
    "omniglot": "images_background.zip and images_evaluation.zip (or the folders they extract to)",
    "miniimagenet": "a Mini-ImageNet release (see the README's table of layouts)",
    "tieredimagenet": "{train,val,test}_images_png.pkl and {train,val,test}_labels.pkl",
    "cifarfs": "cifar-100-python.tar.gz",
    "fc100": "cifar-100-python.tar.gz",
}


@pytest.mark.parametrize("dataset", HOLDS)
def test_a_file_as_data_root_is_one_line_naming_it(tmp_path, dataset):
    data = OmegaConf.load(CONF / "data" / f"{dataset}.yaml")
    data.root, data.cache_dir = str(tmp_path / "a-file"), str(tmp_path / "cache")
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(DataError) as error:
        load_splits(data)
    assert str(error.value) == (
        f"data.root={tmp_path / 'a-file'} is a file, not a folder: set data.root to the folder "
        f"that holds {HOLDS[dataset]}"
    )


def small_data(dataset: str, root: Path, release: Entries) -> None:
    """Generated data of `dataset` in `root`, small and quick."""
    if dataset == "omniglot":
        write_release(root, release, first_alphabets(1))
    elif dataset == "miniimagenet":
        make_miniimagenet(root, "csv", classes=(2, 1, 1), per_class=3)
    elif dataset == "tieredimagenet":
        make_tiered(root, size=8)
    else:
        make_cifar100(root)


@pytest.fixture
def unwritable(tmp_path) -> tuple[Path, str]:
    """A cache folder nothing can be created in, even by root: one under a regular file."""
    (tmp_path / "a-file").write_text("not a folder")
    return tmp_path / "a-file" / "cache", f"{tmp_path / 'a-file'} is a file, not a folder"


@pytest.mark.parametrize("dataset", HOLDS)
def test_an_unwritable_cache_folder_is_one_line_naming_it_before_decoding(
    release, tmp_path, monkeypatch, unwritable, dataset
):
    root = tmp_path / "data"
    small_data(dataset, root, release)
    if dataset in ("cifarfs", "fc100"):
        monkeypatch.setattr(cifar, "MD5", md5sum(root / cifar.ARCHIVE))
    for module, decoder in (
        (og, "_decode_all"),
        (mi, "_decode"),
        (ti, "_decode"),
        (cifar, "_decode_all"),
    ):
        monkeypatch.setattr(module, decoder, lambda *a, **k: pytest.fail("decoded first"))
    cache, reason = unwritable
    data = OmegaConf.load(CONF / "data" / f"{dataset}.yaml")
    data.root, data.cache_dir, data.image_size = str(root), str(cache), 8
    with pytest.raises(DataError) as error:
        load_splits(data)
    (line,) = str(error.value).splitlines()
    assert line.startswith(f"cannot write the decoded-data cache {cache}/")
    assert line.endswith(f": {reason}; set data.cache_dir to a folder you can write")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_cache_folder_that_refuses_new_files_is_named(release, tmp_path, blank_images):
    root = write_release(tmp_path / "data", release, first_alphabets(1))
    # /proc/self takes no new file from anyone, root included (chmod would not stop root).
    with pytest.raises(DataError) as error:
        og.load_omniglot(root, 8, False, "/proc/self/fewshot-cache")
    assert str(error.value).startswith(
        "cannot write the decoded-data cache /proc/self/fewshot-cache/"
    )
    assert str(error.value).endswith("; set data.cache_dir to a folder you can write")
    assert "no file can be created in /proc/self" in str(error.value)


def test_train_py_reports_a_file_as_data_root_and_an_unwritable_cache_in_one_line(
    omniglot_root, tmp_path
):
    (tmp_path / "a-file").write_text("not a folder")
    runs = {
        f"data.root={tmp_path / 'a-file'}": f"error: data.root={tmp_path / 'a-file'} is a file",
        f"data.cache_dir={tmp_path / 'a-file' / 'cache'}": (
            f"error: cannot write the decoded-data cache {tmp_path / 'a-file' / 'cache'}/"
        ),
    }
    for override, start in runs.items():
        proc = run_script(
            "train.py",
            f"data.root={omniglot_root}",
            override,
            f"hydra.run.dir={tmp_path / override.split('=')[0]}",
            expect_ok=False,
        )
        assert proc.returncode == 2
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith(start) and ("data.root" in line or "data.cache_dir" in line)


# --- unreadable images: named by their file, never by a buffer's repr -------------------------


@pytest.mark.parametrize(
    "data, reason", [(b"not a png", NOT_AN_IMAGE), (BOMB, BOMB_REASON)], ids=["not-a-png", "bomb"]
)
def test_an_unreadable_omniglot_image_is_named_by_its_zip_entry(release, tmp_path, data, reason):
    root = write_release(tmp_path / "data", release, replaced(FIRST_DRAWING, data))
    with pytest.raises(DataError) as error:
        og.load_omniglot(root, 8, False, str(tmp_path / "cache"))
    assert str(error.value) == (
        f"cannot read Omniglot image {FIRST_DRAWING} in {root / f'{BACKGROUND}.zip'}: {reason}; "
        f"replace the zip with the official {BACKGROUND}.zip (or delete it and set "
        "data.download=true)"
    )


@pytest.mark.parametrize(
    "data, reason", [(b"not a png", NOT_AN_IMAGE), (BOMB, BOMB_REASON)], ids=["not-a-png", "bomb"]
)
def test_an_unreadable_tiered_image_is_named_by_its_place_in_the_pickle(tmp_path, data, reason):
    root = make_tiered(tmp_path / "data", size=8)
    pngs = [np.frombuffer(data, np.uint8).reshape(-1, 1)] * 9
    with open(root / "test_images_png.pkl", "wb") as f:
        pickle.dump(pngs, f, protocol=2)
    with pytest.raises(DataError) as error:
        ti.load_tieredimagenet(root, 8, str(tmp_path / "cache"), split="any")
    assert str(error.value) == (
        f"cannot decode tieredImageNet image 0 of test_images_png.pkl: {reason}"
    )


def test_a_mini_imagenet_image_whose_header_claims_a_huge_size_is_named(tmp_path):
    root = make_miniimagenet(tmp_path / "data", "folders", classes=(2, 1, 1), per_class=3)
    victim = sorted((root / "val").rglob("*.jpg"))[0]
    victim.write_bytes(BOMB)
    with pytest.raises(DataError) as error:
        mi.load_miniimagenet(root, 8, str(tmp_path / "cache"), split="any")
    assert str(error.value) == f"cannot read Mini-ImageNet image {victim}: {BOMB_REASON}"


@pytest.mark.parametrize("dataset", ["omniglot", "miniimagenet"])
@pytest.mark.parametrize(
    "data, reason", [(b"not a png", NOT_AN_IMAGE), (BOMB, BOMB_REASON)], ids=["not-a-png", "bomb"]
)
def test_predict_names_an_unreadable_image_in_one_line(tmp_path, dataset, data, reason):
    assert len(BOMB) < 100  # a few dozen bytes claiming 20000 x 20000 pixels
    path = tmp_path / "mine.png"
    path.write_bytes(data)
    with pytest.raises(DataError) as error:
        read_image(path, dataset, 28)
    assert str(error.value) == f"cannot read image {path}: {reason}"


def test_predict_py_reports_an_image_claiming_a_huge_size_in_one_line(tmp_path):
    support, query = tmp_path / "support", tmp_path / "query"
    for c in range(5):
        (support / f"class{c}").mkdir(parents=True)
        Image.new("L", (28, 28), 255 - 40 * c).save(support / f"class{c}" / "a.png")
    query.mkdir()
    (query / "huge.png").write_bytes(BOMB)
    proc = run_script(
        "predict.py",
        f"ckpt={OLD_CHECKPOINTS / 'maml.ckpt'}",
        f"support={support}",
        f"query={query}",
        expect_ok=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot read image {query / 'huge.png'}: {BOMB_REASON}"
    ]
