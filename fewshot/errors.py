"""Errors that are the user's to fix: reported as one line naming the key, never a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("fewshot")


class ConfigError(ValueError):
    """A config value out of range, or one that does not fit the data or the checkpoint."""


class DataError(OSError):
    """Data missing (the message says how to get it) or unreadable (the message names the file)."""


@contextmanager
def reported_as_one_line() -> Iterator[None]:
    """Turn a user error into a one-line message on stderr and exit status 2."""
    try:
        yield
    except (ConfigError, DataError) as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
