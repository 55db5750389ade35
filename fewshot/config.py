"""A run's config checked before any work: the settings each component declares beside its code
(fewshot.settings says how), collected here for the learner and backbone classes the config
names, with the run's own keys and the rules across components; which keys a script declares;
and what the composition root builds from a checked config (the backbone's and the learner's
arguments, the config as stored in checkpoints)."""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict

from fewshot.checkpoints.format import CONF, PAST_TARGETS, schedule_class  # noqa: F401 (CONF: the entry points read it here)
from fewshot.data.datamodule import EpisodeDataModule
from fewshot.errors import ConfigError, instantiate
from fewshot.methods.learner import Learner
from fewshot.models.functional import FunctionalBackbone
from fewshot.settings import BOOLEAN, Rule, check_value, int_at_least, one_of, prefixed
from fewshot.training import threads
from fewshot.training.module import OUTER_LOOP_KEYS, OUTER_LOOP_SETTINGS

log = logging.getLogger(__name__)


def or_null(rule: Rule) -> Rule:
    """`rule`, or null."""
    test, allowed = rule
    return (lambda v: v is None or test(v)), f"null or {allowed}"


# The run's own keys, which no component owns: train.py's composition reads them. A key absent
# from the config is skipped.
RULES: dict[str, Rule] = {
    "way": int_at_least(2),
    "shot": int_at_least(1),
    "query": int_at_least(1),
    "train_way": or_null(int_at_least(2)),
    "train_query": or_null(int_at_least(1)),
    "val_episodes": int_at_least(2),
    "test_after_training": BOOLEAN,
    # Lightning's names. 16-mixed is left out: its loss scaling is untested with the per-task
    # backward passes (and bf16 needs none).
    "trainer.precision": one_of("32-true", "bf16-mixed"),
    "trainer.max_steps": int_at_least(1),
    "trainer.val_check_interval": int_at_least(1),
}


def component_class(cfg: DictConfig, group: str) -> type | None:
    """The class `cfg.<group>._target_` names (a target fewshot has since moved, as its own:
    PAST_TARGETS); None where the group names none."""
    target = OmegaConf.select(cfg, f"{group}._target_", default=None)
    if target is None:
        return None
    own = next((ts[0] for ts in PAST_TARGETS.get(group, {}).values() if target in ts), target)
    try:
        return hydra.utils.get_class(own)
    except (ImportError, ValueError) as err:
        raise ConfigError(f"{group}._target_={target!r} names no class: {err}") from None


def declared_settings(cfg: DictConfig) -> dict[str, Rule]:
    """Every key's range for the run `cfg` describes, by its full key: the run's own (RULES),
    and those declared by the outer loop, the learner and backbone classes `cfg` names, the
    datamodule and the threads."""
    return {
        **RULES,
        **prefixed("algo", OUTER_LOOP_SETTINGS),
        **prefixed("algo", getattr(component_class(cfg, "algo"), "settings", {})),
        **prefixed("backbone", getattr(component_class(cfg, "backbone"), "settings", {})),
        **prefixed("data", EpisodeDataModule.settings),
        **threads.SETTINGS,
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
        "torch.func.grad under autocast fails with a dtype mismatch",
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
    for key, rule in declared_settings(cfg).items():
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
    check_training_task(cfg)
    check_fits = getattr(component_class(cfg, "backbone"), "check_fits", None)
    if check_fits is not None:
        check_fits(cfg.backbone, cfg.data.image_size)
    schedule = OmegaConf.select(cfg, "algo.meta_lr_schedule", default=None)
    if schedule is not None:
        schedule_class(OmegaConf.to_container(schedule, resolve=True))
    if _select(cfg, "trainer.precision") == "bf16-mixed":
        warn_if_bf16_is_emulated(cfg.trainer.get("accelerator", "auto"))


def scores_any_way(cfg: DictConfig) -> bool:
    """Whether the learner `cfg` names has no weight sized by the way (a metric method: its
    class `any_way`), so that it trains at `train_way` and scores tasks of any way."""
    return getattr(component_class(cfg, "algo"), "any_way", False)


def training_task(cfg: DictConfig) -> tuple[int, int]:
    """The way and query of the meta-training tasks: train_way and train_query, or where null
    (or absent, in runs from before them) the test's way and query."""
    way = OmegaConf.select(cfg, "train_way", default=None)
    query = OmegaConf.select(cfg, "train_query", default=None)
    return (cfg.way if way is None else way), (cfg.query if query is None else query)


def check_training_task(cfg: DictConfig) -> None:
    """Raise ConfigError for a train_way other than way where the learner's head is sized by
    the way: it trains and tests at that one way."""
    train_way = OmegaConf.select(cfg, "train_way", default=None)
    if train_way is None or train_way == cfg.way or scores_any_way(cfg):
        return
    raise ConfigError(
        f"train_way={train_way} cannot train algo={cfg.algo.name}, whose head is sized by "
        f"way={cfg.way} (backbone.num_classes): it trains and tests at one way; leave "
        "train_way null (a metric method such as algo=protonet trains at another way)"
    )


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
            "AMX) is emulated: slower than float32 here, so trainer.precision=32-true is faster"
        )


@functools.cache
def _warn_once(message: str) -> None:
    log.warning("%s", message)


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


def learner_from(algo: DictConfig, backbone: FunctionalBackbone, **task: int) -> Learner:
    """The learner `algo._target_` names, given every `algo` key but the outer loop's, and
    `task` (a learner that scores any way: its tasks' `way` and `train_way`)."""
    arguments = {k: v for k, v in algo.items() if k not in OUTER_LOOP_KEYS}
    try:
        return instantiate(arguments, backbone=backbone, **task, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(cause))
        if isinstance(cause, TypeError) and unknown:
            raise ConfigError(
                f"algo.{unknown[1]} is not a setting of algo={algo.get('name')} "
                f"({algo.get('_target_')}): remove it"
            ) from None
        raise
