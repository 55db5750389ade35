"""What train.py and evaluate.py print: Lightning's messages that are no news to a fewshot user
silenced by name (each one, never a category or module wholesale), and a progress bar over test
episodes."""

from __future__ import annotations

import logging
import time
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
    # Processes that share a run log validation's means summed over all of them already
    # (EpisodicModule._log_sums): Lightning's sync would only average equal values.
    (r"It is recommended to use `self.log\('val/", UserWarning),
)
log = logging.getLogger(__name__)
# Lightning's messages at every Trainer: its advertisement for its cloud logger; and where a
# run's processes share its tasks, each process's greeting and rank 0's banner (train.py says
# in one line how many processes run, and how).
NO_NEWS = (
    "💡 Tip:",
    "Initializing distributed: GLOBAL_RANK:",
    f"{'-' * 100}\ndistributed_backend=",
)


class _DropNoNews(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(NO_NEWS)


def quiet_lightning() -> None:
    """Silence KNOWN_WARNINGS and NO_NEWS; every other message is left alone."""
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in (
        "pytorch_lightning.utilities.rank_zero",
        "lightning_fabric.utilities.rank_zero",
        "lightning_fabric.utilities.distributed",
    ):
        logging.getLogger(name).addFilter(_DropNoNews())


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


class EpisodeCountdown(pl.Callback):
    """Says in the log (the run's log file as the terminal) how many fixed episodes each
    validation and test scores and, once the first meta-batch of them is scored, about how
    long the rest will take: a long test is never silent. Where processes share the episodes,
    the first process speaks for its share, which the others score meanwhile."""

    def __init__(self, note: str = "") -> None:
        self.note = note  # where the episodes are a share: which
        self.started: float | None = None

    def _start(self, trainer: pl.Trainer) -> None:
        self.started = time.perf_counter()

    def _first_batch(self, stage: str, trainer: pl.Trainer, loaders, batch_idx: int) -> None:
        if batch_idx != 0 or self.started is None or not trainer.is_global_zero:
            return
        (loader,) = _loaders(loaders)
        total, done = len(loader.dataset), min(loader.batch_size or 1, len(loader.dataset))
        elapsed = time.perf_counter() - self.started
        note = self.note
        if trainer.world_size > 1:
            note = f"the first share of {trainer.world_size} processes, scored at once"
        log.info(
            "%s: %d episodes%s, about %.0f s (the first %d took %.1f s)",
            stage,
            total,
            f" ({note})" if note else "",
            elapsed / done * total,
            done,
            elapsed,
        )

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        self._first_batch("validation", trainer, trainer.val_dataloaders, batch_idx)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        self._first_batch("test", trainer, trainer.test_dataloaders, batch_idx)


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
