"""Scoring tasks, free of Lightning: adapt to each task of a meta-batch and score its query
set, task by task (`TaskLoop`), all tasks as one torch.func.vmap batch (`VmappedTasks`), or all
in lockstep as grouped kernel calls (`GroupedTasks`).
Which one, and whether evaluation is compiled, is chosen once when the run is built."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from fewshot.data.episodes import Episodes
from fewshot.errors import ConfigError
from fewshot.methods.learner import Learner
from fewshot.methods.passes import (
    CompiledPasses,
    EagerPasses,
    FunctionalPasses,
    GroupedPasses,
)
from fewshot.models.functional import Annealed, GroupedBackbone, Weights


@dataclass
class Scores:
    """Some tasks of a meta-batch: their mean query loss [] (the meta-loss to differentiate
    when training), query accuracy [tasks] and accuracy before and after each inner step
    [tasks, steps + 1] ([tasks, 0] unless tracked)."""

    loss: Tensor
    accuracy: Tensor
    step_accuracy: Tensor


@dataclass
class EpisodeResults:
    """Outcome of a meta-batch: mean query loss, query accuracy of every task [tasks], and the
    mean query accuracy before and after each inner step [steps + 1] (empty unless tracked)."""

    loss: Tensor
    accuracy: Tensor
    step_accuracy: Tensor


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """The share of right predictions, over the last axis (per task, where tasks are an axis)."""
    return (logits.argmax(-1) == labels).float().mean(-1)


def score_task(
    learner: Learner,
    passes: EagerPasses,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    training: bool,
    track_steps: bool,
    start: Weights | None = None,
    iteration: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Adapt to one task from `start` (the backbone's weights when None) and score its query
    set: loss [], accuracy [], and the accuracy before and after each inner step [steps + 1]
    (empty unless `track_steps`). `iteration`: the meta-iteration, for annealed settings.
    With `GroupedPasses`, the tasks of a batch at once: each result gains a leading task axis.

    The loss is the query loss after the last step, or, where the learner weights the steps'
    losses (MAML++'s multi-step loss), their weighted sum."""
    step_weights = learner.step_loss_weights(iteration) if training else None
    trace, step_losses, previous = [], [], None
    adapted = learner.adapt(support_x, support_y, training, passes, start, iteration)
    for step, weights in enumerate(adapted):
        if track_steps:
            with torch.no_grad():  # for logging only: no graph kept
                logits = learner.query_logits(
                    weights, support_x, support_y, query_x, training, passes
                )
                trace.append(accuracy(logits, query_y))
        if step_weights is not None and previous is not None:  # a step before the last
            logits = learner.query_logits(previous, support_x, support_y, query_x, training, passes)
            step_losses.append(passes.query_loss(logits, query_y))
        previous = weights if step > 0 else None
    logits = learner.query_logits(weights, support_x, support_y, query_x, training, passes)
    loss = passes.query_loss(logits, query_y)
    if step_weights is not None:
        loss = (torch.stack([*step_losses, loss], -1) * step_weights.to(loss)).sum(-1)
    step_accuracy = torch.stack(trace, -1) if trace else logits.new_empty(*loss.shape, 0)
    return loss, accuracy(logits.detach(), query_y), step_accuracy


class TaskLoop:
    """Task by task: each task's scores come as soon as it is done, so a caller that
    differentiates them at once keeps one task's graph alive at a time (memory flat in the
    number of tasks). `compiled`: evaluation's passes through torch.compile."""

    def __init__(self, learner: Learner, compiled: bool = False) -> None:
        self.learner = learner
        self.passes = EagerPasses(learner.backbone)
        self.eval_passes = CompiledPasses(learner.backbone) if compiled else self.passes

    def __call__(
        self, batch: Episodes, training: bool, track_steps: bool, iteration: int = 0
    ) -> Iterator[Scores]:
        passes = self.passes if training else self.eval_passes
        for episode in zip(*batch):
            loss, acc, trace = score_task(
                self.learner, passes, *episode, training, track_steps, None, iteration
            )
            yield Scores(loss, acc[None], trace[None])


