"""Pickled data files read as data, never as code: only numpy's array machinery may be named."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import IO, Any

from fewshot.errors import DataError

# What pickled numpy arrays, dtypes and integers name, under numpy 1 (numpy.core) and numpy 2
# (numpy._core): `_reconstruct` and `ndarray` rebuild an array whose bytes follow as plain data;
# `_frombuffer` is protocol 5's way of doing it, `scalar` a pickled numpy integer (index lists
# written from numpy hold them); `_codecs.encode` is how Python 3 writes bytes at protocols 0-2.
# None of them can reach a file, a process or an import.
ALLOWED = frozenset(
    {
        *((core, "_reconstruct") for core in ("numpy.core.multiarray", "numpy._core.multiarray")),
        *((core, "scalar") for core in ("numpy.core.multiarray", "numpy._core.multiarray")),
        *((core, "_frombuffer") for core in ("numpy.core.numeric", "numpy._core.numeric")),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _DataUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], name: str, encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise DataError(
                f"{self.name} names {module}.{name}, which a data file has no reason to hold; "
                "refused without running it (only numpy arrays, lists, dicts, numbers and "
                "strings are read)"
            )
        return super().find_class(module, name)


def read_pickle(file: IO[bytes], name: str, encoding: str = "latin1") -> Any:
    """The object pickled in `file` (named `name` in errors), built from allowed types only.

    latin1: Python 2 pickles (MetaOptNet's, CIFAR's, tieredImageNet's) hold numpy's bytes and
    all text as `str`; latin1 maps them back byte for byte (Python 3 pickles are unaffected).
    "bytes" keeps Python 2 `str` as bytes, which numpy arrays then use in place, not copied:
    half the peak memory for a pickle that is all array data and no text.
    """
    head = file.read(256)
    file.seek(0)
    if head.lstrip().lower().startswith((b"<!doctype", b"<html")):
        raise DataError(f"{name} is an HTML page, not a pickle (a failed download?); replace it")
    try:
        return _DataUnpickler(file, name, encoding).load()
    except DataError:
        raise
    except EOFError as err:
        raise DataError(f"{name} is truncated (the file ends too early); replace it") from err
    except Exception as err:  # any failure to parse means the file is not what it should be
        if "truncated" in str(err):
            raise DataError(f"{name} is truncated (the file ends too early); replace it") from err
        reason = " ".join(str(err).split())  # one line, whatever the parser said
        raise DataError(
            f"{name} is not a readable pickle ({type(err).__name__}: {reason})"
        ) from err


def load_pickle(path: Path, encoding: str = "latin1") -> Any:
    """The object pickled in the file at `path`; see `read_pickle`."""
    try:
        file = open(path, "rb")  # noqa: SIM115 (its errors, not read_pickle's, are caught here)
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}") from err
    with file:
        return read_pickle(file, str(path), encoding)
