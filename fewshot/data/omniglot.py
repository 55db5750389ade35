"""Omniglot (Lake et al. 2015): find or download the official zips, decode once, cache, split."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from PIL import Image

from fewshot.data.cache import Cache, cached_or_decoded
from fewshot.data.decoding import IMAGE_ERRORS, image_error
from fewshot.data.episodes import ClassImages
from fewshot.data.files import data_root, download, make_root
from fewshot.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# For fewshot.data.registry: data.name -> its title; `decode_image` (below) reads a user's
# image file as these.
TITLES = {"omniglot": "Omniglot"}

PARTS = ("images_background", "images_evaluation")
URL = "https://github.com/brendenlake/omniglot/raw/master/python/{}.zip"
MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
DRAWINGS = 20  # drawings of every character
# The official release, as its two zips hold it: part -> alphabet -> its number of characters,
# in folders character01, character02, ... of DRAWINGS drawings each. Read once from the zips;
# tests/data/test_damaged_data.py checks them against it. The paper splits are defined on
# exactly this set: one alphabet fewer shrinks `background`'s validation and moves `vinyals`'
# class boundaries, so a checkpoint's training characters could land in its test split.
RELEASE: dict[str, dict[str, int]] = {
    "images_background": {
        "Alphabet_of_the_Magi": 20,
        "Anglo-Saxon_Futhorc": 29,
        "Arcadian": 26,
        "Armenian": 41,
        "Asomtavruli_(Georgian)": 40,
        "Balinese": 24,
        "Bengali": 46,
        "Blackfoot_(Canadian_Aboriginal_Syllabics)": 14,
        "Braille": 26,
        "Burmese_(Myanmar)": 34,
        "Cyrillic": 33,
        "Early_Aramaic": 22,
        "Futurama": 26,
        "Grantha": 43,
        "Greek": 24,
        "Gujarati": 48,
        "Hebrew": 22,
        "Inuktitut_(Canadian_Aboriginal_Syllabics)": 16,
        "Japanese_(hiragana)": 52,
        "Japanese_(katakana)": 47,
        "Korean": 40,
        "Latin": 26,
        "Malay_(Jawi_-_Arabic)": 40,
        "Mkhedruli_(Georgian)": 41,
        "N_Ko": 33,
        "Ojibwe_(Canadian_Aboriginal_Syllabics)": 14,
        "Sanskrit": 42,
        "Syriac_(Estrangelo)": 23,
        "Tagalog": 17,
        "Tifinagh": 55,
    },
    "images_evaluation": {
        "Angelic": 20,
        "Atemayar_Qelisayer": 26,
        "Atlantean": 26,
        "Aurek-Besh": 26,
        "Avesta": 26,
        "Ge_ez": 26,
        "Glagolitic": 45,
        "Gurmukhi": 45,
        "Kannada": 41,
        "Keble": 26,
        "Malayalam": 47,
        "Manipuri": 40,
        "Mongolian": 30,
        "Old_Church_Slavonic_(Cyrillic)": 45,
        "Oriya": 46,
        "Sylheti": 28,
        "Syriac_(Serto)": 23,
        "Tengwar": 25,
        "Tibetan": 42,
        "ULOG": 26,
    },
}
# `background` split: these alphabets of images_background (160 characters) are kept for
# validation, so checkpoint selection never sees a test character.
VAL_ALPHABETS = ("Armenian", "Bengali", "Cyrillic", "Korean")
# `vinyals` split: the sizes of Vinyals et al. (2016) / Ravi & Larochelle (2017), in characters.
VINYALS_SIZES = {"train": 1028, "val": 172, "test": 423}
# The paper splits, which take the official release and nothing else; `any` takes other data.
OFFICIAL_SPLITS = ("background", "vinyals")
SPLITS = (*OFFICIAL_SPLITS, "any")
HOLDS = "images_background.zip and images_evaluation.zip (or the folders they extract to)"


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
            make_root(root)
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
    fewshot.evaluation.predict reads a user's). Raises what PIL raises (decoding.IMAGE_ERRORS): the
    caller names the file."""
    image = Image.open(io.BytesIO(png)).convert("L")
    image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
    # Strokes become bright on a zero background, so zero padding in the convs is background.
    pixels = 255 - torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(1, image_size, image_size)


def _replace(source: Path) -> str:
    """What to do about a part of the release that is not what it should be (the message has
    named its full path already)."""
    part = source.name.removesuffix(".zip")
    it = "the zip" if source.suffix == ".zip" else "the folder"
    return f"replace {it} with the official {part}.zip (or delete it and set data.download=true)"


