"""A run config read back from a checkpoint: data, never code.

A checkpoint's `fewshot_config` is plain strings, numbers and dicts that anyone can edit, and
the config keys Hydra acts on (`_target_`, `_args_`, `${...}` interpolations) would turn those
strings into imports, calls and environment reads. So a stored config is checked as a whole
before anything reads it, and then rebuilt on fewshot's own config tree:

- each component (`algo`, `data`, `backbone`) is the option of `conf/<group>/` its `name`
  chooses among the files there; a stored `_target_` is never imported, only looked up as a
  string in PAST_TARGETS, the targets fewshot has written for that option, and replaced by
  the option's own;
- `algo.meta_lr_schedule` names a class of `torch.optim.lr_scheduler` by attribute, with plain
  arguments, and is built by `meta_lr_schedule`, not by Hydra;
- no other Hydra key and no `${...}` is accepted anywhere in it;
- keys that moved or were replaced since (MOVED, REPLACED) are brought to their new place.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.optim import Optimizer, lr_scheduler

from fewshot.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"

# Every `_target_` fewshot has written for each option of a group, fewshot's own first. A class
# or function that moves adds its old path here, so that checkpoints written before the move
# still load (tests/test_stored_config.py checks the first entry against conf/).
PAST_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "algo": {
        "maml": ("fewshot.methods.maml.MAML", "fewshot.learners.maml.MAML"),
        "anil": ("fewshot.methods.maml.MAML", "fewshot.learners.maml.MAML"),
        "metasgd": ("fewshot.methods.metasgd.MetaSGD", "fewshot.learners.metasgd.MetaSGD"),
        "mamlpp": ("fewshot.methods.mamlpp.MAMLPlusPlus", "fewshot.learners.mamlpp.MAMLPlusPlus"),
        "metalstm": ("fewshot.methods.metalstm.MetaLSTM", "fewshot.learners.metalstm.MetaLSTM"),
        "protonet": ("fewshot.methods.protonet.ProtoNet",),
    },
    "data": {
        "omniglot": ("fewshot.data.omniglot.omniglot",),
        "miniimagenet": ("fewshot.data.miniimagenet.load_miniimagenet",),
        "tieredimagenet": ("fewshot.data.tieredimagenet.load_tieredimagenet",),
        "cifarfs": ("fewshot.data.cifar.load_cifarfs",),
        "fc100": ("fewshot.data.cifar.load_fc100",),
    },
    "backbone": {
        "conv4": ("fewshot.models.conv4.Conv4",),
        "resnet12": ("fewshot.models.resnet12.ResNet12",),
    },
}
COMPONENTS = tuple(PAST_TARGETS)

# Keys that moved: old place -> new place.
MOVED = {"trainer.threads": "threads", "trainer.compile": "algo.compile"}
# Keys replaced by one of other values: old key -> (new key, old value -> new value).
REPLACED = {"algo.vmap_tasks": ("algo.task_batching", {True: "vmap", False: "loop"})}

SCHEDULE = "algo.meta_lr_schedule"
SCHEDULES = "torch.optim.lr_scheduler"
# The only places a Hydra key may stand in a stored config, and the keys allowed there.
_HYDRA_KEYS_ALLOWED = {
    **{group: {"_target_"} for group in COMPONENTS},
    SCHEDULE: {"_target_", "_partial_"},
}
_HYDRA_KEY = re.compile(r"^_\w+_$")
_OPTION_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")
_PLAIN = (str, int, float, bool, type(None))


def options(group: str) -> list[str]:
    """The options of a config group: the files of conf/<group>/."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _shown(value: Any) -> str:
    """A stored value for a message: plain values as they are, anything else by its type (an
    object's repr would say nothing to the user), cut short."""
    text = repr(value) if isinstance(value, _PLAIN) else f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


