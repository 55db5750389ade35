"""CIFAR-FS and FC100: few-shot splits of CIFAR-100 (Krizhevsky 2009), 32 px, 600 images per
class (its train and test images pooled), both built from the official cifar-100-python.tar.gz.

CIFAR_FS: the 64/16/20 classes of Bertinetto et al., ICLR 2019 ("Meta-learning with differentiable
closed-form solvers"), as in the split files of their R2D2 repository (github.com/bertinetto/r2d2,
data/cifar-fs/splits/bertinetto/{train,val,test}.txt); written from memory and checked against
torchmeta's copy of those files (torchmeta/datasets/assets/cifar100/cifar-fs/*.json).
FC100_SUPERCLASSES: the 12/4/4 superclasses (60/20/20 classes) of Oreshkin et al., NeurIPS 2018
("TADAM"), Section 4 and their code; as indices into coarse_label_names: train 1-6, 9, 10, 15,
17-19; val 8, 11, 13, 16; test 0, 7, 12, 14 (also checked against torchmeta's fc100 assets).
"""

from __future__ import annotations

import logging
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fewshot.data.cache import Cache, cached_or_decoded
from fewshot.data.decoding import rgb_image, rgb_tensor
from fewshot.data.episodes import ClassImages
from fewshot.data.files import data_root, download, make_root, md5sum, source_record
from fewshot.data.pickles import read_pickle
from fewshot.errors import DataError

log = logging.getLogger(__name__)

# For fewshot.data.registry: data.name -> its title, and a user's image file read as these.
TITLES = {"cifarfs": "CIFAR-FS", "fc100": "FC100"}
decode_image = rgb_image
ARCHIVE = "cifar-100-python.tar.gz"
URL = f"https://www.cs.toronto.edu/~kriz/{ARCHIVE}"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
SPLITS = ("train", "val", "test")
# What the archive of that md5 holds, and what both benchmarks' definitions say: 100 classes,
# each of 500 train and 100 test images. Checked on the decoded data and on a cache, so a cache
# cannot hand a split fewer classes or images than its definition.
CLASSES = 100
IMAGES_PER_CLASS = 600

CIFAR_FS = {
    "train": (
        "apple", "aquarium_fish", "bear", "bee", "bottle", "bowl", "boy", "bridge", "bus",
        "can", "castle", "caterpillar", "chair", "clock", "cloud", "cockroach", "couch", "cup",
        "dinosaur", "dolphin", "elephant", "forest", "girl", "hamster", "house", "kangaroo",
        "keyboard", "lawn_mower", "lion", "lizard", "lobster", "mountain", "mouse", "mushroom",
        "oak_tree", "orange", "orchid", "palm_tree", "pear", "pine_tree", "plate", "porcupine",
        "possum", "rabbit", "raccoon", "ray", "road", "seal", "shrew", "skunk", "skyscraper",
        "snake", "spider", "squirrel", "streetcar", "sunflower", "tank", "tiger", "train",
        "trout", "tulip", "turtle", "willow_tree", "wolf",
    ),
    "val": (
        "beaver", "beetle", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish",
        "lamp", "maple_tree", "motorcycle", "otter", "sea", "shark", "television", "tractor",
    ),
    "test": (
        "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck",
        "plain", "poppy", "rocket", "rose", "snail", "sweet_pepper", "table", "telephone",
        "wardrobe", "whale", "woman", "worm",
    ),
}  # fmt: skip
FC100_SUPERCLASSES = {
    "train": (
        "fish", "flowers", "food_containers", "fruit_and_vegetables",
        "household_electrical_devices", "household_furniture", "large_man-made_outdoor_things",
        "large_natural_outdoor_scenes", "reptiles", "trees", "vehicles_1", "vehicles_2",
    ),
    "val": (
        "large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates",
        "small_mammals",
    ),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}  # fmt: skip


def missing_data_message(root: Path) -> str:
    return (
        f"CIFAR-100 not found under data.root={root}. Expected {ARCHIVE} (md5 {MD5}) from "
        f"{URL}; put it there, or set data.download=true to fetch it."
    )


def _archive(root: Path, download_missing: bool) -> Path:
    """The checked archive: an existing one must have the published md5, a missing one is
    fetched if allowed."""
    archive = root / ARCHIVE
    if not archive.is_file():
        if not download_missing:
            raise DataError(missing_data_message(root))
        log.info("downloading %s to %s", URL, archive)
        try:
            download(URL, archive, MD5)
        except OSError as err:
            raise DataError(f"{missing_data_message(root)} Download failed: {err}") from err
    elif (got := md5sum(archive)) != MD5:
        raise DataError(
            f"{archive} has md5 {got}, expected {MD5}: it is damaged, incomplete or another "
            "file; delete it and set data.download=true to fetch it again"
        )
    return archive


def _members(archive: Path) -> dict[str, dict]:
    """The `train`, `test` and `meta` pickles of the archive, each checked for its keys."""
    keys = {
        "train": ("data", "fine_labels", "coarse_labels"),
        "test": ("data", "fine_labels", "coarse_labels"),
        "meta": ("fine_label_names", "coarse_label_names"),
    }
    found = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member, needed in keys.items():
                name = f"cifar-100-python/{member}"
                try:
                    file = tar.extractfile(name)
                except KeyError:
                    file = None
                if file is None:
                    raise DataError(f"{archive} holds no {name}: it is not CIFAR-100's archive")
                data = read_pickle(file, f"{archive}:{name}")
                if not isinstance(data, dict) or not set(needed) <= data.keys():
                    raise DataError(f"{archive}:{name}: expected a dict with keys {list(needed)}")
                found[member] = data
    except (tarfile.TarError, zlib.error, EOFError) as err:
        raise DataError(f"cannot read {archive} ({err}): it is damaged or incomplete") from err
    return found


