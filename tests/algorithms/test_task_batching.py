"""The two ways of running a meta-batch's tasks (a loop, or one torch.func.vmap) agree."""

import copy

import pytest
import torch

from fewshot.algorithms import MAML, plain_backward
from fewshot.models.conv4 import Conv4
from tests.conftest import conv_episode


def twins(first_order: bool, batch_norm: str) -> tuple[MAML, MAML]:
    """The same float64 MAML twice: running tasks in a loop, and vmapped."""
    torch.manual_seed(0)
    backbone = Conv4(1, 12, num_classes=3, channels=4, padding=1, stride=1, pool=True, blocks=2)
    loop = MAML(backbone.double(), 0.5, 2, 3, first_order, batch_norm, batch_norm)
    vmapped = copy.deepcopy(loop)
    vmapped.vmap_tasks = True
    return loop, vmapped


def double_episodes(tasks: int):
    batch = conv_episode(tasks=tasks)
    return batch._replace(support_x=batch.support_x.double(), query_x=batch.query_x.double())


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("batch_norm", ["transductive", "support"])
def test_vmapped_tasks_give_the_loops_meta_loss_and_meta_gradient(first_order, batch_norm):
    batch = double_episodes(tasks=3)
    results = {}
    for algorithm in twins(first_order, batch_norm):
        outcome = algorithm(batch, training=True, track_steps=True, backward=plain_backward)
        grads = {n: p.grad for n, p in algorithm.named_parameters()}
        results[algorithm.vmap_tasks] = outcome, grads
    (loop, loop_grads), (vmapped, vmapped_grads) = results[False], results[True]
    torch.testing.assert_close(vmapped.loss, loop.loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(vmapped.accuracy, loop.accuracy)
    torch.testing.assert_close(vmapped.step_accuracy, loop.step_accuracy)
    assert len(loop.step_accuracy) == 3  # before + 2 inner steps: the traces were compared
    for name, grad in loop_grads.items():
        torch.testing.assert_close(vmapped_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("batch_norm", ["transductive", "support"])
def test_vmapped_evaluation_gives_the_loops_per_task_accuracy(batch_norm):
    batch = double_episodes(tasks=4)
    loop, vmapped = twins(False, batch_norm)
    with torch.no_grad():  # as Lightning runs validation: adaptation must still differentiate
        expected = loop(batch, training=False, track_steps=True)
        got = vmapped(batch, training=False, track_steps=True)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(got.accuracy, expected.accuracy)
    torch.testing.assert_close(got.step_accuracy, expected.step_accuracy)
    assert len(got.step_accuracy) == 4 and got.step_accuracy[-1] != got.step_accuracy[0]


def test_vmapped_tasks_hand_the_whole_meta_loss_to_one_backward():
    calls = []
    _, vmapped = twins(False, "transductive")
    vmapped(double_episodes(tasks=3), training=True, backward=lambda loss, last: calls.append(last))
    assert calls == [True]  # under DDP: one all-reduce for the batch


def test_vmapped_tasks_run_on_a_backbone_laid_out_channels_last_by_auto():
    torch.manual_seed(0)
    backbone = Conv4(3, 64, 3, channels=4, padding=1, stride=1, pool=True, channels_last="auto")
    algorithm = MAML(backbone, 0.5, 1, 1, False, "transductive", "transductive", vmap_tasks=True)
    batch = conv_episode(tasks=2)
    images = batch.support_x.expand(-1, -1, 3, -1, -1)
    batch = batch._replace(
        support_x=torch.nn.functional.interpolate(images.flatten(0, 1), 64).unflatten(0, (2, -1)),
        query_x=torch.nn.functional.interpolate(
            batch.query_x.expand(-1, -1, 3, -1, -1).flatten(0, 1), 64
        ).unflatten(0, (2, -1)),
    )
    assert torch.isfinite(algorithm(batch, training=True, backward=plain_backward).loss)