class _Refusal:
    """Raises ConfigError in one line naming the file, the stored key and its value."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __call__(self, key: str, value: Any, why: str) -> ConfigError:
        return ConfigError(
            f"{self.source} is refused: its stored config has {key}={_shown(value)}, {why}"
        )


def check_stored_config(raw: Any, source: str) -> None:
    """Raise ConfigError unless `raw` (a checkpoint's `fewshot_config`, as unpickled) is plain
    data fewshot can rebuild a run from without importing or resolving anything in it.
    `source`: how the message names the file, e.g. `ckpt=<path>`."""
    refuse = _Refusal(source)
    if not isinstance(raw, Mapping):
        raise refuse("fewshot_config", raw, "which is not a mapping of config keys")
    _check_plain(raw, "", refuse)
    for group in COMPONENTS:
        node = raw.get(group)
        if not isinstance(node, Mapping):
            raise refuse(group, node, "where fewshot expects the group's settings")
        name = stored_name(group, node, refuse)
        target = node.get("_target_")
        if target is not None and target not in PAST_TARGETS[group][name]:
            own = PAST_TARGETS[group][name][0]
            raise refuse(
                f"{group}._target_",
                target,
                f"which is not a target fewshot has used for {group}.name={name} "
                f"(fewshot's own: {own})",
            )
    schedule = raw["algo"].get("meta_lr_schedule")
    if schedule is not None:
        schedule_class(schedule, refuse)


def _check_plain(node: Any, key: str, refuse: _Refusal) -> None:
    """Plain values only; Hydra keys only where _HYDRA_KEYS_ALLOWED admits them; no `${`."""
    if isinstance(node, Mapping):
        for name, value in node.items():
            child = f"{key}.{name}" if key else str(name)
            if not isinstance(name, str) or "${" in name:
                raise refuse(child, value, "whose key is not a plain config key")
            if _HYDRA_KEY.match(name) and name not in _HYDRA_KEYS_ALLOWED.get(key, ()):
                raise refuse(
                    child,
                    value,
                    "a Hydra key, which fewshot never stores there (a stored config may "
                    "name _target_ only at algo, data, backbone and algo.meta_lr_schedule)",
                )
            _check_plain(value, child, refuse)
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            _check_plain(value, f"{key}[{i}]", refuse)
    elif not isinstance(node, _PLAIN):
        raise refuse(key, node, "which is not a plain value (a string, number, bool or null)")
    elif isinstance(node, str) and "${" in node:
        raise refuse(
            key, node, "an interpolation, which a stored config never holds (it is resolved)"
        )


def stored_name(group: str, node: Mapping[str, Any], refuse: _Refusal | None = None) -> str:
    """The option of conf/<group>/ a stored group is: its `name`, or for a backbone stored
    before backbones had one, the option whose past targets hold its `_target_`."""
    refuse = refuse or _Refusal("the stored config")
    name = node.get("name")
    if name is None and group == "backbone":
        target = node.get("_target_")
        name = next((n for n, ts in PAST_TARGETS[group].items() if target in ts), None)
        if name is None:
            raise refuse("backbone._target_", target, "which is not a backbone fewshot has")
    if not isinstance(name, str) or not _OPTION_NAME.match(name) or name not in options(group):
        raise refuse(
            f"{group}.name",
            name,
            f"which is not an option of {group} ({', '.join(options(group))})",
        )
    if name not in PAST_TARGETS[group]:
        raise refuse(f"{group}.name", name, f"which has no entry in fewshot's table of {group}s")
    return name


def schedule_class(spec: Mapping[str, Any], refuse: _Refusal | None = None) -> type:
    """The `torch.optim.lr_scheduler` class `spec` (an `algo.meta_lr_schedule`) names, looked up
    by attribute on that module (never imported by path), once its arguments are checked plain."""
    refuse = refuse or _Refusal("the config")
    if not isinstance(spec, Mapping):
        raise refuse(SCHEDULE, spec, f"expected null or _target_: {SCHEDULES}.<class>")
    target = spec.get("_target_")
    prefix, _, attribute = str(target).rpartition(".")
    found = getattr(lr_scheduler, attribute, None) if prefix == SCHEDULES else None
    if not (isinstance(found, type) and issubclass(found, lr_scheduler.LRScheduler)):
        raise refuse(
            f"{SCHEDULE}._target_",
            target,
            f"which is not a learning-rate scheduler of {SCHEDULES} (e.g. {SCHEDULES}."
            "CosineAnnealingLR)",
        )
    if spec.get("_partial_") is not True:
        raise refuse(
            f"{SCHEDULE}._partial_",
            spec.get("_partial_"),
            "expected true (the module gives the scheduler its optimiser)",
        )
    for name, value in spec.items():
        values = value if isinstance(value, list | tuple) else [value]
        if not all(isinstance(v, _PLAIN) for v in values):
            raise refuse(f"{SCHEDULE}.{name}", value, "expected a plain value or a list of them")
    return found


def meta_lr_schedule(spec: DictConfig | None) -> Callable[[Optimizer], Any] | None:
    """The scheduler factory `algo.meta_lr_schedule` describes (None: a constant meta_lr)."""
    if spec is None:
        return None
    arguments = OmegaConf.to_container(spec, resolve=True)
    found = schedule_class(arguments)
    return functools.partial(
        found, **{k: v for k, v in arguments.items() if k not in ("_target_", "_partial_")}
    )


def group_option(group: str, name: str) -> DictConfig:
    """conf/<group>/<name>.yaml as Hydra composes it (its defaults list applied)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [f"{group}={name}"]
    if GlobalHydra.instance().is_initialized():  # inside train.py's or evaluate.py's app
        return compose("train", overrides=overrides)[group]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)[group]


