"""Checkpoints: best on val/acc, the latest for resuming, each written whole or not at all;
reading them back as data only, and refusing one that does not fit the config before Lightning
loads it."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, Checkpoint, ModelCheckpoint
from torch import nn

from fewshot.data.files import atomic_path
from fewshot.errors import ConfigError, DataError
from fewshot.module import current_state_dict
from fewshot.runs import Run, best_val_acc
from fewshot.stored_config import upgraded

log = logging.getLogger(__name__)

# What fixes the shapes of a model's parameters: a checkpoint fits a config only if these match.
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file and renames it, so a crash never leaves a half-written one;
    reads through `read_as_data`, so Lightning's resume (`trainer.fit(ckpt_path=...)`) reads
    the file as data only, whatever `weights_only` Lightning or the environment asks for."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        # Lightning moves the state to the device itself once it has read the checkpoint. Not
        # only fewshot's checkpoints come here: ddp_spawn hands its weights back in a temporary
        # file of its own.
        return read_as_data(path, key="ckpt_path")


class LatestCheckpoint(Checkpoint):
    """Keeps `last.ckpt` at the latest validation and at the end of training.

    Lightning's own `save_last` writes only when a new best is saved (Lightning >= 2.6), which
    would resume a run from its best step instead of its last. Being a `Checkpoint`, Lightning
    runs it after the callbacks listed before it, the best-model `ModelCheckpoint` included, so
    the state it saves already holds this validation's best score.
    """

    def __init__(self, path: Path) -> None:
        self.path, self.saved_step = Path(path), -1

    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.global_step != self.saved_step and not trainer.sanity_checking:
            self.saved_step = trainer.global_step  # first: the checkpoint records its own step
            trainer.save_checkpoint(self.path, weights_only=False)  # all state: it resumes runs

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"saved_step": self.saved_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved_step = state_dict["saved_step"]


class BestCheckpoint(ModelCheckpoint):
    """Keeps `best.ckpt`, the checkpoint of the best val/acc so far, and its score across resumes.

    Lightning's own restores the best score only in the folder it was written in (its recorded
    `dirpath`): resumed after its folder was moved or copied, a run would start with none, and
    its next validation, however much worse, would replace best.ckpt and the result. This one
    restores the score and points the best path into its own checkpoints folder, wherever that
    now lives, whenever that folder holds the best checkpoint the score belongs to: a run
    resumed in its own folder from its last.ckpt.

    Resuming into a new folder (from best.ckpt, which runs.run_dir_of sends to a new run, or
    from a checkpoint outside a run's folder) starts with no best score: the new run's best.ckpt
    and result.json are of the models it trains, scored by its own validation (whose settings
    it may have changed); the checkpoint it started from keeps its score in its own run.
    """

    @property
    def state_key(self) -> str:
        # Lightning files a callback's state under its class name: checkpoints written with
        # ModelCheckpoint itself resume into this one, and this one's into it.
        own = super().state_key
        return ModelCheckpoint.__qualname__ + own.removeprefix(type(self).__qualname__)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        recorded, score = state_dict.get("best_model_path"), state_dict.get("best_model_score")
        if not recorded or score is None:
            return
        here = Path(self.dirpath) / Path(recorded).name
        if not here.is_file():  # a new folder: its best is of the models it trains
            return
        path = str(here)
        self.best_model_score, self.best_model_path = score, path
        self.best_k_models = {path: score}
        self.kth_best_model_path, self.kth_value = path, score


def checkpoint_callbacks(run_dir: Path) -> list[Callback]:
    run = Run(run_dir)
    best = BestCheckpoint(
        dirpath=run.checkpoints,
        filename=run.best_ckpt.stem,
        monitor="val/acc",
        mode="max",
        enable_version_counter=False,
    )
    return [best, LatestCheckpoint(run.last_ckpt)]


def fit_outcome(trainer: pl.Trainer) -> tuple[Any, int]:
    """The best val/acc (a tensor, number or None) and the step a finished fit reached.

    Under `ddp_spawn` the fit ran in spawned processes and Lightning hands this trainer back
    neither (only the best checkpoint's path): they are read from the latest checkpoint then,
    which the end of training wrote.
    """
    latest = next((c for c in trainer.callbacks if isinstance(c, LatestCheckpoint)), None)
    if trainer.global_step > 0 or latest is None or not latest.path.is_file():
        best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
        return best, trainer.global_step
    _, checkpoint = load_checkpoint(latest.path)
    return best_val_acc(checkpoint), checkpoint["global_step"]


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


def check_checkpoint_fits(
    cfg: DictConfig, stored: DictConfig, key: str, path: str | Path, hint: str
) -> None:
    """Raise ConfigError if the model that `cfg` builds differs from the checkpoint's (way,
    backbone, image size): caught here, the user gets the keys, not a state-dict size error."""
    differences = _differences(cfg, stored, MODEL_KEYS)
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
    skip = OPERATIONAL_KEYS + MODEL_KEYS
    keys = tuple(k for k in _leaves(cfg, tuple(cfg)) if not k.startswith(skip))
    changed = _differences(cfg, stored, keys)
    if changed:
        log.warning("resuming %s with changed settings: %s", path, ", ".join(changed))
    return checkpoint["global_step"]
