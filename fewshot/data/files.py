"""Writing and fetching files so that an interrupted run never leaves a half-written one behind."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    """Fetch `url` to `path`, refusing anything whose md5 differs (an HTML error page, say)."""
    with atomic_path(path) as tmp:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out)
        got = md5sum(tmp)
        if got != md5:
            head = tmp.read_bytes()[:200].lstrip().lower()
            what = "an HTML page" if head.startswith((b"<!doctype", b"<html")) else "a file"
            raise OSError(f"{url} returned {what} with md5 {got}, expected {md5}; removed it.")
