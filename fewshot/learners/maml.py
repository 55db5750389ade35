"""Model-agnostic meta-learning: the inner step is a gradient step."""

from __future__ import annotations

from collections.abc import Sequence

from fewshot.learners.learner import Learner, adapted_parameters
from fewshot.learners.rules import GradientStep, UpdateRule
from fewshot.models.functional import FunctionalBackbone, Weights


class MAML(Learner):
    """Learns an initialisation from which a few gradient steps on the support set generalise.

    Each inner step is `w <- w - base_lr * grad L_support(w)`; the meta-gradient flows through
    the steps (second order) or treats the inner gradients as constants (`first_order`).
    `checkpoint_inner` keeps only each step's input weights for the second-order backward pass
    and runs the step again there: the memory of one step instead of all, for one more step each.
    Variants change the step's rule (`step_rule`) or pass the adapt loop's other settings.

    References: Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of
    Deep Networks", ICML 2017, Algorithm 2 and Eq. 1.
    """

    test_keys = ("base_lr", "inner_steps_test")

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
        *,
        second_order_from: int = 0,
        per_step_norm: bool = False,
    ) -> None:
        adapted = adapted_parameters(backbone, adapt_only, per_step_norm)
        super().__init__(
            backbone,
            self.step_rule(adapted, base_lr, inner_steps),
            inner_steps,
            inner_steps_test,
            not first_order,
            batch_norm_train,
            batch_norm_test,
            adapt_only=adapt_only,
            checkpoint_inner=checkpoint_inner,
            second_order_from=second_order_from,
            per_step_norm=per_step_norm,
        )

    def step_rule(self, adapted: Weights, base_lr: float, steps: int) -> UpdateRule:
        """The inner step's rule for the weights `adapted` over `steps` inner steps."""
        return GradientStep(base_lr)
