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
        meta_batch_size: int = 1,
    ) -> None:
        super().__init__()
        self.learner, self.tasks = learner, tasks
        self.meta_lr, self.grad_clip, self.config = meta_lr, grad_clip, config
        self.meta_lr_schedule = meta_lr_schedule
        self.meta_batch_size = meta_batch_size  # the tasks of a meta-batch over all processes
        self.val_sums: Tensor | None = None
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

    def _log(self, stage: str, loss: Tensor, acc: Tensor, step_acc: Tensor, tasks: int) -> None:
        log = dict(batch_size=tasks)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train", **log)
        self.log(f"{stage}/acc", acc, prog_bar=True, **log)
        for step, value in enumerate(step_acc):
            self.log(f"{stage}/acc_step{step}", value, **log)

    def _sums(self, results: EpisodeResults) -> Tensor:
        """[loss, accuracy, accuracy after each inner step..., tasks], summed over the tasks:
        what processes that share a meta-batch or the episodes add up."""
        tasks = results.accuracy.numel()
        return torch.cat(
            [
                (results.loss * tasks).detach().reshape(1),
                results.accuracy.detach().sum().reshape(1),
                results.step_accuracy.detach() * tasks,
                torch.tensor([tasks], dtype=results.loss.dtype, device=results.loss.device),
            ]
        )

    def _log_sums(
        self, stage: str, sums: Tensor, reduced: bool = False, tasks: int | None = None
    ) -> None:
        """Log the means over every process's tasks from their `_sums` (`reduced`: summed
        over the processes already); `tasks`: their count where known, which spares a read of
        it from the device."""
        if self.trainer.world_size > 1 and not reduced:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        means = sums[:-1] / sums[-1]
        count = int(sums[-1].item()) if tasks is None else tasks
        self._log(stage, means[0], means[1], means[2:], count)

    def training_step(self, batch: Episodes, batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        results = run_tasks(
            self.tasks, batch, True, backward=self._task_backward(batch), iteration=self.global_step
        )
        shared = self.trainer.world_size > 1
        if shared:  # the meta-gradient and the logged sums over every process's tasks
            sums = self._all_reduced_gradients(self._sums(results))
        if self.grad_clip is not None:
            self.clip_gradients(optimizer, self.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        if self.meta_lr_schedule is not None:
            self.lr_schedulers().step()  # per meta-iteration, as the optimiser
        if shared:
            self._log_sums("train", sums, reduced=True, tasks=self.meta_batch_size)
        else:
            tasks = results.accuracy.numel()
            self._log("train", results.loss, results.accuracy.mean(), results.step_accuracy, tasks)

    def _task_backward(self, batch: Episodes) -> Callable[[Tensor, bool], None]:
        """The backward pass for each share of the meta-loss. Where processes share the
        meta-batch, DDP would all-reduce the gradients at a backward; they accumulate theirs
        locally instead, each share's loss weighed by its tasks over the meta-batch's, and
        _all_reduced_gradients adds them up once per meta-iteration: the mean over all tasks,
        however unevenly they split."""
        strategy = self.trainer.strategy
        parallel = isinstance(strategy, ParallelStrategy)
        world = self.trainer.world_size
        weight = len(batch.query_y) / self.meta_batch_size if world > 1 else 1.0

        def backward(loss: Tensor, last: bool) -> None:
            with strategy.block_backward_sync() if parallel else nullcontext():
                self.manual_backward(loss * weight if weight != 1 else loss)

        return backward

    def _all_reduced_gradients(self, extra: Tensor) -> Tensor:
        """Sum the meta-gradient over the processes, and `extra` with it: one all-reduce per
        meta-iteration. Not DDP's own: it insists that every parameter have a gradient at
        every step, and MAML++'s step sizes have none while it trains first-order; here such
        a parameter keeps no gradient, as in one process (the set is the same in each: it
        depends on the step, not on the tasks). Returns `extra` summed."""
        params = [p for p in self.learner.parameters() if p.grad is not None]
        flat = torch.cat([*(p.grad.flatten() for p in params), extra.to(params[0].grad.dtype)])
        flat = self.trainer.strategy.reduce(flat, reduce_op="sum")
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()
        return flat[offset:]

    def validation_step(self, batch: Episodes, batch_idx: int) -> None:
        results = run_tasks(self.tasks, batch, training=False, track_steps=True)
        self.val_sums = self._sums(results) + (0 if self.val_sums is None else self.val_sums)

    def on_validation_epoch_start(self) -> None:
        self.val_sums: Tensor | None = None

    def on_validation_epoch_end(self) -> None:
        # Summed over this process's episodes, then over the processes': their mean is the
        # mean over all the episodes, however unevenly they split.
        if self.val_sums is not None:
            self._log_sums("val", self.val_sums)

    def test_step(self, batch: Episodes, batch_idx: int) -> None:
        # The accuracy after every inner step costs a query pass each: only where it is logged.
        results = run_tasks(self.tasks, batch, training=False, track_steps=self.logger is not None)
        tasks = results.accuracy.numel()
        self._log("test", results.loss, results.accuracy.mean(), results.step_accuracy, tasks)
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
