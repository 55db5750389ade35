"""Writing and fetching files so that an interrupted run never leaves a half-written one behind."""

from __future__ import annotations

import glob
import hashlib
import http.client
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def _checksum(data: dict[str, Any]) -> str:
    """SHA-256 over every entry: a tensor's dtype, shape and bytes, anything else's repr."""
    digest = hashlib.sha256()
    for key in sorted(data):
        value = data[key]
        digest.update(key.encode())
        if isinstance(value, torch.Tensor):
            value = value.contiguous().cpu()
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.view(-1).view(torch.uint8).numpy())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def save_cache(path: Path, data: dict[str, Any]) -> None:
    """Write `data` (tensors, lists of names) with a checksum of its contents, atomically."""
    with atomic_path(path) as tmp:
        torch.save({"data": data, "sha256": _checksum(data)}, tmp)


def load_cache(path: Path, mmap: bool = False, verify: bool = True) -> dict[str, Any] | None:
    """What `save_cache` wrote, or None if there is none or it is damaged (truncated, or its
    contents no longer match the checksum stored with them): a cache is rebuilt, never trusted.

    `mmap` maps the tensors instead of reading them; `verify=False` then skips the checksum,
    which would read every byte (1.3 GB for Mini-ImageNet) — a truncated file still fails.
    """
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, mmap=mmap, weights_only=True)
        damaged = verify and _checksum(stored["data"]) != stored["sha256"]
    except Exception as err:
        log.warning("rebuilding cache %s: it cannot be read (%s)", path, err)
        return None
    if damaged:
        log.warning("rebuilding cache %s: its contents do not match their checksum", path)
        return None
    return stored["data"]
