"""The vocabulary in which each component declares its settings and their ranges, beside its code.

A component (a method class, a backbone class, the datamodule, the outer loop) declares
`settings: dict[str, Rule]`: each key it reads, relative to where it stands in the run config
(`base_lr`, not `algo.base_lr`), and what values are allowed. fewshot.config collects them,
prefixed by their place, and checks a run's config against them before any work: a new method
or backbone brings its own and fewshot.config does not change. A backbone class may also have
`check_fits(backbone, image_size)`, raising ConfigError when its settings cannot run on images
of that side (Conv4's blocks shrinking them to nothing).

A leaf: it imports nothing of fewshot but errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import OmegaConf

from fewshot.errors import ConfigError

Rule = tuple[Callable[[Any], bool], str]  # (test, what is allowed)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def int_at_least(low: int) -> Rule:
    return (lambda v: _is_int(v) and v >= low), f"an integer >= {low}"


def one_of(*choices: Any) -> Rule:
    return (lambda v: v in choices), " or ".join(map(str, choices))


def _is_positive(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v > 0


POSITIVE: Rule = (_is_positive, "a number > 0")
POSITIVE_OR_NULL: Rule = ((lambda v: v is None or _is_positive(v)), "null or a number > 0")
BOOLEAN: Rule = ((lambda v: isinstance(v, bool)), "true or false")
BOOLEAN_OR_AUTO: Rule = ((lambda v: isinstance(v, bool) or v == "auto"), "true, false or auto")
NAMES: Rule = (
    (lambda v: v is None or (OmegaConf.is_list(v) and all(isinstance(n, str) for n in v))),
    "null (all parameters) or a list of parameter-name prefixes, e.g. [head]",
)


def check_value(key: str, value: Any, rule: Rule) -> None:
    """Raise ConfigError naming `key` unless `value` passes the rule's test."""
    ok, allowed = rule
    if not ok(value):
        raise ConfigError(f"{key}={value!r} is out of range: expected {allowed}")


def prefixed(place: str, settings: dict[str, Rule]) -> dict[str, Rule]:
    """`settings` (keys relative to `place`) under their full keys, e.g. `algo.base_lr`."""
    return {f"{place}.{key}": rule for key, rule in settings.items()}
