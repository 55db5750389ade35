"""The decoded-data cache of an image dataset: named by the files it is decoded from, read back
when it fits the load asking for it, else decoded once and written, for every loader by one
function (`cached_or_decoded`); what differs between datasets, each declares in its `Cache`."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fewshot.data.decoding import write_split
from fewshot.data.episodes import ClassImages
from fewshot.data.files import (
    ChunkedCache,
    cache_path,
    check_cache_writable,
    image_misfit,
    load_cache,
    save_cache,
    write_chunked_cache,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Cache:
    """What a dataset's cache holds and how it is written and read, declared by its loader."""

    name: str  # the file "<name>_<S>px_<key>.pt", and the per-user folder "<name>-<key of root>"
    images: Sequence[str]  # its entries of uint8 images [classes, per_class, channels, S, S]
    channels: int
    # Why the rest of a cache read back (names beside the images) does not fit, or None.
    misfit: Callable[[dict[str, Any]], str | None]
    # Too large for memory: written a chunk at a time, and memory-mapped when read, without
    # hashing its gigabytes again (a truncated one still fails). Else written whole and its
    # checksum checked when read, memory-mapped if `mmap`.
    chunked: bool = False
    mmap: bool = False
    changed: str = "other files than data.root holds now"  # what it says of a changed source


def cached_or_decoded(
    cache: Cache,
    root: Path,
    cache_dir: str | None,
    image_size: int,
    sources: dict[str, int | str],
    decode: Callable[..., Any],
    what: str,
    origin: object,
    check: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """The data of `root` decoded at `image_size`: its cache if that fits, else decoded into it.

    The cache lives where `files.cache_path` says, named by a digest of `sources` (each file it
    is decoded from, with its size or a digest): other files get a cache of their own. One read
    back is used if it says it was decoded from `sources`, its images (`cache.images`) are uint8
    of `cache.channels` at `image_size` and `cache.misfit` finds nothing else wrong; else it is
    rebuilt, saying why. Before decoding (which takes minutes): `check()` (quick checks of the
    source, an archive's md5, say), then whether the cache can be written there at all.

    `decode`, for a chunked cache, fills the `files.ChunkedCache` it is given; else it takes
    nothing and returns the entries. Either way `sources` is written beside them. Logs what is
    decoded (`what`) from where (`origin`), and how long it took.
    """
    key = hashlib.sha1(repr(sorted(sources.items())).encode()).hexdigest()[:10]
    path = cache_path(root, cache_dir, cache.name, f"{cache.name}_{image_size}px_{key}.pt")

    def misfit(data: dict[str, Any]) -> str | None:
        if data.get("sources") != sources:
            return f"it was decoded from {cache.changed}"
        wrong = image_misfit(data, cache.images, cache.channels, image_size)
        return wrong if wrong is not None else cache.misfit(data)

    mmap, verify = cache.mmap or cache.chunked, not cache.chunked
    data = load_cache(path, mmap=mmap, verify=verify, misfit=misfit)
    if data is not None:
        return data
    if check is not None:
        check()
    check_cache_writable(path)
    log.info("decoding %s from %s (once; cached at %s)", what, origin, path)
    started = time.perf_counter()
    if cache.chunked:
        with write_chunked_cache(path) as out:
            decode(out)
            out.put("sources", sources)
        data = load_cache(path, mmap=True, verify=False)
    else:
        data = {**decode(), "sources": sources}
        save_cache(path, data)
    log.info("decoded %s in %.0f s", what, time.perf_counter() - started)
    return data


# The layout Mini-ImageNet's and tieredImageNet's caches share: an entry of RGB images per
# split, [classes, per_class, 3, S, S], and `names`: split -> its class names.


def split_cache(name: str) -> Cache:
    """A cache of SPLITS (written by `write_splits`, read by `class_splits`): too large to
    write whole."""
    return Cache(name, SPLITS, 3, _split_names_misfit, chunked=True)


def _split_names_misfit(data: dict[str, Any]) -> str | None:
    """Why the class names of a cache of SPLITS do not fit its images, or None."""
    names = data.get("names")
    if not isinstance(names, dict) or any(len(names.get(s, ())) != len(data[s]) for s in SPLITS):
        return "its class names do not match its images"
    return None


def write_splits(
    out: ChunkedCache,
    read: Callable[[str], dict[str, Sequence[T]]],
    decode: Callable[[T], bytes],
    image_size: int,
    workers: int,
) -> None:
    """Every split's classes (`read(split)`: class name -> its items, one split in memory at a
    time), each item turned into [S, S, 3] bytes by `decode` (see decoding.write_split), and
    their names."""
    names: dict[str, list[str]] = {}
    for split in SPLITS:
        classes = read(split)
        names[split] = list(classes)
        write_split(out, split, classes, decode, image_size, workers, f"meta-{split}")
        del classes  # the split leaves memory before the next is read
    out.put("names", names)


def class_splits(data: dict[str, Any]) -> dict[str, ClassImages]:
    """A cache of SPLITS as each split's ClassImages."""
    return {s: ClassImages(data[s], list(data["names"][s])) for s in SPLITS}
