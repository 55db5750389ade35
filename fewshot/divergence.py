"""Stop a run whose meta-loss or meta-gradient is no longer finite, before it trains on NaNs."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from fewshot.checkpointing import LatestCheckpoint
from fewshot.errors import TrainingDiverged


def divergence_hint(algo: DictConfig) -> str:
    """What to change, from the step sizes and switches the algorithm config has."""
    lrs = [f"algo.{k}={algo[k]}" for k in ("base_lr", "meta_lr") if k in algo]
    hint = f"lower {' or '.join(lrs)}"
    if "first_order" in algo and not algo.first_order:
        hint += ", or set algo.first_order=true"
    return hint


class StopOnNonFinite(Callback):
    """Raises TrainingDiverged at the first non-finite meta-loss or meta-gradient.

    Both are checked before the optimiser step, so the parameters and the optimiser state never
    take a non-finite value and no checkpoint written before or after can hold one.
    """

    def __init__(self, hint: str) -> None:
        self.hint = hint

    def _stop(self, trainer: pl.Trainer, what: str) -> None:
        latest = next((c for c in trainer.callbacks if isinstance(c, LatestCheckpoint)), None)
        if latest is not None and latest.path.is_file():
            step = f" (step {latest.saved_step})" if latest.saved_step >= 0 else ""
            kept = f"last good checkpoint: {latest.path}{step}"
        else:
            kept = "no checkpoint was written before it"
        raise TrainingDiverged(
            f"training diverged at step {trainer.global_step + 1}: {what}; {kept}; {self.hint}"
        )

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor):
        if not torch.isfinite(loss):
            self._stop(trainer, f"the meta-loss is {loss.item()}")

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer
    ):
        grads = {n: p.grad for n, p in pl_module.named_parameters() if p.grad is not None}
        # One device sync per step; the names are looked up only when something is wrong.
        if grads and not torch.stack([g.isfinite().all() for g in grads.values()]).all():
            bad = next(n for n, g in grads.items() if not g.isfinite().all())
            self._stop(trainer, f"the meta-gradient of {bad} is not finite")
