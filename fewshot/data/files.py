"""Writing and fetching files so that an interrupted run never leaves a half-written one behind."""

from __future__ import annotations

import hashlib
import http.client
import logging
import math
import os
import shutil
import stat
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from fewshot.errors import DataError
from fewshot.files import atomic_path, unwritable

log = logging.getLogger(__name__)


def data_root(root: str | os.PathLike, holds: str) -> Path:
    """`data.root` as a path; DataError in one line if it is a file, since every loader reads
    (or downloads into) a folder, and would otherwise fail on its first file with an errno."""
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(
            f"data.root={root} is a file, not a folder: set data.root to the folder that holds "
            f"{holds}"
        )
    return root


def make_root(root: Path) -> None:
    """Create `data.root` to download into; DataError naming it if that cannot be done."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(
            f"cannot create data.root={root} to download into ({err.strerror or err}): set "
            "data.root to a folder you can write, or put the data there yourself"
        ) from err


def _cache_write_error(path: Path, reason: str) -> DataError:
    return DataError(
        f"cannot write the decoded-data cache {path}: {reason}; set data.cache_dir to a folder "
        "you can write"
    )


def check_cache_writable(path: Path) -> None:
    """Raise DataError naming `path` and data.cache_dir unless the cache can be written there:
    checked before decoding, which takes minutes, rather than found after it."""
    reason = unwritable(path)
    if reason is not None:
        raise _cache_write_error(path, reason)


def cache_path(root: Path, cache_dir: str | None, dataset: str, name: str) -> Path:
    """Where the decoded-data cache `name` of the data in `root` lives: in `cache_dir` if set,
    else beside the data, or in ~/.cache/fewshot/<dataset>-<hash of root> if that is read-only."""
    if cache_dir is not None:
        return Path(cache_dir) / name
    # The folder's own permission bits decide, not os.access: root may write anywhere, but a
    # folder marked read-only (a shared mount) is not ours to fill. Then cache per user.
    if not root.exists() or (root.stat().st_mode & stat.S_IWUSR and os.access(root, os.W_OK)):
        return root / name
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "fewshot" / f"{dataset}-{key}" / name


def md5sum(path: str | os.PathLike) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, path: Path, md5: str) -> None:
    """Fetch `url` to `path`, refusing anything whose md5 differs (an HTML error page, say).

    Raises DataError with the reason; nothing is left at `path`, not even part of the file.
    """
    with atomic_path(path) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out)
                announced = response.headers.get("Content-Length")
        except (OSError, http.client.HTTPException) as err:
            raise DataError(
                f"{url} could not be fetched ({err!r}); removed the partial file"
            ) from err
        size = tmp.stat().st_size
        if announced is not None and size != int(announced):
            raise DataError(
                f"{url} stopped after {size} of {announced} bytes; removed the partial file"
            )
        got = md5sum(tmp)
        if got != md5:
            head = tmp.read_bytes()[:200].lstrip().lower()
            what = "an HTML page" if head.startswith((b"<!doctype", b"<html")) else "a file"
            raise DataError(f"{url} returned {what} with md5 {got}, expected {md5}; removed it")


def _entry_digest(value: Any) -> str:
    """SHA-256 of one cache entry: a tensor's dtype, shape and bytes, anything else's repr."""
    digest = hashlib.sha256()
    if isinstance(value, torch.Tensor):
        value = value.contiguous().cpu()
        digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.view(-1).view(torch.uint8).numpy())
    else:
        digest.update(repr(value).encode())
    return digest.hexdigest()


def _checksum(digests: dict[str, str]) -> str:
    """SHA-256 over every entry's digest, by key: entries can be hashed in any order."""
    return hashlib.sha256(
        "".join(f"{key}={digests[key]};" for key in sorted(digests)).encode()
    ).hexdigest()


def save_cache(path: Path, data: dict[str, Any]) -> None:
    """Write `data` (tensors, lists of names) with a checksum of its contents, atomically."""
    checksum = _checksum({key: _entry_digest(value) for key, value in data.items()})
    try:
        with atomic_path(path) as tmp:
            torch.save({"data": data, "sha256": checksum}, tmp)
    except OSError as err:  # a full disk, or a folder that became read-only since the check
        raise _cache_write_error(path, err.strerror or str(err)) from err


def raw_path(path: Path) -> Path:
    """The file beside a cache written by CacheWriter that holds its tensors' bytes."""
    return path.with_name(path.name + ".u8")


