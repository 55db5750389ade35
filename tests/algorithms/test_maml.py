"""MAML's meta-gradient against a hand derivation, and the properties adaptation must have."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot.algorithms import MAML
from fewshot.data.episodes import Episodes
from fewshot.errors import ConfigError
from fewshot.models.conv4 import Conv4
from tests.conftest import conv_episode

ALPHA = 0.3
TRANSDUCTIVE = ("transductive", "transductive")  # batch_norm_train, batch_norm_test


def linear_task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sx, qx = torch.randn(6, 3, generator=g), torch.randn(8, 3, generator=g)
    sy, qy = torch.randint(0, 2, (6,), generator=g), torch.randint(0, 2, (8,), generator=g)
    return sx, sy, qx, qy


def softmax_ce_grad_and_hessian(W, x, y):
    """Gradient and Hessian of mean cross-entropy of logits x W^T w.r.t. W (row-major), by hand:
    grad = (p - onehot)^T x / n,  H = sum_i kron(diag(p_i) - p_i p_i^T, x_i x_i^T) / n."""
    p = torch.softmax(x @ W.T, dim=1)
    grad = (p - F.one_hot(y, W.shape[0]).double()).T @ x / len(x)
    hessian = sum(
        torch.kron(torch.diag(pi) - torch.outer(pi, pi), torch.outer(xi, xi))
        for pi, xi in zip(p, x)
    )
    return grad, hessian / len(x)


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_the_hand_derived_one(first_order):
    sx, sy, qx, qy = (t.double() if t.is_floating_point() else t for t in linear_task())
    backbone = nn.Linear(3, 2, bias=False).double()
    W = backbone.weight.detach().clone()
    maml = MAML(backbone, ALPHA, 1, 1, first_order, *TRANSDUCTIVE)
    maml(Episodes(sx[None], sy[None], qx[None], qy[None]), training=True).loss.backward()

    g_support, h_support = softmax_ce_grad_and_hessian(W, sx, sy)
    adapted = W - ALPHA * g_support
    g_query, _ = softmax_ce_grad_and_hessian(adapted, qx, qy)
    if first_order:
        expected = g_query
    else:  # d/dW L_q(W - a g_s(W)) = (I - a H_s) g_q(W')
        expected = (
            (torch.eye(6, dtype=torch.float64) - ALPHA * h_support) @ g_query.flatten()
        ).view(2, 3)
    torch.testing.assert_close(backbone.weight.grad, expected, rtol=1e-10, atol=1e-12)


def test_second_order_term_changes_the_meta_gradient():
    grads = []
    for first_order in (False, True):
        torch.manual_seed(0)
        backbone = nn.Linear(3, 2)
        sx, sy, qx, qy = linear_task()
        MAML(backbone, ALPHA, 2, 2, first_order, *TRANSDUCTIVE)(
            Episodes(sx[None], sy[None], qx[None], qy[None]), training=True
        ).loss.backward()
        grads.append(backbone.weight.grad)
    assert not torch.allclose(*grads)


def small_maml(**kwargs) -> MAML:
    torch.manual_seed(0)
    backbone = Conv4(1, 12, num_classes=3, channels=4, padding=1, stride=1, pool=True, blocks=2)
    settings = {"base_lr": 0.5, "inner_steps": 3, "inner_steps_test": 3, "first_order": False}
    settings |= {"batch_norm_train": "transductive", "batch_norm_test": "transductive"} | kwargs
    return MAML(backbone, **settings)


def test_adaptation_lowers_the_support_loss():
    maml, batch = small_maml(), conv_episode()
    losses = [
        F.cross_entropy(maml.predict(w, batch.support_x[0]), batch.support_y[0]).item()
        for w in maml.adapt(batch.support_x[0], batch.support_y[0], training=False)
    ]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_test_time_steps_are_separate_from_training_steps():
    maml = small_maml(inner_steps=1, inner_steps_test=4)
    batch = conv_episode()
    assert len(list(maml.adapt(batch.support_x[0], batch.support_y[0], training=True))) == 2
    assert len(list(maml.adapt(batch.support_x[0], batch.support_y[0], training=False))) == 5


def query_logits_with_other_queries_replaced(batch_norm: str):
    maml, batch = small_maml(batch_norm_test=batch_norm), conv_episode()
    sx, sy, qx = batch.support_x[0], batch.support_y[0], batch.query_x[0]
    *_, weights = maml.adapt(sx, sy, training=False)
    changed = qx.clone()
    changed[1:] = torch.rand_like(changed[1:])
    with torch.no_grad():
        return [maml.predict_query(weights, sx, q, batch_norm)[0] for q in (qx, changed)]


def test_support_batch_norm_makes_each_query_prediction_independent_of_the_others():
    original, changed = query_logits_with_other_queries_replaced("support")
    torch.testing.assert_close(original, changed)


def test_transductive_batch_norm_lets_other_queries_change_a_prediction():
    original, changed = query_logits_with_other_queries_replaced("transductive")
    assert not torch.allclose(original, changed)


def test_support_statistics_do_not_leak_between_episodes():
    maml, batch = small_maml(batch_norm_test="support"), conv_episode()
    buffers_before = {n: b.clone() for n, b in maml.backbone.named_buffers()}
    with torch.no_grad():
        first = maml(batch, training=False).accuracy
        maml(Episodes(*(t.flip(0) for t in batch)), training=False)
        again = maml(batch, training=False).accuracy
    torch.testing.assert_close(first, again)
    for name, b in maml.backbone.named_buffers():
        assert torch.equal(b, buffers_before[name]), name


def test_unknown_batch_norm_mode_names_the_key():
    with pytest.raises(ConfigError, match="algo.batch_norm_test='query'"):
        small_maml(batch_norm_test="query")
