"""Mini-ImageNet (Vinyals et al. 2016) in Ravi & Larochelle's split, from whichever common
release `data.root` holds, decoded once into a cache that later runs memory-map.

The releases read: the `mini-imagenet-cache-{train,val,test}.pkl` pickles (learn2learn's copy
names the middle one `validation`), MetaOptNet's `miniImageNet_category_split_*.pickle` (Lee et
al. 2019, from Gidaris & Komodakis 2018), `images/*.jpg` with Ravi & Larochelle's split CSVs,
and class folders `{train,val,test}/<wnid>/*.jpg`.
"""

from __future__ import annotations

import csv
import functools
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fewshot.data.cache import SPLITS, cached_or_decoded, class_splits, split_cache, write_splits
from fewshot.data.decoding import IMAGE_ERRORS, image_error, rgb_bytes, rgb_image
from fewshot.data.episodes import ClassImages
from fewshot.data.files import ChunkedCache, data_root, source_record
from fewshot.data.pickles import load_pickle
from fewshot.errors import ConfigError, DataError

# For fewshot.data.registry: data.name -> its title, and a user's image file read as these.
TITLES = {"miniimagenet": "Mini-ImageNet"}
decode_image = rgb_image
CACHE = split_cache("miniimagenet")
EXTENSIONS = (".jpg", ".jpeg", ".png")
# Ravi & Larochelle's split (data.split=ravi): the ImageNet classes (wnids) of each meta-split,
# 600 images each, as their train/val/test.csv list them (github.com/twitter-research/
# meta-learning-lstm, data/miniImagenet); tests/data/test_damaged_data.py checks those CSVs
# against it. Every release read here names its classes by these wnids.
RAVI = {
    "train": (
        "n01532829", "n01558993", "n01704323", "n01749939", "n01770081", "n01843383",
        "n01910747", "n02074367", "n02089867", "n02091831", "n02101006", "n02105505",
        "n02108089", "n02108551", "n02108915", "n02111277", "n02113712", "n02120079",
        "n02165456", "n02457408", "n02606052", "n02687172", "n02747177", "n02795169",
        "n02823428", "n02966193", "n03017168", "n03047690", "n03062245", "n03207743",
        "n03220513", "n03337140", "n03347037", "n03400231", "n03476684", "n03527444",
        "n03676483", "n03838899", "n03854065", "n03888605", "n03908618", "n03924679",
        "n03998194", "n04067472", "n04243546", "n04251144", "n04258138", "n04275548",
        "n04296562", "n04389033", "n04435653", "n04443257", "n04509417", "n04515003",
        "n04596742", "n04604644", "n04612504", "n06794110", "n07584110", "n07697537",
        "n07747607", "n09246464", "n13054560", "n13133613",
    ),
    "val": (
        "n01855672", "n02091244", "n02114548", "n02138441", "n02174001", "n02950826",
        "n02971356", "n02981792", "n03075370", "n03417042", "n03535780", "n03584254",
        "n03770439", "n03773504", "n03980874", "n09256479",
    ),
    "test": (
        "n01930112", "n01981276", "n02099601", "n02110063", "n02110341", "n02116738",
        "n02129165", "n02219486", "n02443484", "n02871525", "n03127925", "n03146219",
        "n03272010", "n03544143", "n03775546", "n04146614", "n04149813", "n04418357",
        "n04522168", "n07613480",
    ),
}  # fmt: skip
IMAGES_PER_CLASS = 600
# data.split: `ravi` is the paper split and takes nothing but it; `any` takes the classes a
# smaller or other set in the same layouts divides into train/val/test (not a paper split).
CLASS_SPLITS = ("ravi", "any")
# MetaOptNet's pickles without `catname2label` name their classes by label only.
_UNNAMED = re.compile(r"^class\d{3}$")
# split -> the names its pickle has in each pickled release (the first present is read)
PICKLES = {
    "mini-imagenet-cache pickles": {
        "train": ("mini-imagenet-cache-train.pkl",),
        "val": ("mini-imagenet-cache-val.pkl", "mini-imagenet-cache-validation.pkl"),
        "test": ("mini-imagenet-cache-test.pkl",),
    },
    "MetaOptNet pickles": {
        # train_phase_train holds all 600 images of each meta-train class; train_phase_val
        # and train_phase_test hold other ImageNet images of those classes, not used here.
        "train": ("miniImageNet_category_split_train_phase_train.pickle",),
        "val": ("miniImageNet_category_split_val.pickle",),
        "test": ("miniImageNet_category_split_test.pickle",),
    },
}

