"""The LightningModule that meta-trains any learner: the per-task backward and DDP's sync rule,
the optimiser, logging, and the checkpoint's contents."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import ParallelStrategy
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler

from fewshot.checkpoints.format import current_state_dict
from fewshot.data.episodes import EpisodeIndices, Episodes
from fewshot.methods import TASK_BATCHING, EpisodeResults, Learner, run_tasks
from fewshot.methods.tasks import TaskScorer
from fewshot.settings import BOOLEAN, POSITIVE, POSITIVE_OR_NULL, Rule, int_at_least, one_of

# The `algo` keys of the outer loop and of how tasks are scored (this module's, the sampler's, the
# task scorer's), with their ranges; the others are the learner's (Learner.settings).
OUTER_LOOP_SETTINGS: dict[str, Rule] = {
    "meta_lr": POSITIVE,
    "meta_batch_size": int_at_least(1),
    "grad_clip": POSITIVE_OR_NULL,
    "task_batching": one_of(*TASK_BATCHING),
    "compile": BOOLEAN,
}
# Every `algo` key that is not an argument of the learner `algo._target_` names: the settings
# above, which option of conf/algo/ it is, and the meta_lr schedule (checked whole by
# fewshot.checkpoints.format.schedule_class).
OUTER_LOOP_KEYS = ("name", "meta_lr_schedule", *OUTER_LOOP_SETTINGS)


class EpisodicModule(pl.LightningModule):
    """Meta-trains `learner` with Adam on its meta-parameters, the meta-gradient's norm
    clipped to `grad_clip` if set; validates and tests on fixed episodes. `tasks` scores a
    meta-batch (in a loop or batched). `config` (the resolved run config) is stored in every
    checkpoint so that evaluate.py can rebuild the run from the checkpoint alone."""

    def __init__(
        self,
        learner: Learner,
        tasks: TaskScorer,
        meta_lr: float,
        grad_clip: float | None,
        config: dict[str, Any],
        meta_lr_schedule: Callable[[torch.optim.Optimizer], LRScheduler] | None = None,
    ) -> None:
        super().__init__()
        self.learner, self.tasks = learner, tasks
        self.meta_lr, self.grad_clip, self.config = meta_lr, grad_clip, config
        self.meta_lr_schedule = meta_lr_schedule
        # Optimised by hand so that each task's graph is freed by its own backward pass.
        self.automatic_optimization = False
        self.test_accuracies: list[Tensor] = []

    def on_after_batch_transfer(
        self, batch: Episodes | EpisodeIndices, dataloader_idx: int
    ) -> Episodes:
        # With data.on_device only the indices travel; the images are on the device already.
        if isinstance(batch, EpisodeIndices):
            batch = self.trainer.datamodule.gather(batch)
        # Images travel as uint8 (4x less to copy) and become floats in [0, 1] on the device.
        return batch._replace(support_x=batch.support_x / 255.0, query_x=batch.query_x / 255.0)

    def _log_results(self, stage: str, results: EpisodeResults) -> None:
        tasks = results.accuracy.numel()
        # Under DDP each rank scores an equal share of the fixed episodes: the mean over ranks is
        # the mean over all of them. Training metrics stay rank 0's share (no sync every step).
        sync = stage != "train"
        log = dict(batch_size=tasks, sync_dist=sync)
        self.log(f"{stage}/loss", results.loss, prog_bar=stage == "train", **log)
        self.log(f"{stage}/acc", results.accuracy.mean(), prog_bar=True, **log)
        for step, acc in enumerate(results.step_accuracy):
            self.log(f"{stage}/acc_step{step}", acc, **log)

    def training_step(self, batch: Episodes, batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        results = run_tasks(
            self.tasks, batch, True, backward=self._task_backward(), iteration=self.global_step
        )
        if self.grad_clip is not None:
            self.clip_gradients(optimizer, self.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        if self.meta_lr_schedule is not None:
            self.lr_schedulers().step()  # per meta-iteration, as the optimiser
        self._log_results("train", results)

    def _task_backward(self) -> Callable[[Tensor, bool], None]:
        """The backward pass for each share of the meta-loss. Under DDP every backward would
        all-reduce the gradients; instead the shares accumulate theirs locally and only the last
        share's backward syncs (averaging the sums over ranks: the mean over all tasks)."""
        strategy = self.trainer.strategy
        parallel = isinstance(strategy, ParallelStrategy)

        def backward(loss: Tensor, last: bool) -> None:
            with strategy.block_backward_sync() if parallel and not last else nullcontext():
                self.manual_backward(loss)

        return backward

    def validation_step(self, batch: Episodes, batch_idx: int) -> None:
        self._log_results("val", run_tasks(self.tasks, batch, training=False, track_steps=True))

    def test_step(self, batch: Episodes, batch_idx: int) -> None:
        # The accuracy after every inner step costs a query pass each: only where it is logged.
        results = run_tasks(self.tasks, batch, training=False, track_steps=self.logger is not None)
        self._log_results("test", results)
        self.test_accuracies.append(results.accuracy.detach())  # on the device: no sync per step

    def on_test_epoch_start(self) -> None:
        self.test_accuracies = []  # accuracy of every test episode [episodes], for the CI

    def on_test_epoch_end(self) -> None:
        # One copy to the host for the whole test, where the CI is computed.
        if self.test_accuracies:
            self.test_accuracies = [torch.cat(self.test_accuracies).cpu()]

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.learner.parameters(), lr=self.meta_lr)
        if self.meta_lr_schedule is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.meta_lr_schedule(optimizer)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["fewshot_config"] = self.config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = current_state_dict(checkpoint["state_dict"])