class ChunkedCache:
    """A cache being written by `write_chunked_cache`: uint8 tensors one after another, each
    declared by `begin` and filled from its start by `append`, hashed on the way; other
    entries (names, sources) set by `put`."""

    def __init__(self, file: IO[bytes], path: Path) -> None:
        self._file, self._path = file, path  # `path`: what a failed write names
        self.layout: dict[str, tuple[tuple[int, ...], int]] = {}  # key -> (shape, byte offset)
        self.extra: dict[str, Any] = {}
        self.digests: dict[str, str] = {}
        self._key: str | None = None
        self._left = 0  # elements the current tensor still needs

    def begin(self, key: str, shape: tuple[int, ...]) -> None:
        """Start the uint8 tensor `key` of `shape`; the previous one must be complete."""
        self.finish()
        shape = tuple(shape)
        self._key, self._left = key, math.prod(shape)
        self.layout[key] = (shape, self._file.tell())
        self._hash = hashlib.sha256(f"{torch.uint8}{shape}".encode())
        if self._left == 0:
            self.finish()

    def append(self, chunk: torch.Tensor) -> None:
        """The next elements of the current tensor in its row-major order (`chunk` any shape)."""
        if chunk.dtype != torch.uint8 or self._key is None or chunk.numel() > self._left:
            raise ValueError(f"a chunk of {chunk.numel()} {chunk.dtype} does not fit {self._key}")
        data = chunk.contiguous().view(-1).numpy()
        self._hash.update(data)
        try:
            self._file.write(data)
        except OSError as err:  # a full disk: many gigabytes go there
            raise _cache_write_error(self._path, err.strerror or str(err)) from err
        self._left -= chunk.numel()
        if self._left == 0:
            self.finish()

    def put(self, key: str, value: Any) -> None:
        self.extra[key] = value
        self.digests[key] = _entry_digest(value)

    def finish(self) -> None:
        """Close the current tensor; an incomplete one is an error, never a short cache."""
        if self._key is None:
            return
        if self._left:
            raise ValueError(f"{self._key} is {self._left} bytes short of its shape")
        self.digests[self._key] = self._hash.hexdigest()
        self._key = None


@contextmanager
def write_chunked_cache(path: Path) -> Iterator[ChunkedCache]:
    """A cache too large for memory, written a chunk at a time; load_cache reads it.

    The tensors' bytes go to `raw_path(path)`, the rest, their layout and the checksum to
    `path`; both appear only when the block succeeds, and nothing of a failed one stays.
    """
    with atomic_path(raw_path(path)) as tmp, open(tmp, "wb") as file:
        cache = ChunkedCache(file, raw_path(path))
        yield cache
        cache.finish()
    try:
        with atomic_path(path) as tmp:
            stored = {
                "data": cache.extra,
                "layout": cache.layout,
                "sha256": _checksum(cache.digests),
            }
            torch.save(stored, tmp)
    except OSError as err:
        raise _cache_write_error(path, err.strerror or str(err)) from err


def _mapped_tensors(path: Path, layout: dict[str, Any], mmap: bool) -> dict[str, torch.Tensor]:
    """The tensors of a CacheWriter cache, as views of its raw file (mapped, or read)."""
    raw = raw_path(path)
    size = sum(math.prod(shape) for shape, _ in layout.values())
    if raw.stat().st_size != size:  # truncated or replaced: fails even without verify
        raise ValueError(f"{raw.name} holds {raw.stat().st_size} bytes, expected {size}")
    flat = torch.from_file(str(raw), shared=False, size=size, dtype=torch.uint8)
    if not mmap:
        flat = flat.clone()
    return {
        key: flat[offset : offset + math.prod(shape)].view(shape)
        for key, (shape, offset) in layout.items()
    }


def load_cache(
    path: Path,
    mmap: bool = False,
    verify: bool = True,
    misfit: Callable[[dict[str, Any]], str | None] | None = None,
) -> dict[str, Any] | None:
    """What `save_cache` or a `CacheWriter` wrote, or None if there is none, it is damaged
    (truncated, or its contents no longer match the checksum stored with them) or it does not
    fit: a cache is rebuilt, never trusted.

    `mmap` maps the tensors instead of reading them; `verify=False` then skips the checksum,
    which would read every byte (1.3 GB for Mini-ImageNet) — a truncated file still fails.
    `misfit(data)` says why the contents do not fit what the loader asked for (images of
    another size, a missing entry: a file copied or renamed into place), or None if they do.
    """
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, mmap=mmap, weights_only=True)
        data = stored["data"]
        if "layout" in stored:
            data = {**data, **_mapped_tensors(path, stored["layout"], mmap)}
        digests = {key: _entry_digest(value) for key, value in data.items()} if verify else {}
        damaged = verify and _checksum(digests) != stored["sha256"]
        reason = None if damaged or misfit is None else misfit(data)
    except Exception as err:
        log.warning("rebuilding cache %s: it cannot be read (%s)", path, err)
        return None
    if damaged:
        log.warning("rebuilding cache %s: its contents do not match their checksum", path)
        return None
    if reason is not None:
        log.warning("rebuilding cache %s: %s", path, reason)
        return None
    return data


def image_misfit(
    data: dict[str, Any], keys: Sequence[str], channels: int, image_size: int
) -> str | None:
    """Why the uint8 image tensors `data[key]` [classes, per_class, channels, S, S] do not fit
    data.image_size, or None: for `load_cache(misfit=...)`."""
    for key in keys:
        images = data.get(key)
        if not isinstance(images, torch.Tensor):
            return f"it holds no {key} images"
        if images.dtype != torch.uint8 or images.dim() != 5 or images.shape[2] != channels:
            return f"its {key} images are {images.dtype} {tuple(images.shape)}, not uint8 images"
        if tuple(images.shape[-2:]) != (image_size, image_size):
            size = "x".join(map(str, images.shape[-2:]))
            return f"it holds {size} px images, and data.image_size={image_size}"
    return None


def source_record(root: Path, files: list[Path]) -> dict[str, int]:
    """Each source file (relative to `root`) with its size: what a cache says it was made
    from, so that different files, or the same names with other contents, get a new one."""
    return {file.relative_to(root).as_posix(): file.stat().st_size for file in sorted(files)}
