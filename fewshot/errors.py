"""Errors that are the user's to fix: reported as one line naming the key, never a traceback."""

from __future__ import annotations

import logging
from typing import Any

import hydra
from hydra.errors import (
    InstantiationException,
)
from omegaconf.errors import MissingMandatoryValue

log = logging.getLogger("fewshot")


class ConfigError(ValueError):
    """A config value out of range, or one that does not fit the data or the checkpoint."""


class DataError(OSError):
    """Data missing (the message says how to get it) or unreadable (the message names the file)."""


class TrainingDiverged(ArithmeticError):
    """The loss or a gradient became non-finite; the message names the step and the checkpoint."""


USER_ERRORS = (ConfigError, DataError, TrainingDiverged)


def user_error(err: BaseException) -> BaseException | None:
    """`err` or the error it wraps if it is the user's to fix (hydra.utils.instantiate wraps a
    backbone's ConfigError), else None: a bug or a crash."""
    while err is not None:
        if isinstance(err, USER_ERRORS):
            return err
        raised_in_child = from_child_process(err)
        if raised_in_child is not None:
            return raised_in_child
        if isinstance(err, MissingMandatoryValue):  # a `???` the command line did not set
            return ConfigError(f"{err.full_key} must be set, e.g. {err.full_key}=<value>")
        err = err.__cause__
    return None


def from_child_process(err: BaseException) -> BaseException | None:
    """The user error one of a run's processes raised (training shared over processes), which
    torch's launcher passes on as the text of its traceback only (ProcessRaisedException):
    rebuilt from its last line, `module.Class: message`. None for anything else."""
    if type(err).__name__ != "ProcessRaisedException":
        return None
    lines = [line for line in str(err).splitlines() if line.strip()]
    name, _, message = (lines[-1] if lines else "").partition(": ")
    for kind in USER_ERRORS:
        if name == f"{kind.__module__}.{kind.__qualname__}":
            return kind(message)
    return None


def instantiate(config: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, raising a user error the target raised as itself (Hydra wraps
    it in an InstantiationException, which would read as a crash)."""
    try:
        return hydra.utils.instantiate(config, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, USER_ERRORS):
            raise err.__cause__ from None
        raise
