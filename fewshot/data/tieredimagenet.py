"""tieredImageNet (Ren et al., ICLR 2018): 608 ImageNet classes of 34 categories, split by
category into 351/97/160 classes (20/6/8 categories), 84 px; read from its common release
(`{split}_images_png.pkl`, `{split}_labels.pkl`) and decoded once into a chunked cache."""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fewshot.data.decoding import rgb_bytes, write_split
from fewshot.data.episodes import ClassImages
from fewshot.data.files import cache_path, load_cache, source_record, write_chunked_cache
from fewshot.data.pickles import load_pickle
from fewshot.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LABEL_KEYS = ("label_specific", "label_general", "label_specific_str", "label_general_str")


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
    except (OSError, ValueError, TypeError) as err:
        raise DataError(f"cannot decode tieredImageNet image {where}: {err}") from err


def _split_classes(images: Path, labels: Path) -> dict[str, list[tuple[str, object]]]:
    """Class name -> its (where, PNG) items in file order, classes by id; one split in memory."""
    specific, names = _labels(labels)
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


def load_tieredimagenet(
    root: str | os.PathLike, image_size: int, cache_dir: str | None = None, workers: int = 0
) -> dict[str, ClassImages]:
    """Meta-train/val/test classes as uint8 images [classes, per_class, 3, S, S].

    The ~780k PNGs are decoded once, a split at a time and in `workers` processes, into a cache
    written in chunks (at most 16.5 GB at 84 px) that later runs memory-map. Its classes hold
    different numbers of images; one tensor per split keeps the first `per_class` (the fewest)
    of each, and says so in the log.
    """
    root = Path(root).expanduser()
    files = _files(root)
    sources = source_record(root, [path for pair in files.values() for path in pair])
    fingerprint = hashlib.sha1(repr(sorted(sources.items())).encode()).hexdigest()[:10]
    name = f"tieredimagenet_{image_size}px_{fingerprint}.pt"
    cache = cache_path(root, cache_dir, "tieredimagenet", name)
    cached = load_cache(cache, mmap=True, verify=False)
    if cached is None or cached.get("sources") != sources:
        log.info("decoding tieredImageNet from %s (once; cached at %s)", root, cache)
        started = time.perf_counter()
        decode = functools.partial(_decode, image_size=image_size)
        names: dict[str, list[str]] = {}
        with write_chunked_cache(cache) as out:
            for split in SPLITS:
                classes = _split_classes(*files[split])
                names[split] = list(classes)
                write_split(out, split, classes, decode, image_size, workers, f"meta-{split}")
                del classes  # the split's PNGs leave memory before the next are read
            out.put("names", names)
            out.put("sources", sources)
        log.info("decoded tieredImageNet in %.0f s", time.perf_counter() - started)
        cached = load_cache(cache, mmap=True, verify=False)
    return {s: ClassImages(cached[s], list(cached["names"][s])) for s in SPLITS}
