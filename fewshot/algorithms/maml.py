"""Model-agnostic meta-learning."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.algorithms.base import Algorithm, Weights


class MAML(Algorithm):
    """Learns an initialisation from which a few gradient steps on the support set generalise.

    Each inner step is `w <- w - base_lr * grad L_support(w)`; the meta-gradient flows through
    the steps (second order) or treats the inner gradients as constants (`first_order`).

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
    ) -> None:
        super().__init__(backbone, batch_norm_train, batch_norm_test)
        self.base_lr, self.first_order = base_lr, first_order
        self.inner_steps, self.inner_steps_test = inner_steps, inner_steps_test

    def adapt(self, support_x: Tensor, support_y: Tensor, training: bool) -> Iterator[Weights]:
        weights = self.initial_weights(training)
        yield weights
        create_graph = training and not self.first_order
        for _ in range(self.inner_steps if training else self.inner_steps_test):
            with torch.enable_grad():
                loss = F.cross_entropy(self.predict(weights, support_x), support_y)
                grads = torch.autograd.grad(loss, list(weights.values()), create_graph=create_graph)
                weights = {n: w - self.base_lr * g for (n, w), g in zip(weights.items(), grads)}
            if not training:
                weights = {n: w.detach().requires_grad_() for n, w in weights.items()}
            yield weights
