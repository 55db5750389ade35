"""Every config key's range and every rule across keys, in one place, checked before any work;
which `algo` keys are the learner's; and a stored run config brought up to the keys the current
code reads."""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict

from fewshot.checkpoints.format import CONF, schedule_class  # noqa: F401 (CONF: the entry points read it here)
from fewshot.errors import ConfigError, instantiate
from fewshot.methods.learner import BATCH_NORM_MODES, Learner
from fewshot.methods.tasks import TASK_BATCHING
from fewshot.models.conv4 import Conv4, conv_output_size, smallest_image_size
from fewshot.models.functional import FunctionalBackbone

log = logging.getLogger(__name__)

Rule = tuple[Callable[[Any], bool], str]  # (test, what is allowed)


def int_at_least(low: int) -> Rule:
    return (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low
    ), f"an integer >= {low}"


def one_of(*choices: Any) -> Rule:
    return (lambda v: v in choices), " or ".join(map(str, choices))


_POSITIVE: Rule = (
    (lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v > 0),
    "a number > 0",
)
_BOOLEAN: Rule = ((lambda v: isinstance(v, bool)), "true or false")
_NAMES: Rule = (
    (lambda v: v is None or (OmegaConf.is_list(v) and all(isinstance(n, str) for n in v))),
    "null (all parameters) or a list of parameter-name prefixes, e.g. [head]",
)

# A key absent from the config (another algorithm's) is skipped.
RULES: dict[str, Rule] = {
    "way": int_at_least(2),
    "shot": int_at_least(1),
    "query": int_at_least(1),
    "val_episodes": int_at_least(2),
    "algo.meta_lr": _POSITIVE,
    "algo.base_lr": _POSITIVE,
    "algo.meta_batch_size": int_at_least(1),
    "algo.inner_steps": int_at_least(1),
    "algo.inner_steps_test": int_at_least(1),
    "algo.grad_clip": ((lambda v: v is None or _POSITIVE[0](v)), "null or a number > 0"),
    "algo.hidden_size": int_at_least(1),
    "algo.inner_epochs": int_at_least(1),
    "algo.inner_batch_size": int_at_least(1),
    "algo.learn_init": _BOOLEAN,
    "algo.first_order": _BOOLEAN,
    "algo.task_batching": one_of(*TASK_BATCHING),
    "algo.checkpoint_inner": _BOOLEAN,
    "algo.adapt_only": _NAMES,
    "algo.lslr": _BOOLEAN,
    "algo.per_step_norm": _BOOLEAN,
    "algo.msl_iterations": int_at_least(0),
    "algo.first_order_iterations": int_at_least(0),
    "algo.batch_norm_train": one_of(*BATCH_NORM_MODES),
    "algo.batch_norm_test": one_of(*BATCH_NORM_MODES),
    "algo.compile": _BOOLEAN,
    "test_after_training": _BOOLEAN,
    "threads": (
        (lambda v: v is None or v == "auto" or int_at_least(1)[0](v)),
        "auto, null (torch's default) or an integer >= 1",
    ),
    # Lightning's names. 16-mixed is left out: its loss scaling is untested with the per-task
    # backward passes (and bf16 needs none).
    "trainer.precision": one_of("32-true", "bf16-mixed"),
    "trainer.max_steps": int_at_least(1),
    "trainer.val_check_interval": int_at_least(1),
    "backbone.channels": int_at_least(1),
    "backbone.padding": int_at_least(0),
    "backbone.stride": int_at_least(1),
    "backbone.channels_last": (
        (lambda v: isinstance(v, bool) or v == "auto"),
        "true, false or auto",
    ),
    "data.image_size": int_at_least(1),
    "data.workers": int_at_least(0),
    "data.on_device": ((lambda v: isinstance(v, bool) or v == "auto"), "true, false or auto"),
}

