"""Omniglot (Lake et al. 2015): find or download the official zips, decode once, cache, split."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import zipfile
import zlib
from pathlib import Path

import torch
from PIL import Image

from fewshot.data.episodes import ClassImages
from fewshot.data.files import cache_path, download, load_cache, save_cache
from fewshot.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PARTS = ("images_background", "images_evaluation")
URL = "https://github.com/brendenlake/omniglot/raw/master/python/{}.zip"
MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
DRAWINGS = 20  # drawings of every character
# `background` split: these alphabets of images_background (160 characters) are kept for
# validation, so checkpoint selection never sees a test character.
VAL_ALPHABETS = ("Armenian", "Bengali", "Cyrillic", "Korean")
# `vinyals` split: the sizes of Vinyals et al. (2016) / Ravi & Larochelle (2017), in characters.
VINYALS_SIZES = {"train": 1028, "val": 172, "test": 423}
SPLITS = ("background", "vinyals")


def missing_data_message(root: Path, download: bool, failure: str | None = None) -> str:
    """Where the zips go, and what to do next: with data.download=false, to set it; with it
    true (the fetch failed: `failure`), to fetch them elsewhere and copy them there."""
    where = (
        "Expected images_background.zip and images_evaluation.zip (or the folders they "
        "extract to) from https://github.com/brendenlake/omniglot/tree/master/python"
    )
    if not download:
        return (
            f"Omniglot not found under data.root={root}. {where}; put them there, or set "
            "data.download=true to fetch them."
        )
    return (
        f"Omniglot not found under data.root={root}, and data.download=true could not fetch "
        f"it: {failure}. {where}; download them where there is a network and put them there, "
        "or point data.root at a folder that has them."
    )


def _sources(root: Path, download_missing: bool) -> dict[str, Path]:
    """Path of each part: its extracted folder if present, else its zip (downloaded if allowed)."""
    found = {}
    for part in PARTS:
        folder, archive = root / part, root / f"{part}.zip"
        if folder.is_dir():
            found[part] = folder
        elif archive.is_file():
            found[part] = archive
        elif download_missing:
            log.info("downloading %s to %s", part, archive)
            try:
                download(URL.format(part), archive, MD5[part])
            except OSError as err:
                raise DataError(missing_data_message(root, True, str(err))) from err
            found[part] = archive
        else:
            raise DataError(missing_data_message(root, False))
    return found


def _read_pngs(source: Path) -> dict[str, bytes]:
    """'part/Alphabet/characterNN/<id>_<drawing>.png' -> PNG bytes, from a zip or an extracted folder."""
    if source.is_dir():
        pngs = {}
        for path in source.rglob("*.png"):
            try:
                pngs[path.relative_to(source.parent).as_posix()] = path.read_bytes()
            except OSError as err:
                raise DataError(f"cannot read Omniglot image {path}: {err}") from err
        return pngs
    try:
        with zipfile.ZipFile(source) as archive:
            return {n: archive.read(n) for n in archive.namelist() if n.endswith(".png")}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        raise DataError(
            f"cannot read the Omniglot archive {source} ({err}): it is damaged or incomplete; "
            "replace it, or delete it and set data.download=true to fetch it again"
        ) from err


def decode_image(png: bytes, image_size: int) -> torch.Tensor:
    """An image file's bytes -> uint8 [1, S, S], as every Omniglot image is read (and
    fewshot.predict reads a user's)."""
    image = Image.open(io.BytesIO(png)).convert("L")
    image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
    # Strokes become bright on a zero background, so zero padding in the convs is background.
    pixels = 255 - torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(1, image_size, image_size)


