"""Reading a checkpoint back: as data only (tensors and plain values), its run config rebuilt by
fewshot.checkpoints.format, refused if it holds NaN or does not fit the config it is used with."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fewshot.checkpoints.format import current_state_dict, upgraded
from fewshot.config import scores_any_way
from fewshot.errors import ConfigError, DataError
from fewshot.experiments.runs import Run

log = logging.getLogger(__name__)

# What fixes the shapes of a model's parameters: a checkpoint fits a config only if these match
# (`way` but for a learner that scores any way: model_keys).
MODEL_KEYS = ("algo.name", "way", "data.channels", "data.image_size", "backbone")
# Settings a resumed run may change without notice (how it runs, not what it learns).
OPERATIONAL_KEYS = ("ckpt_path", "trainer", "data.root", "data.cache_dir", "data.download")
# What every run config train.py stored holds, since the first checkpoints: evaluation and
# resuming read them without a default.
STORED_KEYS = (
    "way",
    "shot",
    "query",
    "val_episodes",
    "algo.name",
    "data.name",
    "backbone._target_",
    "trainer.max_steps",
    "trainer.val_check_interval",
)


def load_checkpoint(
    path: str | Path, key: str = "ckpt", state: tuple[str, ...] = ("state_dict",)
) -> tuple[DictConfig, dict[str, Any]]:
    """The run config stored in a fewshot checkpoint, rebuilt on fewshot's own config tree
    (stored_config.upgraded: nothing in it is imported or resolved), and the checkpoint itself
    (read by `read_as_data`). Refused if a floating tensor of its `state` entries is not
    finite. `key` is the config key that named the file, for the error messages."""
    checkpoint = read_as_data(path, key)
    path = Path(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("fewshot_config"), dict):
        raise ConfigError(
            f"{key}={path} was not written by fewshot's train.py (no run config in it)"
        )
    raw = checkpoint["fewshot_config"]
    missing = [k for k in STORED_KEYS if _stored(raw, k) is None]
    missing += ["state_dict"] * (not isinstance(checkpoint.get("state_dict"), dict))
    if missing:
        raise ConfigError(
            f"{key}={path} was not written by fewshot's train.py (it lacks {', '.join(missing)})"
        )
    stored = upgraded(raw, f"{key}={path}")
    for entry in state:
        bad = first_non_finite(checkpoint.get(entry), entry)
        if bad is not None:
            raise DataError(
                f"{key}={path} is refused: {bad} holds NaN or infinite values (the run had "
                "diverged when it was written); use an earlier checkpoint of the run"
            )
    return stored, checkpoint


def _stored(raw: dict[str, Any], key: str) -> Any:
    """The value at a dotted key of a stored config as unpickled; None where absent."""
    node: Any = raw
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def first_non_finite(tree: Any, name: str) -> str | None:
    """The name (dotted, as in `tree`) of the first floating tensor in `tree` (nested dicts and
    lists, as a checkpoint holds them) with a NaN or an infinity; None if all are finite."""
    if isinstance(tree, torch.Tensor):
        finite = not tree.is_floating_point() or bool(torch.isfinite(tree).all())
        return None if finite else name
    items = (
        tree.items()
        if isinstance(tree, dict)
        else enumerate(tree)
        if isinstance(tree, list | tuple)
        else ()
    )
    for child, value in items:
        found = first_non_finite(value, f"{name}.{child}")
        if found is not None:
            return found
    return None


def read_as_data(path: str | Path, key: str = "ckpt") -> Any:
    """A torch file read as data (torch's weights-only unpickler): checkpoints are shared, and
    unpickling anything else would run whatever code the file names. Every checkpoint fewshot
    writes (both algorithms, bf16-mixed, DDP, `trainer.max_time`'s Timer, a resumed run, those
    written before this reader) holds only tensors, OrderedDicts and Python's plain values, which
    that unpickler admits by default, so no global is added to its allow-list."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}={path} is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        code = _unsafe_globals(path)
        if code:
            raise DataError(
                f"{key}={path} is refused: loading it would call {', '.join(code)}, which is "
                "code, not data (fewshot reads checkpoints as tensors and plain values only)"
            ) from err
        raise DataError(
            f"{key}={path} cannot be read as data: it is damaged, not a checkpoint, "
            "or holds more than tensors and plain values"
        ) from err
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"{key}={path} cannot be read ({reason}): it is damaged or not a checkpoint"
        ) from err


