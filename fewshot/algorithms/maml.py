"""Model-agnostic meta-learning."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from fewshot.algorithms.base import Algorithm, Weights
from fewshot.algorithms.recomputation import recomputed


class MAML(Algorithm):
    """Learns an initialisation from which a few gradient steps on the support set generalise.

    Each inner step is `w <- w - base_lr * grad L_support(w)`; the meta-gradient flows through
    the steps (second order) or treats the inner gradients as constants (`first_order`).
    `checkpoint_inner` keeps only each step's input weights for the second-order backward pass
    and runs the step again there: the memory of one step instead of all, for one more step each.

    References: Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of
    Deep Networks", ICML 2017, Algorithm 2 and Eq. 1.
    """

    test_keys = ("base_lr", "inner_steps_test")

    def __init__(
        self,
        backbone: nn.Module,
        base_lr: float,
        inner_steps: int,
        inner_steps_test: int,
        first_order: bool,
        batch_norm_train: str,
        batch_norm_test: str,
        vmap_tasks: bool = False,
        checkpoint_inner: bool = False,  # the default of runs from before the key existed
    ) -> None:
        super().__init__(backbone, batch_norm_train, batch_norm_test, vmap_tasks)
        self.base_lr, self.first_order = base_lr, first_order
        self.checkpoint_inner = checkpoint_inner
        self.inner_steps, self.inner_steps_test = inner_steps, inner_steps_test

    def adapt(
        self, support_x: Tensor, support_y: Tensor, training: bool, start: Weights | None = None
    ) -> Iterator[Weights]:
        weights = self.initial_weights(training, start)
        yield weights
        second_order = training and not self.first_order

        def step(weights: Weights) -> Weights:
            grads = self.support_gradients(weights, support_x, support_y, second_order)
            return {n: w - self.base_lr * grads[n] for n, w in weights.items()}

        for _ in range(self.inner_steps if training else self.inner_steps_test):
            weights = (
                recomputed(step, weights)
                if second_order and self.checkpoint_inner
                else step(weights)
            )
            yield weights
