"""Model-agnostic meta-learning: the inner step is a gradient step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from fewshot.methods.gradient import GradientLearner, adapted_parameters
from fewshot.methods.rules import GradientStep, UpdateRule
from fewshot.models.functional import FunctionalBackbone
from fewshot.settings import BOOLEAN, NAMES, POSITIVE, Rule, int_at_least


class MAML(GradientLearner):
    """Learns an initialisation from which a few gradient steps on the support set generalise.

    Each inner step is `w <- w - base_lr * grad L_support(w)`; the meta-gradient flows through
    the steps (second order) or treats the inner gradients as constants (`first_order`).
    `checkpoint_inner` keeps only each step's input weights for the second-order backward pass
    and runs the step again there: the memory of one step instead of all, for one more step each.
    `adapt_only` names the parameters that adapt (prefixes of their names, e.g. [head]: ANIL);
    None: all of them. Variants pass another `rule` (its step) and `frozen` parameters.

    References: Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of
    Deep Networks", ICML 2017, Algorithm 2 and Eq. 1.
    """

    test_keys = ("base_lr", "inner_steps_test")
    settings: ClassVar[dict[str, Rule]] = {
        "base_lr": POSITIVE,
        "inner_steps": int_at_least(1),
        "inner_steps_test": int_at_least(1),
        "first_order": BOOLEAN,
        "checkpoint_inner": BOOLEAN,
        "adapt_only": NAMES,
        **GradientLearner.settings,
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
        *,
        rule: UpdateRule | None = None,
        frozen: Sequence[str] = (),
    ) -> None:
        super().__init__(
            backbone,
            GradientStep(base_lr) if rule is None else rule,
            inner_steps,
            inner_steps_test,
            not first_order,
            batch_norm_train,
            batch_norm_test,
            adapted=tuple(adapted_parameters(backbone, adapt_only, frozen)),
            checkpoint_inner=checkpoint_inner,
        )
