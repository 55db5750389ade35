"""The learner: initial weights + a task's support set -> the task's weights, by an update rule
that one adapt loop drives; and the query's logits under the configured batch-norm mode."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from itertools import repeat

import torch
from torch import Tensor, nn

from fewshot.errors import ConfigError
from fewshot.learners.passes import EagerPasses
from fewshot.learners.recomputation import recomputed
from fewshot.learners.rules import State, UpdateRule
from fewshot.models.functional import FunctionalBackbone, Weights

# (support_x, support_y, steps) -> the (x, y) batch of every inner step, in order
SupportBatches = Callable[[Tensor, Tensor, int], Iterator[tuple[Tensor, Tensor]]]

BATCH_NORM_MODES = ("transductive", "support")


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
    backbone: nn.Module, adapt_only: Sequence[str] | None, per_step_norm: bool = False
) -> Weights:
    """The parameters the inner loop adapts: those named by a prefix in `adapt_only` (all when
    None), less batch norm's when it has weights per step (meta-learned, not adapted)."""
    frozen = norm_parameters(backbone) if per_step_norm else {}
    return {
        n: w
        for n, w in backbone.named_parameters()
        if (adapt_only is None or n.startswith(tuple(adapt_only))) and n not in frozen
    }


class Learner(nn.Module):
    """Adapts the backbone's weights (the learned initialisation) to a task with `rule`.

    `steps` / `steps_test` inner steps in meta-training / evaluation, on the support batches
    `support_batches` gives. With `second_order` the meta-gradient flows through the inner
    gradients; otherwise they enter as constants. `adapt_only` names the parameters that adapt
    (prefixes of their names, e.g. ("head",)); None: all of them. `checkpoint_inner` keeps only
    each second-order step's input weights and reruns the step in backward (a stateless rule
    without meta-parameters only: the rerun must be a function of the weights alone).

    `second_order_from`: the meta-iteration from which the meta-gradient is second order (first
    order before it: MAML++'s derivative-order annealing). `per_step_norm`: batch norm's weights
    and biases are meta-learned per inner step (the backbone's own are step 0's; steps past the
    last trained one use its), and do not adapt (MAML++'s BNWB).

    `batch_norm_train` / `batch_norm_test` say which statistics normalise the query set:
    `transductive`, those of the query batch itself (the MAML paper's code), or `support`, those
    of the support set, so that each query prediction is independent of the others (Ravi &
    Larochelle at meta-test). Support statistics enter as constants, not differentiated.
    """

    # The `algo` keys that shape adaptation at test time, recorded beside every test number.
    test_keys: tuple[str, ...] = ()

    def __init__(
        self,
        backbone: FunctionalBackbone,
        rule: UpdateRule,
        steps: int,
        steps_test: int,
        second_order: bool,
        batch_norm_train: str,
        batch_norm_test: str,
        adapt_only: Sequence[str] | None = None,
        support_batches: SupportBatches = whole_support_set,
        checkpoint_inner: bool = False,
        second_order_from: int = 0,
        per_step_norm: bool = False,
    ) -> None:
        super().__init__()
        self.backbone, self.rule = backbone, rule  # registered in this order: Adam's state too
        self.steps, self.steps_test, self.second_order = steps, steps_test, second_order
        self.batch_norm_train, self.batch_norm_test = batch_norm_train, batch_norm_test
        self.support_batches, self.checkpoint_inner = support_batches, checkpoint_inner
        self.second_order_from = second_order_from
        norms = norm_parameters(backbone) if per_step_norm else {}
        self.norm_names = tuple(norms)
        # [steps - 1, channels] per batch-norm parameter: steps 1.. (step 0's are the backbone's)
        self.step_norms = nn.ParameterList(
            nn.Parameter(w.detach().expand(steps - 1, -1).clone()) for w in norms.values()
        )
        self.adapted = tuple(adapted_parameters(backbone, adapt_only, per_step_norm))
        if checkpoint_inner and self.other_meta_parameters():
            # The rerun in backward differentiates the weights only, not other meta-parameters.
            raise ConfigError(
                "algo.checkpoint_inner=true cannot rerun inner steps that use meta-parameters "
                "besides the weights (learned step sizes, per-step batch norm): set "
                "algo.checkpoint_inner=false"
            )

    def other_meta_parameters(self) -> list[str]:
        """The names of the meta-parameters beside the backbone's weights (learned step sizes,
        per-step batch norm, Meta-LSTM's cell)."""
        return [n for n, _ in self.named_parameters() if not n.startswith("backbone.")]

    @property
    def rule_reads_loss(self) -> bool:
        """Whether the update rule reads the support loss (Meta-LSTM's does), not only its
        gradient."""
        return getattr(self.rule, "reads_loss", False)

    def initial_weights(self, training: bool) -> Weights:
        weights = dict(self.backbone.named_parameters())
        if training:
            return weights
        # Evaluation differentiates only the inner loop, from constants.
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
        """Yield the task's weights before adaptation and after every inner step.

        support_x [way*shot, C, H, W], support_y [way*shot]; `passes`: how the backbone runs
        (eager when None); `start`: the initial weights, the backbone's when None; `iteration`:
        the meta-iteration, for settings annealed over training. When `training`, the last
        weights carry the graph back to the meta-parameters; otherwise nothing does.
        """
        passes = passes or EagerPasses(self.backbone)
        weights = self.initial_weights(training) if start is None else start
        norm0 = {n: weights[n] for n in self.norm_names}
        yield weights
        second_order = training and self.second_order and iteration >= self.second_order_from
        state = self.rule.init({n: weights[n] for n in self.adapted})
        batches = self.support_batches(
            support_x, support_y, self.steps if training else self.steps_test
        )
        for step, (x, y) in enumerate(batches):
            weights = {**weights, **self._norm_at(step, norm0, training)}
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

    def _norm_at(self, step: int, norm0: Weights, training: bool) -> Weights:
        """Batch norm's weights and biases for inner step `step` (empty without per_step_norm)."""
        last = min(step, self.steps - 1)  # past the trained steps: the last trained step's
        if last == 0:
            return norm0
        norms = {n: p[last - 1] for n, p in zip(self.norm_names, self.step_norms)}
        return norms if training else {n: w.detach() for n, w in norms.items()}

    def step_loss_weights(self, iteration: int) -> Tensor | None:
        """Weights of the query losses after each inner step [steps] that the meta-loss sums at
        meta-iteration `iteration`; None: the last step's loss alone."""
        return None

    def query_logits(
        self,
        weights: Weights,
        support_x: Tensor,
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
