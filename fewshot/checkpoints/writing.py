"""Checkpoints as a run writes them: the best on val/acc and the latest for resuming, each written
whole or not at all, and read back by Lightning through fewshot.checkpoints.reading."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, Checkpoint, ModelCheckpoint

from fewshot.checkpoints.reading import load_checkpoint, read_as_data
from fewshot.experiments.runs import Run, best_val_acc
from fewshot.files import atomic_path

log = logging.getLogger(__name__)


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
