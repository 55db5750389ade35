"""The benchmark's references: MAML and Meta-LSTM written the usual way, task by task, on an
ordinary nn.Module, with none of fewshot's machinery. bench/speed.py times them beside fewshot on
the same workloads; tests/test_bench_reference.py checks that they compute the same numbers.

Episodes are four tensors per meta-batch: support_x [tasks, way*shot, C, H, W], support_y
[tasks, way*shot], query_x [tasks, way*query, C, H, W], query_y [tasks, way*query].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

Weights = dict[str, Tensor]


class ConvNet(nn.Module):
    """`blocks` x (conv 3x3 -> batch norm -> ReLU -> [2x2 max-pool]) -> linear to `way` classes.

    Batch norm normalises with the batch's own statistics; with `support_statistics` it also
    keeps the last training-mode batch's (momentum 1), which eval mode then normalises with.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        way: int,
        channels: int,
        padding: int,
        stride: int,
        pool: bool,
        blocks: int = 4,
        support_statistics: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size, width = image_size, in_channels
        for _ in range(blocks):
            layers += [
                nn.Conv2d(width, channels, 3, stride=stride, padding=padding),
                nn.BatchNorm2d(channels, momentum=1.0, track_running_stats=support_statistics),
                nn.ReLU(),
            ]
            size = (size + 2 * padding - 3) // stride + 1
            if pool:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            width = channels
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(channels * size * size, way)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def maml_adapt(
    net: nn.Module, x: Tensor, y: Tensor, base_lr: float, steps: int, create_graph: bool
) -> Weights:
    """`steps` gradient steps on (x, y) from the net's weights; with `create_graph` the result
    stays differentiable through the inner gradients (second order)."""
    weights = dict(net.named_parameters())
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(net, weights, (x,)), y)
        grads = torch.autograd.grad(loss, list(weights.values()), create_graph=create_graph)
        weights = {n: w - base_lr * g for (n, w), g in zip(weights.items(), grads)}
    return weights


def maml_backward(
    net: nn.Module,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    base_lr: float,
    steps: int,
    first_order: bool,
) -> Tensor:
    """Accumulate MAML's meta-gradient of the mean query loss into the net's `.grad`, one task's
    backward at a time (one task's graph alive), and return that mean loss, detached.

    References: Finn, Abbeel & Levine, ICML 2017, Algorithm 2.
    """
    tasks, total = len(query_y), 0.0
    for sx, sy, qx, qy in zip(support_x, support_y, query_x, query_y):
        weights = maml_adapt(net, sx, sy, base_lr, steps, create_graph=not first_order)
        loss = F.cross_entropy(functional_call(net, weights, (qx,)), qy) / tasks
        loss.backward()
        total += loss.detach()
    return total


def maml_test_episode(
    net: nn.Module,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    base_lr: float,
    steps: int,
) -> Tensor:
    """Query logits [way*query, way] of one task after `steps` steps on its support set; no graph
    is kept beyond each step's own gradient."""
    weights = {n: w.detach() for n, w in net.named_parameters()}
    for _ in range(steps):
        with torch.enable_grad():
            leaves = {n: w.requires_grad_() for n, w in weights.items()}
            loss = F.cross_entropy(functional_call(net, leaves, (support_x,)), support_y)
            grads = torch.autograd.grad(loss, list(leaves.values()))
        with torch.no_grad():
            weights = {n: w - base_lr * g for (n, w), g in zip(leaves.items(), grads)}
    with torch.no_grad():
        return functional_call(net, weights, (query_x,))


def preprocess(x: Tensor, p: float = 10.0) -> Tensor:
    """[...] -> [..., 2]: (log|x| / p, sign x) where |x| >= e^-p, else (-1, e^p x).

    References: Andrychowicz et al., NeurIPS 2016, Appendix A.
    """
    large = x.abs() >= math.exp(-p)
    # log of a clamped |x|: the branch torch.where drops must not be -inf.
    log = x.abs().clamp_min(math.exp(-p)).log() / p
    return torch.stack(
        [torch.where(large, log, -1.0), torch.where(large, x.sign(), math.exp(p) * x)], -1
    )