class VmappedTasks:
    """All tasks of a meta-batch as one torch.func.vmap computation, inner gradients by
    torch.func.grad; the meta-gradient comes as one share for all tasks."""

    def __init__(self, learner: Learner) -> None:
        others = learner.other_meta_parameters()
        if others:  # the batched meta-gradient is taken for the backbone's weights alone
            raise ConfigError(
                f"algo.task_batching=vmap cannot meta-learn {others[0]} (the batched "
                "meta-gradient is taken for the backbone's weights alone): set "
                "algo.task_batching=loop"
            )
        self.learner = learner
        self.passes = FunctionalPasses(learner.backbone)

    def __call__(
        self, batch: Episodes, training: bool, track_steps: bool, iteration: int = 0
    ) -> Iterator[Scores]:
        start = self.learner.initial_weights(training)

        def task(start: Weights, *episode: Tensor):
            loss, acc, trace = score_task(
                self.learner, self.passes, *episode, training, track_steps, start, iteration
            )
            return loss, (loss.detach(), acc, trace)

        per_task = (None, 0, 0, 0, 0)  # the meta-parameters are shared, the episodes per task
        if not training:
            _, (losses, accuracies, traces) = torch.func.vmap(task, per_task)(start, *batch)
            yield Scores(losses.mean(), accuracies, traces)
            return
        # The meta-gradient is taken with torch.func.grad too, not by a backward pass through
        # the vmapped graph: with batch norm inside, that one is wrong in the torch this was
        # written against (the test of this path catches it), while grad of the vmapped
        # second-order loop is right.
        meta_grad = torch.func.vmap(torch.func.grad(task, has_aux=True), per_task)
        constants = {n: w.detach() for n, w in start.items()}  # no graph beside func.grad's
        grads, (losses, accuracies, traces) = meta_grad(constants, *batch)
        # A loss of the tasks' mean value whose gradient is the mean of their meta-gradients,
        # so that the caller's backward (DDP's all-reduce, clipping, the optimiser) works as
        # with the loop.
        surrogate = sum((w * grads[n].mean(0)).sum() for n, w in start.items())
        yield Scores(losses.mean() + (surrogate - surrogate.detach()), accuracies, traces)


class GroupedTasks:
    """All tasks of a meta-batch in lockstep through the backbone's `forward_tasks`: per-task
    weights stacked along a task axis, each layer one grouped kernel call for all tasks, the
    inner gradients of all tasks from one backward and the meta-gradient from plain autograd
    (so meta-parameters beside the weights learn as in the loop)."""

    def __init__(self, learner: Learner) -> None:
        if not isinstance(learner.backbone, GroupedBackbone):
            raise ConfigError(
                f"algo.task_batching=grouped needs a backbone with forward_tasks and "
                f"task_statistics; {type(learner.backbone).__name__} has none: set "
                "algo.task_batching=loop"
            )
        if not learner.lockstep:
            raise ConfigError(
                f"algo.task_batching=grouped cannot run {type(learner).__name__}: its tasks "
                "do not run in lockstep through grouped kernels (Learner.lockstep); set "
                "algo.task_batching=loop (or vmap, where the learner takes it)"
            )
        self.learner = learner
        self.passes = GroupedPasses(learner.backbone)

    def __call__(
        self, batch: Episodes, training: bool, track_steps: bool, iteration: int = 0
    ) -> Iterator[Scores]:
        tasks = len(batch.query_y)
        start = {
            n: w.expand(tasks, *w.shape) for n, w in self.learner.initial_weights(training).items()
        }
        loss, accuracies, traces = score_task(
            self.learner, self.passes, *batch, training, track_steps, start, iteration
        )
        yield Scores(loss.mean(), accuracies, traces)


TaskScorer = TaskLoop | VmappedTasks | GroupedTasks
# algo.task_batching's choices: how the tasks of a meta-batch are run
TASK_BATCHING = {"loop": TaskLoop, "vmap": VmappedTasks, "grouped": GroupedTasks}


def task_scorer(learner: Learner, batching: str, compiled: bool = False) -> TaskScorer:
    """The scorer named `batching` (a key of TASK_BATCHING) for `learner`; `compiled`:
    evaluation's passes through torch.compile (the loop only)."""
    if batching not in TASK_BATCHING:
        raise ConfigError(f"algo.task_batching={batching} is not one of {', '.join(TASK_BATCHING)}")
    if batching == "loop":
        return TaskLoop(learner, compiled)
    return TASK_BATCHING[batching](learner)


Backward = Callable[[Tensor, bool], None]  # (loss share, is it the last share?) -> None


def run_tasks(
    tasks: TaskScorer,
    batch: Episodes,
    training: bool,
    track_steps: bool = False,
    backward: Backward | None = None,
    iteration: int = 0,
) -> EpisodeResults:
    """Score every task of `batch` (see `Episodes` for shapes) at meta-iteration `iteration`.

    With `backward`, each share of the meta-loss (its tasks' part of the mean) is handed to
    `backward(share, last)` as soon as it exists, and the returned loss is detached; without,
    the returned loss carries every task's graph.
    """
    if training and isinstance(tasks.learner.backbone, Annealed):
        tasks.learner.backbone.at_iteration(iteration)
    count = len(batch.query_y)
    losses, accuracies, step_accuracies, done = [], [], [], 0
    for scores in tasks(batch, training, track_steps, iteration):
        share = scores.loss * len(scores.accuracy) / count
        done += len(scores.accuracy)
        if backward is not None:
            backward(share, done == count)
            share = share.detach()
        losses.append(share)
        accuracies.append(scores.accuracy)
        step_accuracies.append(scores.step_accuracy)
    return EpisodeResults(
        torch.stack(losses).sum(), torch.cat(accuracies), torch.cat(step_accuracies).mean(0)
    )


def plain_backward(loss: Tensor, last: bool) -> None:
    """`run_tasks`' backward outside a Trainer: accumulate every share's gradient."""
    loss.backward()
