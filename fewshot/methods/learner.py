"""The contract every few-shot method fits: a task's support set (images and labels) and its
query images in, the query's logits out."""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

from torch import Tensor, nn

from fewshot.methods.passes import EagerPasses
from fewshot.models.functional import FunctionalBackbone, Weights
from fewshot.settings import Rule, one_of

# Which statistics batch norm normalises a query set with: the query batch's own, or the
# support set's (each query prediction then independent of the others).
BATCH_NORM_MODES = ("transductive", "support")
# The `algo` keys of a learner that normalises with batch statistics in training and at test.
BATCH_NORM_SETTINGS: dict[str, Rule] = {
    "batch_norm_train": one_of(*BATCH_NORM_MODES),
    "batch_norm_test": one_of(*BATCH_NORM_MODES),
}


class Learner(nn.Module):
    """A few-shot method: meta-parameters that, given one task's support set, score its queries.

    The work comes in two calls so that a task scorer (fewshot.methods.tasks) can score and
    weight every inner step of a method that has them: `adapt` yields the task's weights, once
    before adaptation and once after every inner step (a method without an inner loop, such as
    a metric method, yields its own weights once), and `query_logits` scores the query set on
    one of them, with the support set at hand (a metric method's prototypes). `logits` is both
    for one task, as `Predictor` uses it.

    `backbone` runs on weights it is given (fewshot.models.functional); `test_keys` are the
    `algo` keys that shape a test number, recorded beside it; `lockstep` says whether the tasks
    of a meta-batch may run as one grouped computation (algo.task_batching=grouped).

    `settings`: the `algo` keys the method takes (its constructor's arguments but the backbone)
    and their ranges (fewshot.settings), which fewshot.config checks before any work; a
    subclass adds its own to its base's.
    """

    test_keys: tuple[str, ...] = ()
    settings: ClassVar[dict[str, Rule]] = {}

    def __init__(self, backbone: FunctionalBackbone) -> None:
        super().__init__()
        self.backbone = backbone

    @property
    def lockstep(self) -> bool:
        return False

    def other_meta_parameters(self) -> list[str]:
        """The names of the meta-parameters beside the backbone's weights (learned step sizes,
        per-step batch norm, Meta-LSTM's cell)."""
        return [n for n, _ in self.named_parameters() if not n.startswith("backbone.")]

    def initial_weights(self, training: bool) -> Weights:
        weights = dict(self.backbone.named_parameters())
        if training:
            return weights
        # Evaluation differentiates only an inner loop, from constants.
        return {name: w.detach() for name, w in weights.items()}

    def adapt(
        self,
        support_x: Tensor,
        support_y: Tensor,
        training: bool,
        passes: EagerPasses | None = None,
        start: Weights | None = None,
        iteration: int = 0,
    ) -> Iterator[Weights]:
        """Yield the task's weights before adaptation and after every inner step (here: none).

        support_x [way*shot, C, H, W], support_y [way*shot]; `passes`: how the backbone runs
        (eager when None); `start`: the initial weights, the backbone's when None; `iteration`:
        the meta-iteration, for settings annealed over training.
        """
        yield self.initial_weights(training) if start is None else start

    def query_logits(
        self,
        weights: Weights,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        training: bool,
        passes: EagerPasses | None = None,
    ) -> Tensor:
        """[queries, way] logits of query_x [queries, C, H, W] on `weights` (one that `adapt`
        yielded), for the task whose support set is support_x, support_y."""
        raise NotImplementedError

    def step_loss_weights(self, iteration: int) -> Tensor | None:
        """Weights of the query losses after each inner step [steps] that the meta-loss sums at
        meta-iteration `iteration`; None: the last weights' loss alone."""
        return None

    def logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """One task at test time: adapt on its support set, then its query set's logits."""
        *_, weights = self.adapt(support_x, support_y, training=False)
        return self.query_logits(weights, support_x, support_y, query_x, training=False)
