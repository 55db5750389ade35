"""MAML++'s parts, each against what it must do: learned per-step step sizes by hand, the
multi-step loss's weights, derivative-order annealing, per-step batch norm."""

import pytest
import torch

from fewshot.config import check_config
from fewshot.data.episodes import Episodes
from fewshot.errors import ConfigError
from fewshot.methods.mamlpp import multi_step_loss_weights
from tests.helpers import (
    TRANSDUCTIVE,
    FunctionalLinear,
    compose_train,
    conv_episode,
    cross_entropy_grad_and_hessian,
    linear_task,
    make_learner,
    meta_batch,
    small,
    small_backbone,
)

PARTS_OFF = {"lslr": False, "msl_iterations": 0, "per_step_norm": False}
PARTS_OFF |= {"first_order_iterations": 0}


def mamlpp(backbone, **settings):
    steps = {"inner_steps": 2, "inner_steps_test": 2, "base_lr": 0.3}
    return make_learner("mamlpp", backbone, **{**steps, **PARTS_OFF, **TRANSDUCTIVE, **settings})


def linear_episode():
    sx, sy, qx, qy = (t.double() if t.is_floating_point() else t for t in linear_task())
    return sx, sy, qx, qy, Episodes(sx[None], sy[None], qx[None], qy[None])


def test_lslr_meta_gradient_of_each_steps_size_matches_the_hand_derived_one():
    sx, sy, qx, qy, batch = linear_episode()
    backbone = FunctionalLinear(3, 2, bias=False).double()
    learner = mamlpp(backbone, lslr=True).double()
    (rates,) = learner.rule.rates
    with torch.no_grad():
        rates.copy_(torch.tensor([0.2, 0.5], dtype=torch.float64))
    W0 = backbone.weight.detach().clone()
    meta_batch(learner, batch, training=True).loss.backward()

    g0, _ = cross_entropy_grad_and_hessian(W0, sx, sy)
    W1 = W0 - 0.2 * g0
    g1, h1 = cross_entropy_grad_and_hessian(W1, sx, sy)
    W2 = W1 - 0.5 * g1
    gq, _ = cross_entropy_grad_and_hessian(W2, qx, qy)
    # dL/da1 = -<g_q(W2), g_s(W1)>;  dL/da0 = -<(I - a1 H_s(W1)) g_q(W2), g_s(W0)>
    back = gq.flatten() - 0.5 * h1 @ gq.flatten()
    expected = torch.stack([-(back * g0.flatten()).sum(), -(gq * g1).sum()])
    torch.testing.assert_close(rates.grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("steps", [2, 5])
def test_multi_step_loss_weights_sum_to_one_and_anneal_toward_the_last_step(steps):
    schedule = [multi_step_loss_weights(steps, i, 100) for i in (0, 10, 50, 99, 100, 500)]
    for weights in schedule:
        assert weights.sum().item() == pytest.approx(1.0)
    assert torch.allclose(schedule[0], torch.full((steps,), 1 / steps, dtype=torch.float64))
    finals = [w[-1].item() for w in schedule]
    assert finals == sorted(finals) and finals[-1] == pytest.approx(1 - (steps - 1) * 0.03 / steps)
    assert schedule[-1][:-1].min().item() == pytest.approx(0.03 / steps)


def test_the_multi_step_loss_weights_every_steps_query_loss_then_only_the_last():
    learner, _ = small("mamlpp", **{**PARTS_OFF, "msl_iterations": 10}, inner_steps=3)
    torch.manual_seed(0)
    batch = conv_episode(tasks=1)
    last_only, _ = small("mamlpp", **PARTS_OFF, inner_steps=3)
    early = meta_batch(learner, batch, True, iteration=0).loss
    after = meta_batch(learner, batch, True, iteration=10).loss
    torch.testing.assert_close(after, meta_batch(last_only, batch, True).loss)
    assert not torch.allclose(early, after)
    # At iteration 0: the mean of the losses after steps 1, 2 and 3.
    losses = []
    for steps in (1, 2, 3):
        one, _ = small("mamlpp", **PARTS_OFF, inner_steps=steps)
        losses.append(meta_batch(one, batch, True).loss)
    torch.testing.assert_close(early, torch.stack(losses).mean())


def meta_gradient(learner, batch, iteration):
    learner.zero_grad()
    meta_batch(learner, batch, True, iteration=iteration).loss.backward()
    return torch.cat([p.grad.flatten() for p in learner.backbone.parameters()])


def test_derivative_order_annealing_is_first_order_until_its_iteration_then_second():
    batch = conv_episode(tasks=1)
    annealed, _ = small("mamlpp", **{**PARTS_OFF, "first_order_iterations": 5})
    first, _ = small("mamlpp", **PARTS_OFF, first_order=True)
    second, _ = small("mamlpp", **PARTS_OFF)
    torch.testing.assert_close(meta_gradient(annealed, batch, 4), meta_gradient(first, batch, 4))
    torch.testing.assert_close(meta_gradient(annealed, batch, 5), meta_gradient(second, batch, 5))
    assert not torch.allclose(meta_gradient(first, batch, 5), meta_gradient(second, batch, 5))


def test_per_step_batch_norm_uses_each_steps_weights_and_the_last_past_the_trained_steps():
    torch.manual_seed(0)
    learner = mamlpp(small_backbone(), per_step_norm=True, inner_steps=2, inner_steps_test=4)
    assert learner.norm_names and not set(learner.norm_names) & set(learner.adapted)
    with torch.no_grad():
        for i, p in enumerate(learner.step_norms):
            p.copy_(torch.rand_like(p) + i)
    batch = conv_episode()
    yielded = list(learner.adapt(batch.support_x[0], batch.support_y[0], training=False))
    assert len(yielded) == 5  # before, and after each of 4 steps
    step_of = [0, 0, 1, 1, 1]  # weights after step k (0-based k+1) normalise with step k's
    for weights, step in zip(yielded, step_of):
        for name, norms in zip(learner.norm_names, learner.step_norms):
            own = dict(learner.backbone.named_parameters())[name]
            expected = own if step == 0 else norms[step - 1]
            assert torch.equal(weights[name], expected.detach()), (name, step)
    meta_batch(learner, batch, training=True).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.step_norms)


def test_per_step_batch_norm_leaves_nothing_behind_between_episodes():
    learner = mamlpp(small_backbone(), per_step_norm=True, batch_norm_test="support")
    state = {n: t.clone() for n, t in learner.state_dict().items()}
    batch = conv_episode()
    with torch.no_grad():
        first = meta_batch(learner, batch, False).accuracy
        meta_batch(learner, Episodes(*(t.flip(0) for t in batch)), False)
        assert torch.equal(meta_batch(learner, batch, False).accuracy, first)
    assert all(torch.equal(t, state[n]) for n, t in learner.state_dict().items())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algo.msl_iterations=500"], "algo.msl_iterations=500 is not below trainer.max_steps"),
        (["algo.first_order_iterations=9"], "algo.first_order_iterations=9 is not below"),
        (["algo.msl_iterations=-1"], "algo.msl_iterations=-1 is out of range"),
    ],
)
def test_annealing_longer_than_training_is_one_line(overrides, message):
    off = ["algo.msl_iterations=0", "algo.first_order_iterations=0"]
    cfg = compose_train(
        "algo=mamlpp", "trainer.max_steps=9", "trainer.val_check_interval=3", *off, *overrides
    )
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)
