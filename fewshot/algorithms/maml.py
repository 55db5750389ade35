"""Model-agnostic meta-learning."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
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
        checkpoint_inner: bool = False,  # the default of runs from before the key existed
    ) -> None:
        super().__init__(backbone, batch_norm_train, batch_norm_test)
        self.base_lr, self.first_order = base_lr, first_order
        self.checkpoint_inner = checkpoint_inner
        self.inner_steps, self.inner_steps_test = inner_steps, inner_steps_test

    def adapt(self, support_x: Tensor, support_y: Tensor, training: bool) -> Iterator[Weights]:
        weights = self.initial_weights(training)
        yield weights
        create_graph = training and not self.first_order

        def step(weights: Weights) -> Weights:
            with torch.enable_grad():
                loss = F.cross_entropy(self.predict(weights, support_x), support_y)
                grads = torch.autograd.grad(loss, list(weights.values()), create_graph=create_graph)
                return {n: w - self.base_lr * g for (n, w), g in zip(weights.items(), grads)}

        for _ in range(self.inner_steps if training else self.inner_steps_test):
            if create_graph and self.checkpoint_inner:
                weights = recomputed(step, weights)
            else:
                weights = step(weights)
            if not training:
                weights = {n: w.detach().requires_grad_() for n, w in weights.items()}
            yield weights
