"""tieredImageNet (Ren et al., ICLR 2018): 608 ImageNet classes of 34 categories, split by
category into 351/97/160 classes (20/6/8 categories), 84 px; read from its common release
(`{split}_images_png.pkl`, `{split}_labels.pkl`) and decoded once into a chunked cache."""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable
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
TITLES = {"tieredimagenet": "tieredImageNet"}
decode_image = rgb_image
CACHE = split_cache("tieredimagenet")
LABEL_KEYS = ("label_specific", "label_general", "label_specific_str", "label_general_str")
# Ren et al.'s split (data.split=ren): meta-split -> (classes, categories). It is defined by
# categories, so these counts are what defines it; its classes hold unequal numbers of images
# (the paper fixes none per class), so no image count is checked beyond every class having one.
REN = {"train": (351, 20), "val": (97, 6), "test": (160, 8)}
# data.split: `ren` is the paper split and takes nothing but it; `any` takes the classes a
# smaller or other release in the same files holds (not a paper split).
CLASS_SPLITS = ("ren", "any")


def missing_data_message(root: Path) -> str:
    return (
        f"tieredImageNet not found under data.root={root}. Expected {{train,val,test}}_images_png.pkl "
        "(PNG-encoded images) and {train,val,test}_labels.pkl (keys label_specific, "
        "label_general, label_specific_str, label_general_str), the release of "
        "github.com/renmengye/few-shot-ssl-public; its images are ImageNet's and are not "
        "downloaded automatically."
    )


def _files(root: Path) -> dict[str, tuple[Path, Path]]:
    files = {s: (root / f"{s}_images_png.pkl", root / f"{s}_labels.pkl") for s in SPLITS}
    if not all(path.is_file() for pair in files.values() for path in pair):
        raise DataError(missing_data_message(root))
    return files


def _labels(path: Path) -> tuple[np.ndarray, list[str]]:
    """Each image's class id [N] and each class's name, "<category>/<class>" by class id."""
    data = load_pickle(path)
    if not isinstance(data, dict) or not set(LABEL_KEYS) <= data.keys():
        got = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: expected a dict with keys {list(LABEL_KEYS)}, got {got}")
    specific, general = np.asarray(data["label_specific"]), np.asarray(data["label_general"])
    ok = specific.ndim == 1 and specific.dtype.kind in "iu" and general.shape == specific.shape
    if not ok or not specific.size or specific.min() < 0:
        raise DataError(f"{path}: expected label_specific and label_general, one int per image")
    names, categories = list(data["label_specific_str"]), list(data["label_general_str"])
    if specific.max() >= len(names) or general.max() >= len(categories) or general.min() < 0:
        raise DataError(f"{path}: a label has no name in label_specific_str/label_general_str")
    category = {int(c): int(g) for c, g in zip(specific, general)}
    return specific, [f"{categories[category.get(c, 0)]}/{names[c]}" for c in range(len(names))]


def _decode(item: tuple[str, object], image_size: int) -> bytes:
    """(where, PNG bytes: bytes or a uint8 array as cv2.imencode returns) -> [S, S, 3] bytes."""
    where, png = item
    try:
        data = png.tobytes() if isinstance(png, np.ndarray) else bytes(png)
        with Image.open(io.BytesIO(data)) as image:
            return rgb_bytes(image, image_size)
    except IMAGE_ERRORS as err:
        raise DataError(f"cannot decode tieredImageNet image {where}: {image_error(err)}") from err


def _split_classes(
    images: Path, labels: Path, check: Callable[[list[str]], None] | None = None
) -> dict[str, list[tuple[str, object]]]:
    """Class name -> its (where, PNG) items in file order, classes by id; one split in memory.
    `check(class names)` runs before the images are read, which is the long part."""
    specific, names = _labels(labels)
    if check is not None:
        check([names[c] for c in np.unique(specific)])
    # A list of PNG arrays and nothing else: read as bytes, each array keeps its PNG in place.
    pngs = load_pickle(images, encoding="bytes")
    if not isinstance(pngs, list | tuple | np.ndarray) or len(pngs) != len(specific):
        count = len(pngs) if hasattr(pngs, "__len__") else type(pngs).__name__
        raise DataError(
            f"{images}: expected a list of {len(specific)} PNG images (one per label in "
            f"{labels.name}), got {count}"
        )
    classes: dict[str, list[tuple[str, object]]] = {}
    for c in np.unique(specific):
        classes[names[c]] = [
            (f"{i} of {images.name}", pngs[i]) for i in np.flatnonzero(specific == c)
        ]
    return classes


def check_ren(split: str, names: list[str], origin: Path) -> None:
    """Raise DataError unless the classes `names` ("<category>/<class>") of meta-`split`, read
    from `origin`, are as many, in as many categories, as Ren et al.'s split has."""
    classes, categories = REN[split]
    found = len({name.split("/", 1)[0] for name in names})
    if (len(names), found) != (classes, categories):
        raise DataError(
            f"{origin} holds {len(names)} meta-{split} classes in {found} categories, and Ren et "
            f"al.'s split, which data.split=ren is, has {classes} in {categories}: replace it "
            "with a complete copy of the release"
        )


def load_tieredimagenet(
    root: str | os.PathLike,
    image_size: int,
    cache_dir: str | None = None,
    workers: int = 0,
    split: str = "ren",
) -> dict[str, ClassImages]:
    """Meta-train/val/test classes as uint8 images [classes, per_class, 3, S, S].

    The ~780k PNGs are decoded once, a split at a time and in `workers` processes, into a cache
    written in chunks (at most 16.5 GB at 84 px) that later runs memory-map. Its classes hold
    different numbers of images; one tensor per split keeps the first `per_class` (the fewest)
    of each, and says so in the log.

    `split` (data.split): `ren`, Ren et al.'s split, takes only 351/97/160 classes of 20/6/8
    categories (REN), checked before decoding and on a cache. `any` is NOT a paper split: it
    takes whatever classes the release's files hold, and its numbers compare with no
    published one.
    """
    if split not in CLASS_SPLITS:
        raise ConfigError(
            f"data.split={split!r} is not a tieredImageNet split; choose one of {CLASS_SPLITS}"
        )
    root = data_root(root, "{train,val,test}_images_png.pkl and {train,val,test}_labels.pkl")
    files = _files(root)
    sources = source_record(root, [path for pair in files.values() for path in pair])
    cached = cached_or_decoded(
        CACHE,
        root,
        cache_dir,
        image_size,
        sources,
        lambda out: _write(out, files, image_size, workers, split),
        "tieredImageNet",
        root,
    )
    if split == "ren":
        for part in SPLITS:
            check_ren(part, list(cached["names"][part]), files[part][1])
    return class_splits(cached)


def _write(
    out: ChunkedCache,
    files: dict[str, tuple[Path, Path]],
    image_size: int,
    workers: int,
    split: str,
) -> None:
    """Decode every split into `out`, checking its classes against `split` before its images
    are read (the PNGs of one split in memory at a time)."""

    def read(part: str) -> dict[str, list[tuple[str, object]]]:
        check = functools.partial(check_ren, part, origin=files[part][1])
        return _split_classes(*files[part], check if split == "ren" else None)

    write_splits(out, read, functools.partial(_decode, image_size=image_size), image_size, workers)
