"""Checkpointed inner steps give MAML the same meta-gradient while keeping less of the graph."""

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.config import check_config
from fewshot.errors import ConfigError
from fewshot.methods import Learner, plain_backward
from fewshot.methods.recomputation import recomputed
from tests.helpers import compose_train, conv_episode, meta_batch, small, small_backbone


def float64_maml(inner_steps: int, batch_norm: str, checkpoint_inner: bool) -> Learner:
    settings = {"inner_steps": inner_steps, "inner_steps_test": inner_steps}
    bn = {"batch_norm_train": batch_norm, "batch_norm_test": batch_norm}
    learner, _ = small("maml", **settings, **bn, checkpoint_inner=checkpoint_inner)
    return learner.double()


def float64_episode():
    batch = conv_episode()
    return type(batch)(*(t.double() if t.is_floating_point() else t for t in batch))


@pytest.mark.parametrize("batch_norm", ["transductive", "support"])
@pytest.mark.parametrize("inner_steps", [1, 3])
def test_checkpointed_inner_loop_gives_the_same_meta_gradient(inner_steps, batch_norm):
    grads = []
    for checkpoint_inner in (False, True):
        maml = float64_maml(inner_steps, batch_norm, checkpoint_inner)
        meta_batch(maml, float64_episode(), training=True, backward=plain_backward)
        grads.append({n: p.grad for n, p in maml.named_parameters()})
    plain, checkpointed = grads
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-10, atol=1e-14, msg=name)


def test_checkpointed_steps_recompute_under_the_forward_pass_autocast():
    # The usual mixed-precision recipe: forward under autocast, backward outside it. Recomputed
    # in float32 there, the steps would be differentiated at other values than the forward took.
    grads = []
    for checkpoint_inner in (False, True):
        maml = float64_maml(3, "transductive", checkpoint_inner).float()
        with torch.autocast("cpu", torch.bfloat16):
            loss = meta_batch(maml, conv_episode(), training=True).loss
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in maml.parameters()]))
    plain, checkpointed = grads
    # bfloat16 keeps 8 bits: the two graphs round apart by ~0.2% (6% when recomputed in float32)
    assert (checkpointed - plain).norm() < 0.01 * plain.norm()


def saved_bytes(loss: Tensor) -> int:
    """Bytes of the distinct tensor storages the graph behind `loss` keeps for its backward."""
    storages, seen, stack = {}, set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        saved = list(getattr(node, "saved_tensors", ()))  # custom autograd Functions
        saved += [getattr(node, a) for a in dir(node) if a.startswith("_saved_")]  # built-in ops
        for value in saved:
            for t in value if isinstance(value, tuple | list) else (value,):
                if isinstance(t, Tensor):
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack += [next_node for next_node, _ in node.next_functions]
    return sum(storages.values())


def test_checkpointed_inner_loop_keeps_less_of_the_graph_alive():
    batch = conv_episode()
    saved = []
    for checkpoint_inner in (False, True):
        maml = float64_maml(5, "transductive", checkpoint_inner).float()
        saved.append(saved_bytes(meta_batch(maml, batch, training=True).loss))
    plain, checkpointed = saved
    # What remains is the weights before each step and the query pass.
    assert checkpointed < plain / 3, (plain, checkpointed)


def support_loss(backbone, weights, x, y):
    return F.cross_entropy(backbone.forward_with(weights, x), y)


def step_by_autograd_grad(backbone, x, y):
    def step(weights):
        with torch.enable_grad():
            loss = support_loss(backbone, weights, x, y)
            grads = torch.autograd.grad(loss, list(weights.values()), create_graph=True)
        return {n: w - 0.5 * g for (n, w), g in zip(weights.items(), grads)}

    return step


def step_by_func_grad(backbone, x, y):
    def step(weights):
        grads = torch.func.grad(lambda w: support_loss(backbone, w, x, y))(weights)
        return {n: w - 0.5 * grads[n] for n, w in weights.items()}

    return step


@pytest.mark.parametrize("make_step", [step_by_autograd_grad, step_by_func_grad])
def test_recomputed_steps_differentiate_the_same_whichever_way_the_step_takes_its_gradient(
    make_step,
):
    torch.manual_seed(0)
    backbone = small_backbone().double()
    batch = float64_episode()
    step = make_step(backbone, batch.support_x[0], batch.support_y[0])
    params = dict(backbone.named_parameters())
    grads = []
    for wrap in (lambda s, w: s(w), recomputed):
        weights = params
        for _ in range(3):
            weights = wrap(step, weights)
        loss = support_loss(backbone, weights, batch.query_x[0], batch.query_y[0])
        grads.append(torch.autograd.grad(loss, list(params.values())))  # not only .backward()
    for name, plain, checkpointed in zip(params, *grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-10, atol=1e-14, msg=name)


def test_checkpoint_inner_with_first_order_is_refused_naming_both_keys():
    with pytest.raises(ConfigError, match=r"algo.checkpoint_inner=true has nothing to checkpoint"):
        check_config(compose_train("algo.checkpoint_inner=true", "algo.first_order=true"))
