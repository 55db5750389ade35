"""How a learner runs its backbone: the support loss's gradient and the query's logits, taken
eagerly, by torch.func (which vmap can batch), or compiled. Which one runs is chosen once, when
the run is built (fewshot.methods.tasks), never from the ambient autograd state."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.models.functional import (
    FunctionalBackbone,
    GroupedBackbone,
    Statistics,
    Weights,
)


class EagerPasses:
    """Gradients by torch.autograd.grad, the faster way per task on CPU (docs/performance.md)."""

    def __init__(self, backbone: FunctionalBackbone) -> None:
        self.backbone = backbone

    def logits(self, weights: Weights, x: Tensor, statistics: Statistics | None = None) -> Tensor:
        """[N, C, H, W] -> [N, way] on `weights`; batch norm with `statistics`, else x's own."""
        return self.backbone.forward_with(weights, x, statistics)

    def embedding(
        self, weights: Weights, x: Tensor, statistics: Statistics | None = None
    ) -> Tensor:
        """[N, C, H, W] -> [N, features], the backbone's output before its head."""
        return self.backbone.embed_with(weights, x, statistics)

    def statistics(self, weights: Weights, x: Tensor) -> Statistics:
        return self.backbone.statistics(weights, x)

    def support_loss(self, weights: Weights, x: Tensor, y: Tensor) -> Tensor:
        """The learner's cross-entropy on a support batch x [N, C, H, W], y [N]."""
        return F.cross_entropy(self.backbone.forward_with(weights, x), y)

    def query_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """The task's cross-entropy [] on its query logits [N, way], labels y [N]."""
        return F.cross_entropy(logits, y)

    def loss_and_gradients(
        self, weights: Weights, x: Tensor, y: Tensor, create_graph: bool, names: Sequence[str]
    ) -> tuple[Tensor, Weights]:
        """The support loss at `weights` (detached) and its gradient for the weights `names`,
        differentiable with `create_graph`."""
        with torch.enable_grad():
            # Weights that carry no graph (at evaluation) become leaves to differentiate.
            weights = {
                n: w.detach().requires_grad_() if n in names and not w.requires_grad else w
                for n, w in weights.items()
            }
            loss = self.support_loss(weights, x, y)
            grads = torch.autograd.grad(
                loss, [weights[n] for n in names], create_graph=create_graph
            )
        return loss.detach(), dict(zip(names, grads))


class FunctionalPasses(EagerPasses):
    """Gradients by torch.func.grad, which sees per-task gradients under vmap where
    torch.autograd.grad cannot."""

    def loss_and_gradients(
        self, weights: Weights, x: Tensor, y: Tensor, create_graph: bool, names: Sequence[str]
    ) -> tuple[Tensor, Weights]:
        grads, loss = torch.func.grad_and_value(self._split_loss)(
            {n: weights[n] for n in names}, _others(weights, names), x, y
        )
        if not create_graph:
            grads = {n: g.detach() for n, g in grads.items()}
        return loss.detach(), grads

    def _split_loss(self, adapted: Weights, others: Weights, x: Tensor, y: Tensor) -> Tensor:
        return self.support_loss({**others, **adapted}, x, y)


class CompiledPasses(FunctionalPasses):
    """torch.compile of the two passes evaluation runs without any graph: the inner gradients
    and the query logits normalised with their own statistics. For evaluation only: training
    builds a graph through them, which compiled double backward cannot take."""

    def __init__(self, backbone: FunctionalBackbone) -> None:
        super().__init__(backbone)
        self._gradients = torch.compile(torch.func.grad_and_value(self._split_loss), dynamic=False)
        self._logits = torch.compile(backbone.forward_with, dynamic=False)

    def logits(self, weights: Weights, x: Tensor, statistics: Statistics | None = None) -> Tensor:
        if statistics is not None:  # a support-statistics pass: eager, as it always was
            return super().logits(weights, x, statistics)
        return self._logits(weights, x)

    def loss_and_gradients(
        self, weights: Weights, x: Tensor, y: Tensor, create_graph: bool, names: Sequence[str]
    ) -> tuple[Tensor, Weights]:
        grads, loss = self._gradients({n: weights[n] for n in names}, _others(weights, names), x, y)
        return loss, grads


class GroupedPasses(EagerPasses):
    """The passes of T tasks in lockstep (`GroupedBackbone.forward_tasks`): weights with a
    leading task axis, or without one where all tasks share them (per-step batch norm), images
    [T, N, C, H, W], labels [T, N].

    The support loss is the sum of the tasks' mean losses: each task's weights enter no other
    task's loss, so its gradient for them is that task's own, and one backward gives all."""

    def __init__(self, backbone: GroupedBackbone) -> None:
        super().__init__(backbone)
        self.shapes = {n: p.shape for n, p in backbone.named_parameters()}

    def logits(self, weights: Weights, x: Tensor, statistics: Statistics | None = None) -> Tensor:
        return self.backbone.forward_tasks(self._per_task(weights, len(x)), x, statistics)

    def statistics(self, weights: Weights, x: Tensor) -> Statistics:
        return self.backbone.task_statistics(self._per_task(weights, len(x)), x)

    def support_loss(self, weights: Weights, x: Tensor, y: Tensor) -> Tensor:
        return self.query_loss(self.logits(weights, x), y).sum()

    def query_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Each task's cross-entropy [T] on logits [T, N, way], labels y [T, N]."""
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)

    def _per_task(self, weights: Weights, tasks: int) -> Weights:
        return {
            n: w.expand(tasks, *w.shape) if w.shape == self.shapes[n] else w
            for n, w in weights.items()
        }


def _others(weights: Weights, names: Sequence[str]) -> Weights:
    return {n: w for n, w in weights.items() if n not in names}