def upgraded(raw: Mapping[str, Any], source: str = "the stored config") -> DictConfig:
    """A run config stored by any fewshot version (checked by check_stored_config), rebuilt on
    fewshot's config tree: moved keys moved; each component the option its name chooses, with
    fewshot's own `_target_` and the stored settings over the option's defaults (so a key added
    since takes its default)."""
    check_stored_config(raw, source)
    cfg = OmegaConf.create(dict(raw))
    for old, new in MOVED.items():
        group, key = old.split(".")
        if key in cfg.get(group, {}):
            OmegaConf.update(cfg, new, cfg[group].pop(key), force_add=True)
    for old, (new, values) in REPLACED.items():
        group, key = old.split(".")
        if key in cfg.get(group, {}):
            value = cfg[group].pop(key)
            if value not in values:
                raise _Refusal(source)(old, value, f"expected one of {list(values)}")
            OmegaConf.update(cfg, new, values[value], force_add=True)
    for group in COMPONENTS:
        name = stored_name(group, raw[group])
        settings = cfg[group]
        settings.pop("_target_", None)
        settings.name = name
        cfg[group] = OmegaConf.merge(group_option(group, name), settings)
    cfg.setdefault("threads", None)
    return cfg


# Names of the state dict before the core redesign -> now (Meta-LSTM's cell became its rule).
_RENAMED = (
    ("algorithm.lstm.", "learner.rule.lstm."),
    ("algorithm.forget_gate.", "learner.rule.forget_gate."),
    ("algorithm.input_gate.", "learner.rule.input_gate."),
    ("algorithm.", "learner."),
)
# Batch norm kept running statistics to carry the support set's to the query set; they are
# passed explicitly now, and the buffers are gone.
_DROPPED = ("running_mean", "running_var", "num_batches_tracked")


def current_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict of any fewshot version, in the names the current modules use."""
    current = {}
    for name, value in state_dict.items():
        if name.rsplit(".", 1)[-1] in _DROPPED and ".backbone." in name:
            continue
        old = next((o for o, _ in _RENAMED if name.startswith(o)), None)
        current[name if old is None else dict(_RENAMED)[old] + name[len(old) :]] = value
    return current
