"""MAML's meta-gradient against a hand derivation, and the properties adaptation must have."""

import pytest
import torch
import torch.nn.functional as F

from fewshot.data.episodes import Episodes
from fewshot.methods import Learner
from tests.helpers import (
    TRANSDUCTIVE,
    FunctionalLinear,
    conv_episode,
    cross_entropy_grad_and_hessian,
    linear_task,
    make_learner,
    meta_batch,
    small_backbone,
)

ALPHA = 0.3


def linear_maml(backbone: FunctionalLinear, steps: int, first_order: bool) -> Learner:
    settings = {"inner_steps": steps, "inner_steps_test": steps, "first_order": first_order}
    return make_learner("maml", backbone, base_lr=ALPHA, **settings, **TRANSDUCTIVE)


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_the_hand_derived_one(first_order):
    sx, sy, qx, qy = (t.double() if t.is_floating_point() else t for t in linear_task())
    backbone = FunctionalLinear(3, 2, bias=False).double()
    W = backbone.weight.detach().clone()
    maml = linear_maml(backbone, 1, first_order)
    meta_batch(maml, Episodes(sx[None], sy[None], qx[None], qy[None]), True).loss.backward()

    g_support, h_support = cross_entropy_grad_and_hessian(W, sx, sy)
    adapted = W - ALPHA * g_support
    g_query, _ = cross_entropy_grad_and_hessian(adapted, qx, qy)
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
        backbone = FunctionalLinear(3, 2)
        sx, sy, qx, qy = linear_task()
        maml = linear_maml(backbone, 2, first_order)
        meta_batch(maml, Episodes(sx[None], sy[None], qx[None], qy[None]), True).loss.backward()
        grads.append(backbone.weight.grad)
    assert not torch.allclose(*grads)


def small_maml(**settings) -> Learner:
    torch.manual_seed(0)
    settings = {"base_lr": 0.5, "inner_steps": 3, "inner_steps_test": 3, **TRANSDUCTIVE, **settings}
    return make_learner("maml", small_backbone(), **settings)


def test_adaptation_lowers_the_support_loss():
    maml, batch = small_maml(), conv_episode()
    losses = [
        F.cross_entropy(
            maml.backbone.forward_with(w, batch.support_x[0]), batch.support_y[0]
        ).item()
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
        return [maml.query_logits(weights, sx, sy, q, training=False)[0] for q in (qx, changed)]


def test_support_batch_norm_makes_each_query_prediction_independent_of_the_others():
    original, changed = query_logits_with_other_queries_replaced("support")
    torch.testing.assert_close(original, changed)


def test_transductive_batch_norm_lets_other_queries_change_a_prediction():
    original, changed = query_logits_with_other_queries_replaced("transductive")
    assert not torch.allclose(original, changed)


def test_support_statistics_do_not_leak_between_episodes():
    maml, batch = small_maml(batch_norm_test="support"), conv_episode()
    state_before = {n: t.clone() for n, t in maml.state_dict().items()}
    with torch.no_grad():
        first = meta_batch(maml, batch, training=False).accuracy
        meta_batch(maml, Episodes(*(t.flip(0) for t in batch)), training=False)
        again = meta_batch(maml, batch, training=False).accuracy
    torch.testing.assert_close(first, again)
    for name, t in maml.state_dict().items():
        assert torch.equal(t, state_before[name]), name