def _unsafe_globals(path: Path) -> list[str]:
    """The functions and classes a torch.save file names beyond what a weights-only load
    admits, found by reading the pickle's opcodes, not by running them; [] if it cannot tell."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    # Not a torch.save zip (a bare pickle), or opcodes it cannot parse (a damaged file): no
    # names to give, and the caller's message says the file is damaged.
    except (ValueError, RuntimeError, pickle.UnpicklingError):
        return []


_COPY = object()  # an entry that copies another key (`num_classes: ${way}`)


def _leaves(cfg: DictConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    """Dotted key -> resolved value for each of `keys` and, for a group, each of its entries."""
    leaves = {}
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, DictConfig):
            for name in value:
                copy = OmegaConf.is_interpolation(value, name)
                leaves[f"{key}.{name}"] = _COPY if copy else value[name]
        else:
            leaves[key] = value
    return leaves


def _differences(cfg: DictConfig, stored: DictConfig, keys: tuple[str, ...]) -> list[str]:
    """`key=value (checkpoint: value)` for each key whose value differs; an entry that copies
    another key in `cfg` is left to that key."""
    mine, theirs = _leaves(cfg, keys), _leaves(stored, keys)
    return [
        f"{key}={mine.get(key)} (checkpoint: {theirs.get(key)})"
        for key in dict.fromkeys([*mine, *theirs])
        if mine.get(key) is not _COPY and mine.get(key) != theirs.get(key)
    ]


def model_keys(cfg: DictConfig, stored: DictConfig) -> tuple[str, ...]:
    """MODEL_KEYS, less `way` where both `cfg` and the checkpoint's `stored` config name a
    learner that scores any way (ProtoNet: no weight of it is sized by the way)."""
    if scores_any_way(cfg) and scores_any_way(stored):
        return tuple(k for k in MODEL_KEYS if k != "way")
    return MODEL_KEYS


def check_checkpoint_fits(
    cfg: DictConfig, stored: DictConfig, key: str, path: str | Path, hint: str
) -> None:
    """Raise ConfigError if the model that `cfg` builds differs from the checkpoint's (way,
    backbone, image size): caught here, the user gets the keys, not a state-dict size error.
    A learner that scores any way fits at any way."""
    differences = _differences(cfg, stored, model_keys(cfg, stored))
    if differences:
        raise ConfigError(
            f"{key}={path} does not fit this config: {', '.join(differences)}; {hint}"
        )


def check_state_fits(module: nn.Module, state_dict: dict[str, Any], key: str, path) -> None:
    """Raise ConfigError naming the first parameter whose shape differs from the checkpoint's
    (for what MODEL_KEYS do not cover, e.g. an algorithm's own meta-parameters)."""
    own = module.state_dict()
    for name in sorted(own.keys() | state_dict.keys()):
        if name not in state_dict or name not in own:
            where = "this config's model" if name in own else "the checkpoint"
            raise ConfigError(f"{key}={path} does not fit this config: only {where} has {name}")
        if own[name].shape != state_dict[name].shape:
            raise ConfigError(
                f"{key}={path} does not fit this config: {name} has shape "
                f"{list(state_dict[name].shape)} in the checkpoint, {list(own[name].shape)} here"
            )


def check_resumable(cfg: DictConfig, module: nn.Module) -> int:
    """Refuse `ckpt_path` if it does not fit the model `cfg` builds; warn about other settings
    that differ from the checkpoint's (the resumed run then differs from an uninterrupted one).
    Returns the checkpoint's step."""
    path = Path(cfg.ckpt_path)
    # The optimiser's state too: Adam's moments would carry a NaN into every later step.
    stored, checkpoint = load_checkpoint(
        path, key="ckpt_path", state=("state_dict", "optimizer_states")
    )
    missing = [k for k in ("global_step", "optimizer_states", "loops") if k not in checkpoint]
    if missing:
        raise ConfigError(
            f"ckpt_path={path} holds weights but no training state ({', '.join(missing)}): "
            "it cannot resume a run"
        )
    recorded = Run.of_checkpoint(path).overrides()
    if recorded is None:
        hint = "resume with the settings the checkpoint was trained with"
    else:
        own = " ".join(o for o in recorded if not o.startswith(("ckpt_path=", "hydra.")))
        hint = f"resume with the run's own settings (its overrides: {own or 'none'})"
    check_checkpoint_fits(cfg, stored, "ckpt_path", path, hint)
    check_state_fits(module, current_state_dict(checkpoint["state_dict"]), "ckpt_path", path)
    skip = OPERATIONAL_KEYS + model_keys(cfg, stored)
    keys = tuple(k for k in _leaves(cfg, tuple(cfg)) if not k.startswith(skip))
    changed = _differences(cfg, stored, keys)
    if changed:
        log.warning("resuming %s with changed settings: %s", path, ", ".join(changed))
    return checkpoint["global_step"]
