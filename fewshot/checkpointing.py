"""Checkpoints: best on val/acc, the latest for resuming, each written whole or not at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from fewshot.data.files import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file and renames it, so a crash never leaves a half-written one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


class LatestCheckpoint(Callback):
    """Keeps `last.ckpt` at the latest validation and at the end of training.

    Lightning's own `save_last` writes only when a new best is saved (Lightning >= 2.6), which
    would resume a run from its best step instead of its last.
    """

    def __init__(self, path: Path) -> None:
        self.path, self.saved_step = Path(path), -1

    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.global_step != self.saved_step and not trainer.sanity_checking:
            trainer.save_checkpoint(self.path)
            self.saved_step = trainer.global_step

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)


def checkpoint_callbacks(run_dir: Path) -> list[Callback]:
    folder = run_dir / "checkpoints"
    best = ModelCheckpoint(
        dirpath=folder, filename="best", monitor="val/acc", mode="max", enable_version_counter=False
    )
    return [best, LatestCheckpoint(folder / "last.ckpt")]
