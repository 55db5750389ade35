"""What train.py and evaluate.py print: Lightning's messages that are no news to a fewshot user
silenced by name (each one, never a category or module wholesale), and a progress bar over test
episodes."""

from __future__ import annotations

import logging
import warnings

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.callbacks.progress.rich_progress import _RICH_AVAILABLE
from tqdm import tqdm

# (message start, category): each raised inside Lightning, on every run.
KNOWN_WARNINGS = (
    # Lightning's own pytree helper calls torch's deprecated LeafSpec check.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # fewshot's module turns uint8 images into floats there on purpose, whatever the datamodule.
    (r"You have overridden `on_after_batch_transfer` in `LightningModule`", UserWarning),
    # A machine with SLURM installed, running a job outside it (hydra/launcher=slurm uses srun).
    (r"The `srun` command is available on your system but is not used", UserWarning),
)
TIP = "💡 Tip:"  # Lightning's advertisement for its cloud logger, at every Trainer


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TIP)


def quiet_lightning() -> None:
    """Silence KNOWN_WARNINGS and Lightning's tips; every other message is left alone."""
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropTips())


class EpisodeProgress(pl.Callback):
    """A progress bar over the test episodes, with the time left, on a terminal only (tqdm
    turns itself off when stderr is a file or a pipe)."""

    def __init__(self, label: str = "test") -> None:
        self.label, self.bar = label, None

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = sum(len(loader.dataset) for loader in _loaders(trainer.test_dataloaders))
        self.bar = tqdm(total=total, desc=self.label, unit="episode", disable=None, leave=False)

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx, *_
    ) -> None:
        self.bar.update(batch.support_x.shape[0])  # episodes of the batch

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.bar.close()


def _loaders(loaders) -> list:
    return list(loaders) if isinstance(loaders, list | tuple) else [loaders]


class MetaIterationBar(RichProgressBar):
    """Lightning's rich bar, described as meta-iterations: training is one endless epoch, which
    Lightning's own description shows as "Epoch 0/-2"."""

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'meta-iterations':{len(self.validation_description)}}"


def progress_bars(enabled: bool) -> list[pl.Callback]:
    """The training bar to hand the Trainer: none where bars are off or rich is missing
    (Lightning then shows its own, or none)."""
    return [MetaIterationBar()] if enabled and _RICH_AVAILABLE else []
