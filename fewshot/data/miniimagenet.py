"""Mini-ImageNet (Vinyals et al. 2016) in Ravi & Larochelle's split: find the images in either
common layout, resize and decode them once into a cache that later runs memory-map."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import time
from pathlib import Path

import torch
from PIL import Image

from fewshot.data.episodes import ClassImages
from fewshot.data.files import cache_path, load_cache, save_cache
from fewshot.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
EXTENSIONS = (".jpg", ".jpeg", ".png")

Listing = dict[str, dict[str, list[Path]]]  # split -> class (wnid) -> image files, sorted


def missing_data_message(root: Path) -> str:
    return (
        f"Mini-ImageNet not found under data.root={root}. Expected either images/*.jpg with "
        "train.csv, val.csv and test.csv (Ravi & Larochelle's split, columns filename,label), "
        "or class folders train/<wnid>/*.jpg, val/<wnid>/*.jpg and test/<wnid>/*.jpg. The "
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


def find_images(root: Path) -> Listing:
    """The image files of every class of every split, from whichever layout `root` holds."""
    if (root / "images").is_dir() and all((root / f"{s}.csv").is_file() for s in SPLITS):
        read = _read_split_csv
    elif all((root / s).is_dir() for s in SPLITS):
        read = _read_split_folder
    else:
        raise DataError(missing_data_message(root))
    listing = {}
    for split in SPLITS:
        classes = read(root, split)
        if not classes:
            raise DataError(f"the meta-{split} split under data.root={root} has no classes")
        listing[split] = {
            name: sorted(classes[name], key=lambda p: p.name) for name in sorted(classes)
        }
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        if shared := sorted(listing[a].keys() & listing[b].keys()):
            raise DataError(f"classes {shared[:3]} are in both meta-{a} and meta-{b} under {root}")
    return listing


def _fingerprint(listing: Listing) -> str:
    """A short hash of which file belongs to which class and split: a changed split or image
    list gets a cache of its own instead of a stale one."""
    text = "\n".join(
        f"{split}/{name}/{file.name}"
        for split, classes in listing.items()
        for name, files in classes.items()
        for file in files
    )
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _decode(path: Path, image_size: int) -> torch.Tensor:
    """One image file -> uint8 [3, S, S]."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((image_size, image_size), Image.Resampling.LANCZOS)
    except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"cannot read Mini-ImageNet image {path}: {err}") from err
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(image_size, image_size, 3).permute(2, 0, 1)


def _decode_split(classes: dict[str, list[Path]], split: str, image_size: int) -> torch.Tensor:
    """uint8 [classes, per_class, 3, S, S]; every class keeps its first `per_class` images."""
    counts = {name: len(files) for name, files in classes.items()}
    per_class = min(counts.values())
    if max(counts.values()) > per_class:
        # One tensor per split needs one count; the few extra images of larger classes go.
        smallest = min(counts, key=counts.get)
        log.warning(
            "meta-%s classes hold %d to %d images (fewest: %s); each keeps its first %d by name",
            split,
            per_class,
            max(counts.values()),
            smallest,
            per_class,
        )
    images = torch.empty(len(classes), per_class, 3, image_size, image_size, dtype=torch.uint8)
    for i, files in enumerate(classes.values()):
        for j, file in enumerate(files[:per_class]):
            images[i, j] = _decode(file, image_size)
    return images


def load_miniimagenet(
    root: str | os.PathLike, image_size: int, cache_dir: str | None = None
) -> dict[str, ClassImages]:
    """Meta-train/val/test classes as uint8 images [classes, per_class, 3, S, S].

    Decoded once (resized to `image_size`) into a cache file that later runs memory-map, so a
    run starts in seconds and no episode decodes a JPEG.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(missing_data_message(root))
    listing = find_images(root)
    name = f"miniimagenet_{image_size}px_{_fingerprint(listing)}.pt"
    cache = cache_path(root, cache_dir, "miniimagenet", name)
    cached = load_cache(cache, mmap=True, verify=False)
    if cached is not None:
        return {s: ClassImages(cached[s], list(cached["names"][s])) for s in SPLITS}
    log.info("decoding Mini-ImageNet from %s (once; cached at %s)", root, cache)
    started = time.perf_counter()
    images = {}
    for split in SPLITS:
        log.info("decoding %d meta-%s classes", len(listing[split]), split)
        images[split] = _decode_split(listing[split], split, image_size)
    names = {s: list(listing[s]) for s in SPLITS}
    save_cache(cache, {**images, "names": names})
    log.info("decoded Mini-ImageNet in %.0f s", time.perf_counter() - started)
    return {s: ClassImages(images[s], names[s]) for s in SPLITS}
