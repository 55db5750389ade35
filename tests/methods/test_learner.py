"""The gradient methods' adapt loop: any update rule, its state threaded through the steps, a
subset adapted."""

import torch
import torch.nn.functional as F

from fewshot.methods.gradient import GradientLearner
from fewshot.models.functional import Weights
from tests.helpers import FunctionalLinear, conv_episode, meta_batch, small


class Momentum:
    """SGD with momentum: a rule whose state (the velocity) changes every step."""

    def __init__(self, lr: float, beta: float) -> None:
        self.lr, self.beta, self.steps = lr, beta, []

    def init(self, weights: Weights) -> Weights:
        return {n: torch.zeros_like(w) for n, w in weights.items()}

    def update(self, grads, state, weights, step, loss):
        self.steps.append(step)
        velocity = {n: self.beta * state[n] + grads[n] for n in grads}
        return {n: w - self.lr * velocity[n] for n, w in weights.items()}, velocity


def test_the_adapt_loop_drives_any_rule_and_threads_its_state_through_the_steps():
    torch.manual_seed(0)
    backbone = FunctionalLinear(3, 2).double()
    rule = Momentum(lr=0.3, beta=0.9)
    adapted = ("weight", "bias")
    learner = GradientLearner(backbone, rule, 1, 3, False, "transductive", "transductive", adapted)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1, 0])
    *_, adapted = learner.adapt(x, y, training=False)
    assert rule.steps == [0, 1, 2]

    w = {n: p.detach().clone().requires_grad_() for n, p in backbone.named_parameters()}
    velocity = {n: torch.zeros_like(t) for n, t in w.items()}
    for _ in range(3):  # by hand
        loss = F.cross_entropy(F.linear(x, w["weight"], w["bias"]), y)
        grads = dict(zip(w, torch.autograd.grad(loss, list(w.values()))))
        velocity = {n: 0.9 * velocity[n] + grads[n] for n in w}
        w = {n: (t - 0.3 * velocity[n]).detach().requires_grad_() for n, t in w.items()}
    for name, expected in w.items():
        torch.testing.assert_close(adapted[name], expected.detach(), rtol=1e-12, atol=1e-14)


def test_adapt_only_adapts_the_named_parameters_while_the_outer_loop_learns_them_all():
    learner, _ = small("maml", adapt_only=["head"])
    batch = conv_episode()
    start, *_, adapted = learner.adapt(batch.support_x[0], batch.support_y[0], training=True)
    for name, w in adapted.items():
        assert torch.equal(w, start[name]) != name.startswith("head."), name
    meta_batch(learner, batch, training=True).loss.backward()
    for name, p in learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