def _resized(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [3, 32, 32] -> [3, S, S], resized as every dataset here is (decoding.rgb_bytes)."""
    return rgb_tensor(Image.fromarray(image.permute(1, 2, 0).numpy()), image_size)


def _decode_all(archive: Path, image_size: int) -> dict:
    """All 100 classes: images uint8 [100, 600, 3, S, S], fine names, superclass of each."""
    parts = _members(archive)
    fine_names = list(parts["meta"]["fine_label_names"])
    coarse_names = list(parts["meta"]["coarse_label_names"])
    pixels, fine, coarse = [], [], []
    for part in ("train", "test"):
        data = parts[part]["data"]
        count = len(parts[part]["fine_labels"])
        if not (
            isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape == (count, 3072)
        ):
            raise DataError(
                f"{archive}:cifar-100-python/{part}: expected 'data' uint8 [{count}, 3072], got "
                f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}"
            )
        pixels.append(data.reshape(count, 3, 32, 32))
        fine.append(np.asarray(parts[part]["fine_labels"]))
        coarse.append(np.asarray(parts[part]["coarse_labels"]))
    pixels, fine, coarse = np.concatenate(pixels), np.concatenate(fine), np.concatenate(coarse)
    if len(fine_names) != CLASSES:
        raise DataError(f"{archive} names {len(fine_names)} classes, and CIFAR-100 has {CLASSES}")
    order, superclasses = [], []
    per_class = IMAGES_PER_CLASS
    for c, name in enumerate(fine_names):
        index = np.flatnonzero(fine == c)  # its train images first, then its test images
        if len(index) != per_class:
            raise DataError(
                f"{archive}: class {name} has {len(index)} images, and every CIFAR-100 class "
                f"has {per_class}; delete the archive and set data.download=true to fetch it again"
            )
        order.append(index)
        superclasses.append(coarse_names[int(coarse[index[0]])])
    images = torch.from_numpy(pixels[np.concatenate(order)])  # [100 * 600, 3, 32, 32]
    if image_size != 32:
        images = torch.stack([_resized(image, image_size) for image in images])
    images = images.reshape(len(fine_names), per_class, 3, image_size, image_size)
    return {"images": images.contiguous(), "names": fine_names, "superclasses": superclasses}


def _misfit(data: dict) -> str | None:
    """Why the classes of a cache read back do not fit CIFAR-100's, or None."""
    shape = tuple(data["images"].shape[:2])
    if shape != (CLASSES, IMAGES_PER_CLASS):
        return (
            f"it holds {shape[0]} classes of {shape[1]} images, not {CLASSES} of {IMAGES_PER_CLASS}"
        )
    if any(len(data.get(key, ())) != CLASSES for key in ("names", "superclasses")):
        return "its class names do not match its images"
    return None


# Both benchmarks' one cache: all of CIFAR-100 (see `_decode_all`), written whole and mapped.
CACHE = Cache(
    "cifar100",
    ("images",),
    3,
    _misfit,
    mmap=True,
    changed="another archive than data.root holds now",
)


def _cifar100(
    root: str | os.PathLike, image_size: int, download: bool, cache_dir: str | None
) -> dict:
    """The decoded CIFAR-100 (see `_decode_all`), from its cache when the archive is unchanged:
    a fetched archive is checked as it arrives, one already there (its md5) before decoding."""
    root = data_root(root, ARCHIVE)
    archive = root / ARCHIVE
    fetched = not archive.is_file()
    if fetched:
        if not download:
            raise DataError(missing_data_message(root))
        make_root(root)
        _archive(root, download)
    return cached_or_decoded(
        CACHE,
        root,
        cache_dir,
        image_size,
        source_record(root, [archive]),
        lambda: _decode_all(archive, image_size),
        "CIFAR-100",
        archive,
        check=None if fetched else lambda: _archive(root, download),
    )


def _select(data: dict, keep: dict[str, tuple[str, ...]], what: str) -> dict[str, ClassImages]:
    """The classes each split keeps (by name, in CIFAR-100's order)."""
    names = list(data["names"])
    splits = {}
    for split in SPLITS:
        index = [i for i, n in enumerate(names) if n in keep[split]]
        if len(index) != len(keep[split]):
            missing = sorted(set(keep[split]) - set(names))
            raise DataError(f"{what}: CIFAR-100's class names lack {missing[:3]}")
        splits[split] = ClassImages(data["images"][index], [names[i] for i in index])
    return splits


def load_cifarfs(
    root: str | os.PathLike, image_size: int, download: bool, cache_dir: str | None = None
) -> dict[str, ClassImages]:
    """CIFAR-FS meta-train/val/test: 64/16/20 classes, uint8 [classes, 600, 3, S, S]."""
    return _select(_cifar100(root, image_size, download, cache_dir), CIFAR_FS, "CIFAR-FS")


def load_fc100(
    root: str | os.PathLike, image_size: int, download: bool, cache_dir: str | None = None
) -> dict[str, ClassImages]:
    """FC100 meta-train/val/test: the classes of 12/4/4 superclasses, 60/20/20 classes."""
    data = _cifar100(root, image_size, download, cache_dir)
    keep = {
        split: tuple(n for n, s in zip(data["names"], data["superclasses"]) if s in supers)
        for split, supers in FC100_SUPERCLASSES.items()
    }
    for split, supers in FC100_SUPERCLASSES.items():
        if len(keep[split]) != 5 * len(supers):
            raise DataError(
                f"FC100: CIFAR-100's superclasses {list(supers)} hold {len(keep[split])} "
                f"classes, expected {5 * len(supers)}"
            )
    return _select(data, keep, "FC100")
