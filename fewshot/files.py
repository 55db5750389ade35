"""Files written whole or not at all: an interrupted run never leaves a half-written one."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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


def unwritable(path: str | os.PathLike) -> str | None:
    """Why atomic_path could not write `path`, or None if it can: checked before work whose
    result would otherwise be lost at the end.

    atomic_path makes the missing folders and renames a new file in the folder onto `path`, so
    what must hold is that `path` is not a folder, the nearest existing folder above it is a
    folder, and a file can be created there. Creating one (and removing it) is the test: the
    permission bits do not tell for root, a read-only mount or an ACL.
    """
    path = Path(path).absolute()
    if path.is_dir():
        return f"{path} is a folder"
    above = path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        return f"{above} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(dir=above, prefix=".fewshot-write-test.")
    except OSError as err:
        return f"no file can be created in {above} ({err.strerror or err})"
    os.close(fd)
    os.unlink(probe)
    return None


def write_json(path: str | os.PathLike, data: Any) -> None:
    """`data` as indented JSON at `path`, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