# Settings that cannot run together: (setting, setting, how they clash, why, what to do).
EXCLUSIVE: tuple[tuple[tuple[str, Any], tuple[str, Any], str, str, str], ...] = (
    (
        ("algo.checkpoint_inner", True),
        ("algo.first_order", True),
        "has nothing to checkpoint with",
        "first order keeps no graph through the inner steps",
        "set one of them to false",
    ),
    (
        ("backbone.channels_last", True),
        ("algo.task_batching", "vmap"),
        "cannot run with",
        "vmap keeps tensors in the standard layout",
        "set backbone.channels_last=auto or false",
    ),
    (
        ("algo.checkpoint_inner", True),
        ("algo.task_batching", "vmap"),
        "cannot run with",
        "torch.func.vmap does not batch its recomputation, a custom autograd Function",
        "set algo.checkpoint_inner=false or algo.task_batching=loop or grouped",
    ),
    (
        ("trainer.precision", "bf16-mixed"),
        ("algo.task_batching", "vmap"),
        "cannot run with",
        "torch.func.grad under autocast fails with a dtype mismatch in torch 2.15",
        "set trainer.precision=32-true or algo.task_batching=loop",
    ),
    (
        ("algo.compile", True),
        ("algo.task_batching", "vmap"),
        "cannot run with",
        "the batched tasks run through torch.func, uncompiled",
        "set algo.compile=false or algo.task_batching=loop",
    ),
    (
        ("algo.compile", True),
        ("algo.task_batching", "grouped"),
        "cannot run with",
        "compiled passes run task by task",
        "set algo.compile=false or algo.task_batching=loop",
    ),
)


def check_value(key: str, value: Any, rule: Rule) -> None:
    """Raise ConfigError naming `key` unless `value` passes the rule's test."""
    ok, allowed = rule
    if not ok(value):
        raise ConfigError(f"{key}={value!r} is out of range: expected {allowed}")


def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default="<absent>")


