"""Stop a run whose meta-loss or meta-gradient is no longer finite, before it trains on NaNs."""

from __future__ import annotations

import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from fewshot.checkpoints.reading import first_non_finite, read_as_data
from fewshot.checkpoints.writing import LatestCheckpoint
from fewshot.errors import TrainingDiverged


def divergence_hint(algo: DictConfig) -> str:
    """What to change, from the step sizes and switches the algorithm config has."""
    lrs = [f"algo.{k}={algo[k]}" for k in ("base_lr", "meta_lr") if k in algo]
    hint = f"lower {' or '.join(lrs)}"
    if "first_order" in algo and not algo.first_order:
        hint += ", or set algo.first_order=true"
    return hint


def _finite(ckpt: Path) -> bool:
    """Whether a checkpoint's weights are finite, so a message may call it the last good one
    (a run resumed from a copied-over file would otherwise be sent back to it)."""
    try:
        state = read_as_data(ckpt).get("state_dict")
    except (OSError, AttributeError):
        return False
    return first_non_finite(state, "state_dict") is None


class StopOnNonFinite(Callback):
    """Raises TrainingDiverged naming the first step whose meta-loss or meta-gradient is not
    finite, before any checkpoint can hold what followed it.

    The checks run on the device and only record the first bad step there: a step never waits
    on the host for them (on a GPU that wait would stall the queue of kernels every step). The
    host reads the record where Lightning syncs already, when it logs (every
    trainer.log_every_n_steps), and before every validation, checkpoint and the end of
    training. So a diverged run stops within log_every_n_steps steps, and the last checkpoint
    it keeps is one written before the bad step: its weights and optimiser state are finite.
    """

    def __init__(self, hint: str) -> None:
        self.hint = hint
        self._names: list[str] = []
        # On the device, until the host reads them: the first bad step (-1: none yet), the
        # meta-loss there if it was the one (else 0), and which meta-gradients were not finite.
        self._bad_step: Tensor | None = None
        self._bad_loss: Tensor | None = None
        self._bad_grads: Tensor | None = None

    def _record(self, trainer: pl.Trainer, bad: Tensor) -> Tensor:
        """Mark step trainer.global_step + 1 bad where `bad` [] and no step was yet; the mask
        of that first time []."""
        if self._bad_step is None:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=bad.device)
            self._bad_loss = torch.zeros((), device=bad.device)
        first = bad & (self._bad_step < 0)
        self._bad_step = torch.where(first, trainer.global_step + 1, self._bad_step)
        return first

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor):
        loss = loss.detach().float()
        first = self._record(trainer, ~loss.isfinite())
        self._bad_loss = torch.where(first, loss, self._bad_loss)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer
    ):
        grads = {n: p.grad for n, p in pl_module.named_parameters() if p.grad is not None}
        if not grads:
            return
        finite = torch.stack([g.isfinite().all() for g in grads.values()])  # [parameters]
        first = self._record(trainer, ~finite.all())
        if self._bad_grads is None or len(self._names) != len(grads):
            self._names, self._bad_grads = list(grads), torch.zeros_like(finite)
        self._bad_grads = torch.where(first, ~finite, self._bad_grads)

    def check(self, trainer: pl.Trainer) -> None:
        """Raise TrainingDiverged if a step was recorded bad (one sync with the device)."""
        if self._bad_step is None:
            return
        step = int(self._bad_step)
        if step < 0:
            return
        loss = float(self._bad_loss)
        if not math.isfinite(loss):
            self._stop(trainer, step, f"the meta-loss is {loss}")
        bad = next(n for n, b in zip(self._names, self._bad_grads.tolist()) if b)
        self._stop(trainer, step, f"the meta-gradient of {bad} is not finite")

    def _stop(self, trainer: pl.Trainer, step: int, what: str) -> None:
        latest = next((c for c in trainer.callbacks if isinstance(c, LatestCheckpoint)), None)
        if latest is not None and latest.path.is_file() and _finite(latest.path):
            saved = f" (step {latest.saved_step})" if latest.saved_step >= 0 else ""
            kept = f"last good checkpoint: {latest.path}{saved}"
        elif latest is not None and latest.path.is_file():
            kept = f"{latest.path} holds non-finite weights too, so no checkpoint is good"
        else:
            kept = "no checkpoint was written before it"
        raise TrainingDiverged(f"training diverged at step {step}: {what}; {kept}; {self.hint}")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0:  # Lightning logs (syncs) now
            self.check(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)  # validation ends in checkpoints

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)  # before last.ckpt: Lightning runs Checkpoint callbacks last

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        self.check(trainer)  # any other save (a requeue's), which this aborts