Image_ = Path | np.ndarray  # an image file, or uint8 [H, W, 3] pixels from a pickle
Classes = dict[str, Sequence[Image_]]  # class (wnid) -> its images, in a fixed order
Listing = dict[str, dict[str, list[Path]]]  # split -> class (wnid) -> image files, sorted


def missing_data_message(root: Path) -> str:
    return (
        f"Mini-ImageNet not found under data.root={root}. Looked for: the pickles "
        "mini-imagenet-cache-{train,val,test}.pkl (or -validation.pkl); MetaOptNet's "
        "miniImageNet_category_split_{train_phase_train,val,test}.pickle; images/*.jpg with "
        "train.csv, val.csv and test.csv (Ravi & Larochelle's split, columns filename,label); "
        "class folders train/<wnid>/*.jpg, val/<wnid>/*.jpg and test/<wnid>/*.jpg. The "
        "images are ImageNet's and cannot be downloaded automatically: get them from "
        "image-net.org (or a Mini-ImageNet copy you are licensed to use) and put them there; "
        "the split files are those of github.com/twitter-research/meta-learning-lstm."
    )


def _read_split_csv(root: Path, split: str) -> dict[str, list[Path]]:
    path = root / f"{split}.csv"
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise DataError(f"{path}: expected a first line 'filename,label', got {rows[:1]}")
    classes: dict[str, list[Path]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2:
            raise DataError(f"{path}, line {line}: expected 'filename,label', got {row}")
        file = root / "images" / row[0].strip()
        if not file.is_file():
            raise DataError(f"{file} is listed in {path.name} (line {line}) but missing")
        classes.setdefault(row[1].strip(), []).append(file)
    return classes


def _read_split_folder(root: Path, split: str) -> dict[str, list[Path]]:
    classes = {}
    for folder in sorted(p for p in (root / split).iterdir() if p.is_dir()):
        classes[folder.name] = [p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS]
        if not classes[folder.name]:
            raise DataError(f"class folder {folder} holds no {'/'.join(EXTENSIONS)} images")
    return classes


def find_images(root: Path) -> Listing | None:
    """The image files of every class of every split, if `root` holds a JPEG layout."""
    if (root / "images").is_dir() and all((root / f"{s}.csv").is_file() for s in SPLITS):
        read = _read_split_csv
    elif all((root / s).is_dir() for s in SPLITS):
        read = _read_split_folder
    else:
        return None
    listing = {}
    for split in SPLITS:
        classes = read(root, split)
        listing[split] = {
            name: sorted(classes[name], key=lambda p: p.name) for name in sorted(classes)
        }
    return listing


def _expect(data: object, path: Path, keys: tuple[str, ...]) -> dict:
    if not isinstance(data, dict) or not set(keys) <= data.keys():
        got = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: expected a dict with keys {list(keys)}, got {got}")
    return data


def _images(data: dict, key: str, path: Path) -> np.ndarray:
    """data[key] checked to be uint8 images [N, H, W, 3]."""
    images = data[key]
    if not (
        isinstance(images, np.ndarray)
        and images.dtype == np.uint8
        and images.ndim == 4
        and images.shape[3] == 3
    ):
        shape = getattr(images, "shape", None)
        raise DataError(
            f"{path}: expected '{key}' to be uint8 images [N, H, W, 3], got "
            f"{type(images).__name__} {getattr(images, 'dtype', '')} {shape}"
        )
    return images


def _indices(value: object, count: int, what: str, path: Path) -> np.ndarray:
    """`value` as image indices, each in 0..count-1."""
    try:
        index = np.asarray(value)
        ok = index.ndim == 1 and index.dtype.kind in "iu"
    except (TypeError, ValueError):
        ok = False
    if not ok or (index.size and not 0 <= index.min() <= index.max() < count):
        raise DataError(f"{path}: {what} must be a list of image indices 0..{count - 1}")
    return index


def _read_cache_pickle(path: Path) -> Classes:
    """A mini-imagenet-cache pickle: `image_data` [N, 84, 84, 3], `class_dict` wnid -> indices."""
    data = _expect(load_pickle(path), path, ("image_data", "class_dict"))
    images = _images(data, "image_data", path)
    if not isinstance(data["class_dict"], dict):
        raise DataError(f"{path}: expected 'class_dict' to map class names to image indices")
    return {
        str(name): [images[i] for i in _indices(index, len(images), f"class_dict[{name!r}]", path)]
        for name, index in sorted(data["class_dict"].items())
    }


def _read_metaoptnet_pickle(path: Path) -> Classes:
    """A MetaOptNet pickle: `data` [N, 84, 84, 3], `labels` (a global class id per image) and
    `catname2label` (wnid -> id), which names the classes if present."""
    data = _expect(load_pickle(path), path, ("data", "labels"))
    images = _images(data, "data", path)
    labels = np.asarray(data["labels"])
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: expected 'labels' to hold one integer per image ({len(images)})")
    names = {int(label): str(name) for name, label in data.get("catname2label", {}).items()}
    classes = {
        names.get(int(label), f"class{int(label):03d}"): [
            images[i] for i in np.flatnonzero(labels == label)
        ]
        for label in np.unique(labels)
    }
    return dict(sorted(classes.items()))


@dataclass
class Source:
    """What data.root holds: its layout, the files read (relative path -> size), a reader
    of each split's classes, and where each split is read from (for messages)."""

    layout: str
    files: dict[str, int]
    read: Callable[[str], Classes]
    origin: dict[str, Path]


def find_source(root: Path) -> Source:
    """The first Mini-ImageNet release found in `root`; DataError listing them if none is."""
    readers = {
        "mini-imagenet-cache pickles": _read_cache_pickle,
        "MetaOptNet pickles": _read_metaoptnet_pickle,
    }
    for layout, names in PICKLES.items():
        files = {}
        for split, candidates in names.items():
            found = [root / n for n in candidates if (root / n).is_file()]
            if found:
                files[split] = found[0]
        if len(files) == len(SPLITS):
            read = readers[layout]
            return Source(
                layout,
                source_record(root, list(files.values())),
                lambda split, read=read, files=files: read(files[split]),
                files,
            )
    listing = find_images(root)
    if listing is None:
        raise DataError(missing_data_message(root))
    images = [file for classes in listing.values() for files in classes.values() for file in files]
    if (root / "images").is_dir():
        layout, origin = "images/ + split CSVs", {s: root / f"{s}.csv" for s in SPLITS}
    else:
        layout, origin = "class folders", {s: root / s for s in SPLITS}
    return Source(layout, source_record(root, images), listing.__getitem__, origin)


def _decode_image(image: Image_, image_size: int) -> bytes:
    """An image file or uint8 [H, W, 3] pixels -> [S, S, 3] bytes."""
    if isinstance(image, np.ndarray):
        return rgb_bytes(Image.fromarray(image), image_size)
    try:
        with Image.open(image) as opened:
            return rgb_bytes(opened, image_size)
    except IMAGE_ERRORS as err:
        raise DataError(f"cannot read Mini-ImageNet image {image}: {image_error(err)}") from err


def check_ravi(split: str, counts: dict[str, int], origin: Path, exact: bool = True) -> None:
    """Raise DataError naming the first class that is missing, extra or not of 600 images,
    unless `counts` (class -> images) are meta-`split` of Ravi & Larochelle's split, read from
    `origin`. `exact=False`: the counts are the fewest any class has (a cache keeps no more),
    so only a shortfall can be seen."""
    official = RAVI[split]
    problem = None
    if all(_UNNAMED.match(name) for name in counts):  # unnamed: only the count can be checked
        if len(counts) != len(official):
            problem = f"holds {len(counts)} meta-{split} classes"
    elif missing := sorted(set(official) - counts.keys()):
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        problem = f"lacks the meta-{split} class {missing[0]}{more}"
    elif extra := sorted(counts.keys() - set(official)):
        problem = f"holds {extra[0]}, not a meta-{split} class of the split"
    if problem is None:
        name, fewest = min(counts.items(), key=lambda item: (item[1], item[0]))
        most = max(counts.values())
        if fewest < IMAGES_PER_CLASS:
            which = name if exact else f"a meta-{split} class"
            problem = f"holds {fewest} images of {which}"
        elif exact and most > IMAGES_PER_CLASS:
            which = next(n for n in sorted(counts) if counts[n] == most)
            problem = f"holds {most} images of {which}"
    if problem is not None:
        sizes = "/".join(str(len(RAVI[s])) for s in SPLITS)
        raise DataError(
            f"{origin} {problem}; data.split=ravi is Ravi & Larochelle's split ({sizes} classes "
            f"of {IMAGES_PER_CLASS} images): replace it with a complete copy of the release"
        )


def load_miniimagenet(
    root: str | os.PathLike,
    image_size: int,
    cache_dir: str | None = None,
    workers: int = 0,
    split: str = "ravi",
) -> dict[str, ClassImages]:
    """Meta-train/val/test classes as uint8 images [classes, per_class, 3, S, S].

    Decoded once (resized to `image_size`, in `workers` processes) into a cache file that
    later runs memory-map, so a run starts in seconds and no episode decodes an image. The
    cache is named by, and records, the source files and their sizes: another source of the
    same data.root gets a cache of its own.

    `split` (data.split): `ravi`, Ravi & Larochelle's split, takes exactly its 64/16/20
    classes of 600 images (RAVI), whether decoded now or read from a cache. `any` is NOT a
    paper split: it takes whatever classes the files of data.root divide into train, val and
    test (a smaller set in the same layout, say), and its numbers compare with no published one.
    """
    if split not in CLASS_SPLITS:
        raise ConfigError(
            f"data.split={split!r} is not a Mini-ImageNet split; choose one of {CLASS_SPLITS}"
        )
    root = data_root(root, "a Mini-ImageNet release (see the README's table of layouts)")
    if not root.is_dir():
        raise DataError(missing_data_message(root))
    source = find_source(root)
    cached = cached_or_decoded(
        CACHE,
        root,
        cache_dir,
        image_size,
        source.files,
        lambda out: _decode(source, root, out, image_size, workers, split),
        f"Mini-ImageNet ({source.layout})",
        root,
    )
    if split == "ravi":
        for s in SPLITS:
            counts = dict.fromkeys(cached["names"][s], cached[s].shape[1])
            check_ravi(s, counts, source.origin[s], exact=False)
    return class_splits(cached)


def _decode(
    source: Source, root: Path, out: ChunkedCache, image_size: int, workers: int, split: str
) -> None:
    """Decode every split of `source` into `out`, refusing what `split` does not take before
    decoding it."""
    seen: dict[str, set[str]] = {}

    def read(part: str) -> Classes:
        classes = source.read(part)
        if not classes:
            raise DataError(f"the meta-{part} split under data.root={root} has no classes")
        if split == "ravi":
            counts = {name: len(images) for name, images in classes.items()}
            check_ravi(part, counts, source.origin[part])
        for other, names in seen.items():
            if shared := sorted(names & classes.keys()):
                raise DataError(
                    f"classes {shared[:3]} are in both meta-{other} and meta-{part} under {root}"
                )
        seen[part] = set(classes)
        return classes

    write_splits(
        out, read, functools.partial(_decode_image, image_size=image_size), image_size, workers
    )