def check_exclusive(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first pair of settings of `cfg` that cannot run together
    (EXCLUSIVE); keys `cfg` lacks clash with nothing."""
    for (a, a_value), (b, b_value), clash, why, fix in EXCLUSIVE:
        if _select(cfg, a) == a_value and _select(cfg, b) == b_value:
            a_text, b_text = (f"{k}={str(v).lower()}" for k, v in ((a, a_value), (b, b_value)))
            raise ConfigError(f"{a_text} {clash} {b_text} ({why}): {fix}")


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first key whose value is out of range or that cannot run
    with another's."""
    for key, rule in RULES.items():
        value = _select(cfg, key)
        if value != "<absent>":
            check_value(key, value, rule)
    check_exclusive(cfg)
    if cfg.trainer.val_check_interval > cfg.trainer.max_steps:
        raise ConfigError(
            f"trainer.val_check_interval={cfg.trainer.val_check_interval} exceeds "
            f"trainer.max_steps={cfg.trainer.max_steps}: the run would never validate"
        )
    for key, what in (
        ("algo.msl_iterations", "the multi-step loss would never finish annealing"),
        ("algo.first_order_iterations", "the meta-gradient would never turn second order"),
    ):
        value = OmegaConf.select(cfg, key, default=0)
        if value and value >= cfg.trainer.max_steps:
            raise ConfigError(
                f"{key}={value} is not below trainer.max_steps={cfg.trainer.max_steps}: {what}; "
                f"lower {key} (0 turns it off)"
            )
    check_backbone_fits(cfg)
    schedule = OmegaConf.select(cfg, "algo.meta_lr_schedule", default=None)
    if schedule is not None:
        schedule_class(OmegaConf.to_container(schedule, resolve=True))
    if _select(cfg, "trainer.precision") == "bf16-mixed":
        warn_if_bf16_is_emulated(cfg.trainer.get("accelerator", "auto"))


def check_declared_keys(cfg: DictConfig, declared: DictConfig, script: str) -> None:
    """Raise ConfigError naming a key of `cfg` that `declared` (the script's own config file)
    lacks: Hydra's `+key=value` adds any key, and one the script does not read would change
    nothing while the result seemed to follow it."""
    config = OmegaConf.to_container(cfg, resolve=False)
    config.pop("hydra", None)  # Hydra's own settings, which Hydra reads
    _check_declared(config, OmegaConf.to_container(declared, resolve=False), script, "")


def _check_declared(config: dict, declared: dict, script: str, parent: str) -> None:
    for name, value in config.items():
        key = f"{parent}.{name}" if parent else name
        if name not in declared:
            has = ", ".join(k for k in declared if k != "hydra")
            raise ConfigError(
                f"{key} is not a config key of {script}, so it would change nothing "
                f"({parent or 'the top level'} has: {has})"
            )
        if isinstance(value, dict) and isinstance(declared[name], dict):
            _check_declared(value, declared[name], script, key)


# CPU flags (Linux /proc/cpuinfo) of native bfloat16 arithmetic: x86's AVX-512 BF16 and AMX,
# Arm's BF16 extension. Without one, autocast's bfloat16 kernels are emulated.
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags; None where /proc/cpuinfo does not list them (not Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):  # x86, Arm
            return frozenset(value.split())
    return None


def runs_on_cpu(accelerator: str) -> bool:
    """Whether Lightning runs `trainer.accelerator` on the CPU (`auto`: when torch has no GPU)."""
    if accelerator == "auto":
        return not (torch.cuda.is_available() or torch.backends.mps.is_available())
    return accelerator == "cpu"


def warn_if_bf16_is_emulated(accelerator: str) -> None:
    """Warn (once) that trainer.precision=bf16-mixed is emulated on a CPU without native
    bfloat16: there it is slower than float32 and, not being the papers' precision, gains
    nothing. A GPU run, or a CPU whose flags cannot be read, is left alone."""
    flags = cpu_flags()
    if runs_on_cpu(accelerator) and flags is not None and not flags & NATIVE_BF16_FLAGS:
        _warn_once(
            "trainer.precision=bf16-mixed on a CPU without native bfloat16 (AVX-512 BF16 or "
            "AMX) is emulated: a MAML Omniglot meta-iteration took 1.7x (AVX-512) to 5.2x "
            "(AVX2) as long as in trainer.precision=32-true, which is faster here"
        )


@functools.cache
def _warn_once(message: str) -> None:
    log.warning("%s", message)


def check_backbone_fits(cfg: DictConfig) -> None:
    """Raise ConfigError if Conv4's blocks shrink the images to nothing."""
    backbone = cfg.backbone
    if backbone.get("_target_") != f"{Conv4.__module__}.{Conv4.__name__}":
        return
    blocks, padding, stride, pool = (
        backbone.get("blocks", 4),
        backbone.padding,
        backbone.stride,
        backbone.pool,
    )
    size = cfg.data.image_size
    for block in range(1, blocks + 1):
        size = conv_output_size(size, padding, stride, pool)
        if size < 1:
            smallest = smallest_image_size(blocks, padding, stride, pool)
            other = ["backbone.stride=1"] * (stride > 1) + ["backbone.pool=false"] * pool
            raise ConfigError(
                f"backbone: block {block} of {blocks} leaves no spatial size for "
                f"data.image_size={cfg.data.image_size} (backbone.padding={padding}, "
                f"backbone.stride={stride}, backbone.pool={pool}): expected "
                f"data.image_size >= {smallest} with these" + "".join(f", or {o}" for o in other)
            )


def backbone_config(cfg: DictConfig) -> DictConfig:
    """The backbone's arguments, `auto` choices resolved for this run: vmap cannot batch
    channels-last tensors, so `auto` means the standard layout there. Its `name` (which option
    of conf/backbone/ it is) is not an argument."""
    backbone = cfg.backbone.copy()
    with open_dict(backbone):
        backbone.pop("name", None)
    if cfg.algo.get("task_batching") == "vmap" and backbone.get("channels_last") == "auto":
        backbone.channels_last = False
    return backbone


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's config as plain data, with data.root absolute, as stored in checkpoints."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config["data"]["root"] = os.path.abspath(os.path.expanduser(config["data"]["root"]))
    return config


def check_episode_fits(
    num_classes: int, per_class: int, split: str, way: int, shot: int, query: int
) -> None:
    """Raise ConfigError unless a split of `num_classes` classes of `per_class` images holds
    `way` classes and `shot + query` images in each."""
    if way > num_classes:
        raise ConfigError(
            f"way={way} is out of range: expected 2..{num_classes} "
            f"(the meta-{split} split has {num_classes} classes)"
        )
    if shot + query > per_class:
        raise ConfigError(
            f"shot + query = {shot} + {query} is out of range: expected at most "
            f"{per_class}, the images per class of the meta-{split} split; lower shot or query"
        )


# `algo` keys of the outer loop and of how tasks are scored (the LightningModule's, the sampler's,
# the task scorer's); the others are the arguments of the learner that `algo._target_` names.
OUTER_LOOP_KEYS = (
    "name",
    "meta_lr",
    "meta_lr_schedule",
    "meta_batch_size",
    "grad_clip",
    "task_batching",
    "compile",
)


def learner_from(algo: DictConfig, backbone: FunctionalBackbone) -> Learner:
    """The learner `algo._target_` names, given every `algo` key but the outer loop's."""
    arguments = {k: v for k, v in algo.items() if k not in OUTER_LOOP_KEYS}
    try:
        return instantiate(arguments, backbone=backbone, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(cause))
        if isinstance(cause, TypeError) and unknown:
            raise ConfigError(
                f"algo.{unknown[1]} is not a setting of algo={algo.get('name')} "
                f"({algo.get('_target_')}): remove it"
            ) from None
        raise