def _decode_all(sources: dict[str, Path], image_size: int) -> ClassImages:
    by_character: dict[str, list[tuple[str, bytes]]] = {}
    for part in PARTS:
        for name, png in _read_pngs(sources[part]).items():
            character, _, file = name.rpartition("/")
            by_character.setdefault(character, []).append((file, png))
    names = sorted(by_character)
    images = torch.empty(len(names), DRAWINGS, 1, image_size, image_size, dtype=torch.uint8)
    for i, character in enumerate(names):
        drawings = sorted(by_character[character])
        if len(drawings) != DRAWINGS:
            raise DataError(f"{character} has {len(drawings)} drawings, expected {DRAWINGS}")
        for j, (file, png) in enumerate(drawings):
            try:
                images[i, j] = decode_image(png, image_size)
            except OSError as err:
                raise DataError(f"cannot read Omniglot image {character}/{file}: {err}") from err
    return ClassImages(images, names)


def load_omniglot(
    root: str | os.PathLike, image_size: int, download: bool, cache_dir: str | None = None
) -> ClassImages:
    """All 1623 characters as uint8 images [1623, 20, 1, S, S], decoded once and then cached."""
    root = Path(root).expanduser()
    # v3: its checksum is over per-entry digests (files.save_cache)
    cache = cache_path(root, cache_dir, "omniglot", f"omniglot_{image_size}px_v3.pt")
    cached = load_cache(cache)
    if cached is not None:
        return ClassImages(cached["images"], list(cached["names"]))
    if not root.is_dir() and not download:
        raise DataError(missing_data_message(root, False))
    root.mkdir(parents=True, exist_ok=True)
    log.info("decoding Omniglot from %s (once; cached at %s)", root, cache)
    data = _decode_all(_sources(root, download), image_size)
    save_cache(cache, {"images": data.images, "names": data.names})
    return data


def _rotated(data: ClassImages) -> ClassImages:
    """Each character at 0, 90, 180 and 270 degrees, every rotation a class of its own."""
    images = torch.cat([data.images.rot90(k, dims=(-2, -1)) for k in range(4)])
    names = [f"{n}/rot{90 * k:03d}" for k in range(4) for n in data.names]
    return ClassImages(images, names)


def _select(data: ClassImages, keep: set[str]) -> ClassImages:
    index = [i for i, n in enumerate(data.names) if n in keep]
    return ClassImages(data.images[index], [data.names[i] for i in index])


def omniglot_splits(data: ClassImages, split: str) -> dict[str, ClassImages]:
    """Meta-train/val/test classes of Omniglot under the named split.

    `background`: meta-train on images_background less VAL_ALPHABETS, validate on those,
    meta-test on all 659 characters of images_evaluation; no rotations.
    `vinyals`: 1028/172/423 characters drawn from all 1623 (a fixed order: SHA-1 of the
    name), each rotation by 90 degrees a new class, as in the MAML paper.
    """
    if split == "background":

        def part(name: str) -> str:
            folder, alphabet = name.split("/")[:2]
            if folder == "images_evaluation":
                return "test"
            return "val" if alphabet in VAL_ALPHABETS else "train"

        groups = {s: {n for n in data.names if part(n) == s} for s in ("train", "val", "test")}
        return {s: _select(data, names) for s, names in groups.items()}
    if split == "vinyals":
        order = sorted(data.names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())
        t, v = VINYALS_SIZES["train"], VINYALS_SIZES["val"]
        groups = {"train": order[:t], "val": order[t : t + v], "test": order[t + v :]}
        return {s: _rotated(_select(data, set(names))) for s, names in groups.items()}
    raise ConfigError(f"data.split={split!r} is not an Omniglot split; choose one of {SPLITS}")


def omniglot(
    root: str | os.PathLike,
    image_size: int,
    download: bool,
    cache_dir: str | None,
    split: str,
    workers: int,
) -> dict[str, ClassImages]:
    """The meta-train/val/test classes of `split` (conf/data/omniglot.yaml's `_target_`).
    `workers` are the episode loader's: the zips decode in this process."""
    return omniglot_splits(load_omniglot(root, image_size, download, cache_dir), split)
