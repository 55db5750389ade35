"""What gradient-based methods share: an update rule that one adapt loop drives over inner
steps on the support set, first or second order, optionally recomputed in backward; and the
query's logits on the adapted weights under the configured batch-norm mode."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from itertools import repeat
from typing import ClassVar

import torch
from torch import Tensor, nn

from fewshot.errors import ConfigError
from fewshot.methods.learner import BATCH_NORM_SETTINGS, Learner
from fewshot.methods.passes import EagerPasses
from fewshot.methods.recomputation import recomputed
from fewshot.methods.rules import State, UpdateRule
from fewshot.models.functional import FunctionalBackbone, Weights
from fewshot.settings import Rule

# (support_x, support_y, steps) -> the (x, y) batch of every inner step, in order
SupportBatches = Callable[[Tensor, Tensor, int], Iterator[tuple[Tensor, Tensor]]]


def whole_support_set(x: Tensor, y: Tensor, steps: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Every inner step sees the whole support set (MAML)."""
    return repeat((x, y), steps)


def norm_parameters(backbone: nn.Module) -> Weights:
    """The backbone's batch-norm weights and biases, by name."""
    return {
        f"{module_name}.{name}": w
        for module_name, module in backbone.named_modules()
        if isinstance(module, nn.modules.batchnorm._NormBase)
        for name, w in module.named_parameters(recurse=False)
    }


def adapted_parameters(
    backbone: nn.Module, adapt_only: Sequence[str] | None, frozen: Sequence[str] = ()
) -> Weights:
    """The parameters the inner loop adapts: those named by a prefix in `adapt_only` (all when
    None), less those in `frozen` (meta-learned, not adapted)."""
    return {
        n: w
        for n, w in backbone.named_parameters()
        if (adapt_only is None or n.startswith(tuple(adapt_only))) and n not in frozen
    }


class GradientLearner(Learner):
    """Adapts the backbone's weights (the learned initialisation) to a task with `rule`.

    `steps` / `steps_test` inner steps in meta-training / evaluation, on the support batches
    `support_batches` gives. With `second_order` the meta-gradient flows through the inner
    gradients; otherwise they enter as constants. `adapted` names the parameters that adapt.
    `checkpoint_inner` keeps only each second-order step's input weights and reruns the step in
    backward (a rule without meta-parameters only: the rerun must be a function of the weights
    alone).

    `batch_norm_train` / `batch_norm_test` say which statistics normalise the query set:
    `transductive`, those of the query batch itself (the MAML paper's code), or `support`, those
    of the support set, so that each query prediction is independent of the others (Ravi &
    Larochelle at meta-test). Support statistics enter as constants, not differentiated.

    A method changes the loop through two hooks: `second_order_at` (whether a meta-iteration's
    meta-gradient is second order) and `step_weights` (the weights an inner step starts from).
    """

    settings: ClassVar[dict[str, Rule]] = dict(BATCH_NORM_SETTINGS)

    def __init__(
        self,
        backbone: FunctionalBackbone,
        rule: UpdateRule,
        steps: int,
        steps_test: int,
        second_order: bool,
        batch_norm_train: str,
        batch_norm_test: str,
        adapted: Sequence[str],
        support_batches: SupportBatches = whole_support_set,
        checkpoint_inner: bool = False,
    ) -> None:
        super().__init__(backbone)
        self.rule = rule  # registered after the backbone: Adam's state keeps this order
        self.steps, self.steps_test, self.second_order = steps, steps_test, second_order
        self.batch_norm_train, self.batch_norm_test = batch_norm_train, batch_norm_test
        self.support_batches, self.checkpoint_inner = support_batches, checkpoint_inner
        self.adapted = tuple(adapted)
        self.check_recomputable()

    def check_recomputable(self) -> None:
        """Raise ConfigError if checkpoint_inner would rerun steps that use meta-parameters
        besides the weights: the rerun in backward differentiates the weights only."""
        if self.checkpoint_inner and self.other_meta_parameters():
            raise ConfigError(
                "algo.checkpoint_inner=true cannot rerun inner steps that use meta-parameters "
                "besides the weights (learned step sizes, per-step batch norm): set "
                "algo.checkpoint_inner=false"
            )

    @property
    def rule_reads_loss(self) -> bool:
        """Whether the update rule reads the support loss (Meta-LSTM's does), not only its
        gradient."""
        return getattr(self.rule, "reads_loss", False)

    @property
    def lockstep(self) -> bool:
        # Tasks in lockstep share one support batch order and one summed loss.
        return self.support_batches is whole_support_set and not self.rule_reads_loss

    def second_order_at(self, iteration: int) -> bool:
        """Whether the meta-gradient of meta-iteration `iteration` is second order."""
        return self.second_order

    def step_weights(self, step: int, weights: Weights, training: bool) -> Weights:
        """The weights inner step `step` starts from, given the last step's (here: those)."""
        return weights

    def adapt(
        self,
        support_x: Tensor,
        support_y: Tensor,
        training: bool,
        passes: EagerPasses | None = None,
        start: Weights | None = None,
        iteration: int = 0,
    ) -> Iterator[Weights]:
        """Yield the task's weights before adaptation and after every inner step. When
        `training`, the last weights carry the graph back to the meta-parameters; otherwise
        nothing does."""
        passes = passes or EagerPasses(self.backbone)
        weights = self.initial_weights(training) if start is None else start
        yield weights
        second_order = training and self.second_order_at(iteration)
        state = self.rule.init({n: weights[n] for n in self.adapted})
        batches = self.support_batches(
            support_x, support_y, self.steps if training else self.steps_test
        )
        for step, (x, y) in enumerate(batches):
            weights = self.step_weights(step, weights, training)
            inner = partial(
                self._step,
                x=x,
                y=y,
                step=step,
                second_order=second_order,
                training=training,
                passes=passes,
            )
            if second_order and self.checkpoint_inner:
                weights = recomputed(
                    lambda w, inner=inner, state=state: inner(w, state)[0], weights
                )
            else:
                weights, state = inner(weights, state)
            yield weights

    def _step(
        self,
        weights: Weights,
        state: State,
        *,
        x: Tensor,
        y: Tensor,
        step: int,
        second_order: bool,
        training: bool,
        passes: EagerPasses,
    ) -> tuple[Weights, State]:
        loss, grads = passes.loss_and_gradients(weights, x, y, second_order, self.adapted)
        # At evaluation the update builds no graph: nothing is differentiated through it.
        with torch.set_grad_enabled(training):
            adapted, state = self.rule.update(
                grads, state, {n: weights[n] for n in self.adapted}, step, loss
            )
        return {**weights, **adapted}, state

    def query_logits(
        self,
        weights: Weights,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        training: bool,
        passes: EagerPasses | None = None,
    ) -> Tensor:
        """[way*query, way] logits of the query set under the batch-norm mode of the stage."""
        passes = passes or EagerPasses(self.backbone)
        if (self.batch_norm_train if training else self.batch_norm_test) == "transductive":
            return passes.logits(weights, query_x)
        with torch.no_grad():
            statistics = passes.statistics(weights, support_x)
        return passes.logits(weights, query_x, statistics)
