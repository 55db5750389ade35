"""MAML++: MAML with the fixes of "How to train your MAML", each one a setting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from fewshot.methods.gradient import adapted_parameters, norm_parameters
from fewshot.methods.maml import MAML
from fewshot.methods.metasgd import LearnedStepSizes
from fewshot.methods.rules import GradientStep, UpdateRule
from fewshot.models.functional import FunctionalBackbone, Weights
from fewshot.settings import BOOLEAN, Rule, int_at_least

# The least weight a step before the last keeps while the multi-step loss anneals (x 1/steps),
# as in the authors' code.
MSL_FLOOR = 0.03


def multi_step_loss_weights(steps: int, iteration: int, iterations: int) -> Tensor:
    """[steps] weights of the query losses after each inner step, summing to 1: equal at
    iteration 0, moving linearly toward the last step until `iterations`, where the earlier
    steps keep MSL_FLOOR / steps each (Antoniou et al.'s schedule, counted in meta-iterations
    instead of epochs)."""
    decay = iteration / (steps * iterations)
    floor = MSL_FLOOR / steps
    weights = torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    weights[:-1] = (weights[:-1] - decay).clamp_min(floor)
    weights[-1] = min(1.0 / steps + decay * (steps - 1), 1.0 - (steps - 1) * floor)
    return weights


class MAMLPlusPlus(MAML):
    """MAML with, each as a key: `lslr`, a learned step size per weight tensor and inner step;
    `msl_iterations`, the multi-step loss (the query losses after every step, weighted, annealed
    toward the last step over that many meta-iterations, then the last step's alone; 0: off);
    `per_step_norm`, batch norm's weights and biases per inner step (BNWB); and
    `first_order_iterations`, first order for that many meta-iterations, then second order.

    Batch norm's per-step running statistics (BNRS) are not kept: the authors' layer normalises
    with the batch's statistics in every pass (training=True), so its running statistics change
    no prediction; fewshot's `transductive` mode is that normalisation. With per-step settings,
    inner steps past the trained ones (inner_steps_test > inner_steps) use the last trained
    step's step sizes and batch-norm weights. Cosine annealing of meta_lr is the outer loop's
    `algo.meta_lr_schedule`.

    References: Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019, Section 4.
    """

    settings: ClassVar[dict[str, Rule]] = {
        **MAML.settings,
        "lslr": BOOLEAN,
        "per_step_norm": BOOLEAN,
        "msl_iterations": int_at_least(0),
        "first_order_iterations": int_at_least(0),
    }

    def __init__(
        self,
        backbone: FunctionalBackbone,
        base_lr: float,
        inner_steps: int,
        inner_steps_test: int,
        first_order: bool,
        batch_norm_train: str,
        batch_norm_test: str,
        checkpoint_inner: bool,
        adapt_only: Sequence[str] | None,
        lslr: bool,
        msl_iterations: int,
        per_step_norm: bool,
        first_order_iterations: int,
    ) -> None:
        norms = norm_parameters(backbone) if per_step_norm else {}
        adapted = adapted_parameters(backbone, adapt_only, frozen=tuple(norms))
        rule: UpdateRule = (
            LearnedStepSizes(adapted, base_lr, inner_steps, per_coordinate=False)
            if lslr
            else GradientStep(base_lr)
        )
        super().__init__(
            backbone,
            base_lr,
            inner_steps,
            inner_steps_test,
            first_order,
            batch_norm_train,
            batch_norm_test,
            checkpoint_inner=False,  # checked below, once the per-step norms are registered
            adapt_only=adapt_only,
            rule=rule,
            frozen=tuple(norms),
        )
        self.first_order_iterations = first_order_iterations
        # Per-step batch norm (BNWB): [steps - 1, channels] per batch-norm parameter, for steps
        # 1.. (step 0's are the backbone's own); they are meta-learned and never adapt.
        self.norm_names = tuple(norms)
        self.step_norms = nn.ParameterList(
            nn.Parameter(w.detach().expand(inner_steps - 1, -1).clone()) for w in norms.values()
        )
        self.checkpoint_inner = checkpoint_inner
        self.check_recomputable()
        self.msl_iterations = msl_iterations
        # Every annealed iteration's weights, made once: a buffer moves with the learner to its
        # device, so a step reads its row there instead of copying new weights from the host.
        table = [
            multi_step_loss_weights(inner_steps, i, msl_iterations) for i in range(msl_iterations)
        ]
        self.register_buffer(
            "msl_weights",
            torch.stack(table) if table else torch.empty(0, inner_steps, dtype=torch.float64),
            persistent=False,  # a function of the settings: checkpoints hold none
        )

    def second_order_at(self, iteration: int) -> bool:
        # Derivative-order annealing: first order for the first first_order_iterations.
        return self.second_order and iteration >= self.first_order_iterations

    def step_weights(self, step: int, weights: Weights, training: bool) -> Weights:
        """Batch norm's weights and biases of inner step `step` in place of the last step's;
        steps past the trained ones use the last trained step's."""
        last = min(step, self.steps - 1)
        if last == 0:  # the backbone's own, which no step has replaced
            return weights
        norms = {n: p[last - 1] for n, p in zip(self.norm_names, self.step_norms)}
        return {**weights, **(norms if training else {n: w.detach() for n, w in norms.items()})}

    def step_loss_weights(self, iteration: int) -> Tensor | None:
        if self.msl_iterations == 0 or iteration >= self.msl_iterations:
            return None
        return self.msl_weights[iteration]