def _decode_all(sources: dict[str, Path], image_size: int) -> ClassImages:
    by_character: dict[str, list[tuple[str, bytes]]] = {}
    source_of: dict[str, Path] = {}
    for part in PARTS:
        for name, png in _read_pngs(sources[part]).items():
            # The splits read the part and the alphabet from the name: anything else is refused
            # here rather than split by accident.
            folders = name.split("/")
            if len(folders) != 4 or folders[0] != part:
                raise DataError(
                    f"{sources[part]} holds {name}, which is not at "
                    f"{part}/<alphabet>/<character>/<drawing>.png as Omniglot's images are: "
                    f"{_replace(sources[part])}"
                )
            character, _, file = name.rpartition("/")
            by_character.setdefault(character, []).append((file, png))
            source_of[character] = sources[part]
    names = sorted(by_character)
    images = torch.empty(len(names), DRAWINGS, 1, image_size, image_size, dtype=torch.uint8)
    for i, character in enumerate(names):
        drawings = sorted(by_character[character])
        source = source_of[character]
        if len(drawings) != DRAWINGS:
            raise DataError(
                f"{source} holds {len(drawings)} drawings of {character}, and every Omniglot "
                f"character has {DRAWINGS}: {_replace(source)}"
            )
        for j, (file, png) in enumerate(drawings):
            try:
                images[i, j] = decode_image(png, image_size)
            except IMAGE_ERRORS as err:
                raise DataError(
                    f"cannot read Omniglot image {character}/{file} in {source}: "
                    f"{image_error(err)}; {_replace(source)}"
                ) from err
    return ClassImages(images, names)


def _source_record(root: Path, sources: dict[str, Path]) -> dict[str, int | str]:
    """What a cache says it was decoded from: each zip with its size, each extracted folder
    with a digest of its images' names and sizes. Another zip, or the same folder with an
    image added, removed or changed in size, then gets a cache of its own, so a cache decoded
    from a damaged release is not read again once the release is replaced."""
    record: dict[str, int | str] = {}
    for part, source in sorted(sources.items()):
        if source.is_dir():
            listing = hashlib.sha1()
            for path in sorted(source.rglob("*.png")):
                listing.update(
                    f"{path.relative_to(root).as_posix()}:{path.stat().st_size};".encode()
                )
            record[f"{part}/"] = listing.hexdigest()
        else:
            record[source.name] = source.stat().st_size
    return record


def _misfit(data: dict) -> str | None:
    """Why the characters of a cache read back do not fit its images, or None."""
    images, names = data["images"], data.get("names")
    if not isinstance(names, list) or len(names) != len(images) or images.shape[1] != DRAWINGS:
        return f"its names do not match its images {tuple(images.shape)}"
    return None


# Every character, greyscale, written whole (it is small).
CACHE = Cache("omniglot", ("images",), 1, _misfit)


def load_omniglot(
    root: str | os.PathLike, image_size: int, download: bool, cache_dir: str | None = None
) -> ClassImages:
    """Every character of `root`'s Omniglot (1623 in the official release) as uint8 images
    [characters, 20, 1, S, S], decoded once and then cached. Whether they are the official
    release is for the split to check (`omniglot_splits`), on cached data as on decoded."""
    root = data_root(root, HOLDS)
    if not root.is_dir() and not download:
        raise DataError(missing_data_message(root, False))
    sources = _sources(root, download)

    def decode() -> dict:
        data = _decode_all(sources, image_size)
        return {"images": data.images, "names": data.names}

    record = _source_record(root, sources)
    cached = cached_or_decoded(CACHE, root, cache_dir, image_size, record, decode, "Omniglot", root)
    return ClassImages(cached["images"], list(cached["names"]))


def _part_source(root: Path | None, part: str) -> str:
    """Where `part` of the data was read from, for a message: its folder or its zip."""
    if root is None:
        return part
    return str(root / part) if (root / part).is_dir() else str(root / f"{part}.zip")