class MetaLearner(nn.Module):
    """Ravi & Larochelle's meta-learner: per coordinate of the learner's flat parameters, an LSTM
    over the preprocessed (loss, gradient) and a cell `c <- f * c - i * grad` with learned gates
    `sigmoid(W [h, c, gate before] + b)`; every weight shared across coordinates. Initialised as
    the paper's code does: forget bias in [4, 6], input bias in [-5, -4], the rest in +-0.01.

    References: Ravi & Larochelle, "Optimization as a Model for Few-Shot Learning", ICLR 2017,
    Eqs. 2-4 and Section 3.2.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.lstm = nn.LSTMCell(4, hidden_size)
        self.forget_gate = nn.Linear(hidden_size + 2, 1)
        self.input_gate = nn.Linear(hidden_size + 2, 1)
        for weight in (*self.lstm.parameters(), self.forget_gate.weight, self.input_gate.weight):
            nn.init.uniform_(weight, -0.01, 0.01)
        nn.init.uniform_(self.forget_gate.bias, 4.0, 6.0)
        nn.init.uniform_(self.input_gate.bias, -5.0, -4.0)

    def forward(
        self,
        loss: Tensor,
        grad: Tensor,
        c: Tensor,
        f: Tensor,
        i: Tensor,
        state: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
        """One update of the flat parameters c [P] by their gradient [P] at support loss []."""
        inputs = torch.cat([preprocess(loss).expand(len(grad), 2), preprocess(grad)], 1)
        h, cell = self.lstm(inputs, state)
        f = torch.sigmoid(self.forget_gate(torch.cat([h, c[:, None], f[:, None]], 1)))[:, 0]
        i = torch.sigmoid(self.input_gate(torch.cat([h, c[:, None], i[:, None]], 1)))[:, 0]
        return f * c - i * grad, f, i, (h, cell)


def metalstm_adapt(
    net: nn.Module, meta: MetaLearner, x: Tensor, y: Tensor, epochs: int, training: bool
) -> Weights:
    """The learner's weights after `epochs` meta-learner updates, each on the whole support set
    (the paper's batch size is the support set's size). The learner's loss and gradient enter as
    data; when `training`, the result carries the graph to the meta-learner and the initial
    weights, else nothing does."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [w.shape for _, w in net.named_parameters()]
    c = torch.cat([w.reshape(-1) for w in net.parameters()])
    if not training:
        c = c.detach()
    f = i = torch.zeros_like(c)
    state = None

    def unflat(vector: Tensor) -> list[Tensor]:
        parts = vector.split([math.prod(s) for s in shapes])
        return [part.view(shape) for part, shape in zip(parts, shapes)]

    for _ in range(epochs):
        with torch.enable_grad():
            leaves = [w.detach().requires_grad_() for w in unflat(c)]
            loss = F.cross_entropy(functional_call(net, dict(zip(names, leaves)), (x,)), y)
            grads = torch.autograd.grad(loss, leaves)
        grad = torch.cat([g.reshape(-1) for g in grads])
        with torch.set_grad_enabled(training):
            c, f, i, state = meta(loss.detach(), grad, c, f, i, state)
    return dict(zip(names, unflat(c)))


def metalstm_backward(
    net: nn.Module,
    meta: MetaLearner,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    epochs: int,
) -> Tensor:
    """Accumulate the meta-gradient of the mean query loss (batch statistics) into `.grad` of
    the net and the meta-learner, task by task, and return that mean loss, detached.

    References: Ravi & Larochelle, ICLR 2017, Algorithm 1.
    """
    tasks, total = len(query_y), 0.0
    for sx, sy, qx, qy in zip(support_x, support_y, query_x, query_y):
        weights = metalstm_adapt(net, meta, sx, sy, epochs, training=True)
        loss = F.cross_entropy(functional_call(net, weights, (qx,)), qy) / tasks
        loss.backward()
        total += loss.detach()
    return total


def metalstm_test_episode(
    net: nn.Module,
    meta: MetaLearner,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    epochs: int,
) -> Tensor:
    """Query logits [way*query, way] of one task after adaptation, batch norm normalising the
    query with the support set's statistics under the adapted weights (`net` built with
    `support_statistics`)."""
    weights = metalstm_adapt(net, meta, support_x, support_y, epochs, training=False)
    with torch.no_grad():
        functional_call(net, weights, (support_x,))  # records the support set's statistics
        net.eval()
        try:
            return functional_call(net, weights, (query_x,))
        finally:
            net.train()
