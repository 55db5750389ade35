"""Meta-SGD's meta-gradients, for the weights and for the learned step sizes, by hand."""

import pytest
import torch

from fewshot.config import check_config
from fewshot.data.episodes import Episodes
from fewshot.errors import ConfigError
from tests.helpers import (
    TRANSDUCTIVE,
    FunctionalLinear,
    compose_train,
    cross_entropy_grad_and_hessian,
    linear_task,
    make_learner,
    meta_batch,
    small,
)


def test_meta_gradients_of_weights_and_step_sizes_match_the_hand_derived_ones():
    sx, sy, qx, qy = (t.double() if t.is_floating_point() else t for t in linear_task())
    backbone = FunctionalLinear(3, 2, bias=False).double()
    steps = {"inner_steps": 1, "inner_steps_test": 1}
    learner = make_learner("metasgd", backbone, base_lr=0.3, **steps, **TRANSDUCTIVE).double()
    (rates,) = learner.rule.rates
    with torch.no_grad():  # step sizes that differ per coordinate, as after meta-training
        rates.copy_(torch.linspace(0.1, 0.6, 6, dtype=torch.float64).view(1, 2, 3))
    alpha, W = rates[0].detach(), backbone.weight.detach().clone()
    meta_batch(learner, Episodes(sx[None], sy[None], qx[None], qy[None]), True).loss.backward()

    g_support, h_support = cross_entropy_grad_and_hessian(W, sx, sy)
    g_query, _ = cross_entropy_grad_and_hessian(W - alpha * g_support, qx, qy)
    # W' = W - alpha * g_s(W):  dL/dW = g_q - H_s (alpha * g_q),  dL/dalpha = -g_q * g_s
    expected_w = g_query - (h_support @ (alpha * g_query).flatten()).view(2, 3)
    torch.testing.assert_close(backbone.weight.grad, expected_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rates.grad[0], -g_query * g_support, rtol=1e-10, atol=1e-12)


def test_step_sizes_start_at_base_lr_in_the_weights_shapes_and_are_learned():
    learner, _ = small("metasgd", base_lr=0.25)
    for name, rates in zip(learner.rule.names, learner.rule.rates):
        weight = dict(learner.backbone.named_parameters())[name]
        assert rates.shape == (1, *weight.shape) and bool((rates == 0.25).all()), name
    assert set(learner.rule.rates.parameters()) <= set(learner.parameters())


def test_checkpoint_inner_is_refused_for_learned_step_sizes():
    with pytest.raises(ConfigError, match="algo.checkpoint_inner=true cannot rerun inner steps"):
        small("metasgd", checkpoint_inner=True)


def test_the_metasgd_option_composes_from_mamls_defaults():
    cfg = compose_train("algo=metasgd")
    check_config(cfg)
    assert (cfg.algo.name, cfg.algo.base_lr, cfg.algo.inner_steps) == ("metasgd", 0.4, 1)