def release_differences(names: Iterable[str]) -> list[tuple[str, str]]:
    """How the characters `names` ('part/alphabet/characterNN') differ from the official
    release (RELEASE): (part, what), missing alphabets first, then missing characters, then
    what is extra; an alphabet missing or extra as a whole is one difference."""
    present: dict[tuple[str, str], set[str]] = {}
    for name in names:
        part, alphabet, character = (name.split("/", 2) + ["", ""])[:3]
        present.setdefault((part, alphabet), set()).add(character)
    missing, lacking, extra = [], [], []
    for part, alphabets in RELEASE.items():
        for alphabet, count in alphabets.items():
            official = {f"character{k:02d}" for k in range(1, count + 1)}
            found = present.pop((part, alphabet), set())
            if not found:
                missing.append((part, f"lacks the alphabet {alphabet} ({count} characters)"))
                continue
            for character in sorted(official - found):
                lacking.append((part, f"lacks {alphabet}/{character}"))
            for character in sorted(found - official):
                extra.append(
                    (part, f"holds {alphabet}/{character}, beyond the official {count} characters")
                )
    for (part, alphabet), characters in sorted(present.items()):
        count = len(characters)
        extra.append(
            (part, f"holds the folder {alphabet} ({count} characters), no official alphabet")
        )
    return missing + lacking + extra


def check_release(names: Sequence[str], split: str, root: Path | None = None) -> None:
    """Raise DataError naming the first difference and where it is, unless `names` are the
    official release's characters, which the paper split `split` is defined on."""
    differences = release_differences(names)
    if not differences:
        return
    part, what = differences[0]
    others = len(differences) - 1
    more = f" (and {others} more difference{'s' if others > 1 else ''})" if others else ""
    source = _part_source(root, part)
    raise DataError(
        f"{source} {what}{more}; data.split={split} is a paper split, defined on the official "
        f"Omniglot release: {_replace(Path(source))}"
    )


def _rotated(data: ClassImages) -> ClassImages:
    """Each character at 0, 90, 180 and 270 degrees, every rotation a class of its own."""
    images = torch.cat([data.images.rot90(k, dims=(-2, -1)) for k in range(4)])
    names = [f"{n}/rot{90 * k:03d}" for k in range(4) for n in data.names]
    return ClassImages(images, names)


def _select(data: ClassImages, keep: set[str]) -> ClassImages:
    index = [i for i, n in enumerate(data.names) if n in keep]
    return ClassImages(data.images[index], [data.names[i] for i in index])


def omniglot_splits(
    data: ClassImages, split: str, root: Path | None = None
) -> dict[str, ClassImages]:
    """Meta-train/val/test classes of Omniglot under the named split.

    `background`: meta-train on images_background less VAL_ALPHABETS, validate on those,
    meta-test on all 659 characters of images_evaluation; no rotations.
    `vinyals`: 1028/172/423 characters drawn from all 1623 (a fixed order: SHA-1 of the
    name), each rotation by 90 degrees a new class, as in the MAML paper.
    Both are paper splits: they refuse data other than the official release (`check_release`,
    naming `root`'s zip or folder).
    `any`: NOT a paper split, and its accuracies compare with no published number. It takes
    whatever characters `data` holds (a few alphabets, drawings of one's own in Omniglot's
    layout), orders them by the SHA-1 of their name and cuts that order in the proportions of
    `vinyals` (1028:172:423, rounded), every rotation a class. On the complete release it
    gives exactly `vinyals`' classes.
    """
    if split not in SPLITS:
        raise ConfigError(f"data.split={split!r} is not an Omniglot split; choose one of {SPLITS}")
    if split in OFFICIAL_SPLITS:
        check_release(data.names, split, root)
    if split == "background":

        def part(name: str) -> str:
            folder, alphabet = name.split("/")[:2]
            if folder == "images_evaluation":
                return "test"
            return "val" if alphabet in VAL_ALPHABETS else "train"

        groups = {s: {n for n in data.names if part(n) == s} for s in ("train", "val", "test")}
        return {s: _select(data, names) for s, names in groups.items()}
    order = sorted(data.names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())
    total = sum(VINYALS_SIZES.values())
    t = round(len(order) * VINYALS_SIZES["train"] / total)
    v = round(len(order) * VINYALS_SIZES["val"] / total)
    groups = {"train": order[:t], "val": order[t : t + v], "test": order[t + v :]}
    return {s: _rotated(_select(data, set(names))) for s, names in groups.items()}


def omniglot(
    root: str | os.PathLike,
    image_size: int,
    download: bool,
    cache_dir: str | None,
    split: str,
) -> dict[str, ClassImages]:
    """The meta-train/val/test classes of `split` (conf/data/omniglot.yaml's `_target_`)."""
    if split not in SPLITS:  # before minutes of decoding, not after
        raise ConfigError(f"data.split={split!r} is not an Omniglot split; choose one of {SPLITS}")
    data = load_omniglot(root, image_size, download, cache_dir)
    return omniglot_splits(data, split, Path(root).expanduser())
