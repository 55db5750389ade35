"""How the entry points report a user's error: one line on stderr and exit status 2, for our own
errors, Hydra's (an unknown option, key or override) and a config file that is not YAML."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import yaml
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException

from fewshot.errors import user_error

log = logging.getLogger("fewshot")


@contextmanager
def reported_as_one_line() -> Iterator[None]:
    """Turn a user error into a one-line message on stderr and exit status 2."""
    try:
        yield
    except Exception as err:
        yours = user_error(err)
        if yours is None:
            raise
        _to_log_files(f"{yours}")
        print(f"error: {yours}", file=sys.stderr)
        sys.exit(2)


def _to_log_files(message: str) -> None:
    """Record an error in the run's log file (Hydra's job log) but not on the console, where
    the `error:` line says it once."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


# Options that Hydra plugins provide, and what to install for them.
PLUGIN_OPTIONS = {
    "hydra/launcher/submitit_slurm": ("hydra/launcher=slurm", "hydra-submitit-launcher", "cluster"),
    "hydra/launcher/joblib": ("hydra/launcher=parallel", "hydra-joblib-launcher", "cluster"),
    "hydra/sweeper/optuna": ("sweep=optuna_lr", "hydra-optuna-sweeper", "sweep"),
}


def hydra_error_line(err: HydraException) -> str:
    """One line for an error Hydra raises while composing the config from the command line."""
    if isinstance(err, MissingConfigException) and err.missing_cfg_file in PLUGIN_OPTIONS:
        option, package, extra = PLUGIN_OPTIONS[err.missing_cfg_file]
        return f'{option} needs {package}, which is not installed: pip install -e ".[{extra}]"'
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        choices = f"; choose one of: {', '.join(err.options)}" if err.options else ""
        return f"{group}={option} is not an option of the config group '{group}'{choices}"
    if isinstance(err, OverrideParseException):
        reason = err.message.splitlines()[0]
        return (
            f"cannot parse the override {err.override!r} ({reason}); see "
            "https://hydra.cc/docs/advanced/override_grammar/basic/"
        )
    cause = err.__cause__
    full_key = getattr(cause, "full_key", None)
    if isinstance(cause, OmegaConfBaseException) and full_key and "not in struct" in str(cause):
        from fewshot.checkpoints.format import REPLACED  # which imports this module

        if full_key in REPLACED:
            new, values = REPLACED[full_key]
            choices = " or ".join(f"{new}={v}" for v in values.values())
            return f"{full_key} is no longer a config key: it became {new} (here: {choices})"
        parent, _, _ = full_key.rpartition(".")
        keys = [k for k in (cause.parent_node or {}) if k != "hydra"]
        return (
            f"{full_key} is not a config key ({parent or 'the top level'} has: "
            f"{', '.join(map(str, keys))})"
        )
    # Anything else: Hydra's own text, less the config search path it lists after the message,
    # with the reason of a value the config's schema refused ("could not be converted to ...").
    lines = str(err).split("Config search path:")[0].splitlines()
    if isinstance(cause, OmegaConfBaseException) and str(cause).strip():
        lines.append(str(cause).strip().splitlines()[0])
    return "; ".join(line.strip() for line in lines if line.strip())


def yaml_error_line(err: yaml.YAMLError) -> str:
    """One line for a config file that is not valid YAML: the file, the line and the problem."""
    mark = getattr(err, "problem_mark", None)
    where = (
        f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark else "a config file"
    )
    problem = " ".join(str(getattr(err, "problem", None) or err).split())
    context = getattr(err, "context", None)
    return f"{where} is not valid YAML: {problem}" + (f" ({context})" if context else "")


def run_entry_point(main: Callable[[], Any]) -> None:
    """Run a `@hydra.main` function; an unknown option, key or override syntax is one line on
    stderr and exit status 2, as our own config errors are, instead of Hydra's report."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the user asked for Hydra's full report
        main()
        return
    # Hydra prints its report and exits unless this is set; with it, its errors reach us.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except HydraException as err:
        yours = user_error(err)
        line = str(yours) if yours is not None else hydra_error_line(err)
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    except yaml.YAMLError as err:  # a config file of conf/ that is not YAML: Hydra lets it through
        print(f"error: {yaml_error_line(err)}", file=sys.stderr)
        sys.exit(2)

    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
