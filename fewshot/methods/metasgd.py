"""Meta-SGD: MAML whose inner step sizes are meta-learned too, one per coordinate."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fewshot.methods.gradient import adapted_parameters
from fewshot.methods.maml import MAML
from fewshot.models.functional import FunctionalBackbone, Weights


class LearnedStepSizes(nn.Module):
    """`w <- w - lr * grad` with `lr` a meta-parameter: one per coordinate of every weight
    (`per_coordinate`, Meta-SGD's alpha) or one per weight tensor, and one per inner step
    (`steps`) or shared by all steps (steps=1). Steps past the last trained one use its rates.

    The rates start at `base_lr` and are not constrained to stay positive (neither paper
    constrains them).
    """

    def __init__(
        self, like: Weights, base_lr: float, steps: int = 1, per_coordinate: bool = True
    ) -> None:
        super().__init__()
        self.names = tuple(like)
        # rates[i]: [steps, *shape of weight i] per coordinate, else [steps]
        self.rates = nn.ParameterList(
            nn.Parameter(torch.full((steps, *(w.shape if per_coordinate else ())), base_lr))
            for w in like.values()
        )

    def init(self, weights: Weights) -> None:
        return None

    def update(
        self, grads: Weights, state: None, weights: Weights, step: int, loss: Tensor
    ) -> tuple[Weights, None]:
        updated = {}
        for name, rates in zip(self.names, self.rates):
            rate = rates[min(step, len(rates) - 1)]
            if rate.dim() == 0:
                rate = rate.to(weights[name].dtype)
            updated[name] = weights[name] - rate * grads[name]
        return updated, None


class MetaSGD(MAML):
    """Learns the initialisation and a step size per coordinate: `w <- w - alpha * grad`, with
    `alpha` (initialised to `base_lr`) of the weights' shapes, meta-learned with them.

    References: Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot
    Learning", arXiv:1707.09835, 2017, Eq. 3 and Algorithm 1.
    """

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
    ) -> None:
        rates = LearnedStepSizes(adapted_parameters(backbone, adapt_only), base_lr)
        super().__init__(
            backbone,
            base_lr,
            inner_steps,
            inner_steps_test,
            first_order,
            batch_norm_train,
            batch_norm_test,
            checkpoint_inner,
            adapt_only,
            rule=rates,
        )
