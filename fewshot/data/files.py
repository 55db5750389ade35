"""Writing and fetching files so that an interrupted run never leaves a half-written one behind."""

from __future__ import annotations

import glob
import hashlib
import http.client
import json
import logging
import math
import os
import shutil
import socket
import stat
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from fewshot.errors import DataError

log = logging.getLogger(__name__)


def _writer() -> str:
    """This process, as it appears in the names of its temporary files: host hash and pid."""
    host = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
    return f"{host}-{os.getpid()}"


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_parts(path: Path) -> None:
    """Delete temporary files of `path` left by processes of this host that were killed while
    writing them; those of a process still running, or of another host, are left alone."""
    host = _writer().split("-")[0]
    for part in path.parent.glob(f".{glob.escape(path.name)}.{host}-*.part"):
        pid = part.name[len(path.name) + len(host) + 3 :].split(".")[0]
        if pid.isdigit() and not _is_running(int(pid)):
            part.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    `path` is always either its old content or its complete new content. A process killed
    while writing leaves its temporary file, which the next write of `path` deletes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_writer()}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # what an ordinary open() would give, not mkstemp's 0600
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """`data` as indented JSON at `path`, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


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
    with atomic_path(path) as tmp:
        torch.save({"data": data, "sha256": checksum}, tmp)


def raw_path(path: Path) -> Path:
    """The file beside a cache written by CacheWriter that holds its tensors' bytes."""
    return path.with_name(path.name + ".u8")


class ChunkedCache:
    """A cache being written by `write_chunked_cache`: uint8 tensors one after another, each
    declared by `begin` and filled from its start by `append`, hashed on the way; other
    entries (names, sources) set by `put`."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
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
        self._file.write(data)
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
        cache = ChunkedCache(file)
        yield cache
        cache.finish()
    with atomic_path(path) as tmp:
        stored = {"data": cache.extra, "layout": cache.layout, "sha256": _checksum(cache.digests)}
        torch.save(stored, tmp)


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


def load_cache(path: Path, mmap: bool = False, verify: bool = True) -> dict[str, Any] | None:
    """What `save_cache` or a `CacheWriter` wrote, or None if there is none or it is damaged
    (truncated, or its contents no longer match the checksum stored with them): a cache is
    rebuilt, never trusted.

    `mmap` maps the tensors instead of reading them; `verify=False` then skips the checksum,
    which would read every byte (1.3 GB for Mini-ImageNet) — a truncated file still fails.
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
    except Exception as err:
        log.warning("rebuilding cache %s: it cannot be read (%s)", path, err)
        return None
    if damaged:
        log.warning("rebuilding cache %s: its contents do not match their checksum", path)
        return None
    return data


def source_record(root: Path, files: list[Path]) -> dict[str, int]:
    """Each source file (relative to `root`) with its size: what a cache says it was made
    from, so that different files, or the same names with other contents, get a new one."""
    return {file.relative_to(root).as_posix(): file.stat().st_size for file in sorted(files)}
