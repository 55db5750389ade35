"""bench/reference.py computes what fewshot's learners compute on bench/speed.py's workloads, so
that the benchmark's ratio compares implementations of the same mathematics."""

from dataclasses import replace

import pytest
import torch

from bench import reference
from bench.speed import POOLED_32, STRIDED, WORKLOADS, Workload, build, episodes, reference_net
from fewshot.methods import plain_backward, run_tasks

CPU = torch.device("cpu")


def tiny(name: str, **backbone) -> Workload:
    """The workload `name` at a size that runs in a second, in float64 below."""
    workload = next(w for w in WORKLOADS if w.name == name)
    settings = {**workload.backbone, **backbone, "channels": 4}
    return replace(workload, backbone=settings, image_size=16, way=3, shot=2, query=2, tasks=2)


def twins(workload):
    """fewshot's loop scorer and the reference's net on the same float64 weights."""
    tasks = build(workload, "loop")
    tasks.learner.double()
    net = reference_net(workload).double()
    ours = dict(tasks.learner.backbone.named_parameters())
    with torch.no_grad():  # parameters only: the reference's batch norm may keep statistics
        for name, p in net.named_parameters():
            p.copy_(ours.pop(name))
    assert not ours
    batch = episodes(workload, workload.tasks, CPU)
    return tasks, net, type(batch)(*(t.double() if t.is_floating_point() else t for t in batch))


def assert_same_gradients(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name] is not None and ours[name].abs().sum() > 0, name
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("backbone", [STRIDED, POOLED_32], ids=["strided", "pooled"])
@pytest.mark.parametrize("first_order", [False, True])
def test_reference_maml_has_fewshots_meta_loss_meta_gradient_and_test_logits(backbone, first_order):
    workload = tiny("maml_omniglot_5w1s", **backbone)
    algo = {**workload.algo, "inner_steps": 2, "inner_steps_test": 3, "first_order": first_order}
    workload = replace(workload, algo=algo)
    tasks, net, batch = twins(workload)

    loss = run_tasks(tasks, batch, training=True, backward=plain_backward).loss
    their_loss = reference.maml_backward(net, *batch, algo["base_lr"], 2, first_order)
    torch.testing.assert_close(loss, their_loss, rtol=1e-12, atol=0)
    assert_same_gradients(
        {n: p.grad for n, p in tasks.learner.backbone.named_parameters()},
        {n: p.grad for n, p in net.named_parameters()},
    )

    learner, (sx, sy, qx, _) = tasks.learner, (t[0] for t in batch)
    *_, adapted = learner.adapt(sx, sy, training=False)
    logits = learner.query_logits(adapted, sx, sy, qx, training=False)
    their_logits = reference.maml_test_episode(net, sx, sy, qx, algo["base_lr"], 3)
    torch.testing.assert_close(logits, their_logits, rtol=1e-10, atol=1e-12)


def test_reference_metalstm_has_fewshots_meta_loss_meta_gradient_and_test_logits():
    workload = tiny("metalstm_miniimagenet_5w5s")
    algo = {**workload.algo, "inner_epochs": 3, "inner_batch_size": 25}  # the whole support set
    workload = replace(workload, algo=algo)
    tasks, net, batch = twins(workload)
    meta = reference.MetaLearner(algo["hidden_size"]).double()
    meta.load_state_dict(tasks.learner.rule.state_dict())

    loss = run_tasks(tasks, batch, training=True, backward=plain_backward).loss
    their_loss = reference.metalstm_backward(net, meta, *batch, 3)
    torch.testing.assert_close(loss, their_loss, rtol=1e-12, atol=0)
    assert_same_gradients(
        {n: p.grad for n, p in tasks.learner.named_parameters()},
        {
            **{f"backbone.{n}": p.grad for n, p in net.named_parameters()},
            **{f"rule.{n}": p.grad for n, p in meta.named_parameters()},
        },
    )

    # Test time: the query normalised with the support set's statistics under adapted weights.
    learner, (sx, sy, qx, _) = tasks.learner, (t[0] for t in batch)
    with torch.no_grad():
        *_, adapted = learner.adapt(sx, sy, training=False)
        logits = learner.query_logits(adapted, sx, sy, qx, training=False)
        their_logits = reference.metalstm_test_episode(net, meta, sx, sy, qx, 3)
    torch.testing.assert_close(logits, their_logits, rtol=1e-10, atol=1e-12)
    # Not the logits of transductive batch norm: the support statistics were used.
    transductive = learner.backbone.forward_with(adapted, qx)
    assert not torch.allclose(logits, transductive)
