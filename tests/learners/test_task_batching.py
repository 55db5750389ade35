"""The ways of running a meta-batch's tasks (a loop, one torch.func.vmap, grouped kernel calls in
lockstep) agree."""

import copy

import pytest
import torch

from fewshot.build import build_module
from fewshot.config import backbone_config
from fewshot.errors import ConfigError
from fewshot.learners import TaskLoop, VmappedTasks, plain_backward
from fewshot.learners.tasks import GroupedTasks
from tests.conftest import compose_train, conv_episode, meta_batch, small


def twins(first_order: bool, batch_norm: str) -> tuple[TaskLoop, VmappedTasks]:
    """The same float64 MAML twice: running tasks in a loop, and vmapped."""
    bn = {"batch_norm_train": batch_norm, "batch_norm_test": batch_norm}
    learner, _ = small("maml", first_order=first_order, **bn)
    learner.double()
    return TaskLoop(learner), VmappedTasks(copy.deepcopy(learner))


def double_episodes(tasks: int):
    batch = conv_episode(tasks=tasks)
    return batch._replace(support_x=batch.support_x.double(), query_x=batch.query_x.double())


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("batch_norm", ["transductive", "support"])
def test_vmapped_tasks_give_the_loops_meta_loss_and_meta_gradient(first_order, batch_norm):
    batch = double_episodes(tasks=3)
    results = {}
    for tasks in twins(first_order, batch_norm):
        outcome = meta_batch(tasks, batch, training=True, track_steps=True, backward=plain_backward)
        grads = {n: p.grad for n, p in tasks.learner.named_parameters()}
        results[isinstance(tasks, VmappedTasks)] = outcome, grads
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
        expected = meta_batch(loop, batch, training=False, track_steps=True)
        got = meta_batch(vmapped, batch, training=False, track_steps=True)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(got.accuracy, expected.accuracy)
    torch.testing.assert_close(got.step_accuracy, expected.step_accuracy)
    assert len(got.step_accuracy) == 4 and got.step_accuracy[-1] != got.step_accuracy[0]


def test_vmapped_tasks_hand_the_whole_meta_loss_to_one_backward():
    calls = []
    _, vmapped = twins(False, "transductive")
    meta_batch(vmapped, double_episodes(3), True, backward=lambda loss, last: calls.append(last))
    assert calls == [True]  # under DDP: one all-reduce for the batch


def test_vmapped_tasks_build_a_backbone_that_auto_would_lay_out_channels_last_standard():
    cfg = compose_train("algo.task_batching=vmap", "data.image_size=84")
    assert cfg.backbone.channels_last == "auto"
    assert backbone_config(cfg).channels_last is False
    assert backbone_config(compose_train("data.image_size=84")).channels_last == "auto"


@pytest.mark.parametrize("algo", ["metasgd", "mamlpp"])
def test_vmapped_tasks_refuse_learners_with_meta_parameters_beside_the_backbones(algo):
    with pytest.raises(ConfigError, match="algo.task_batching=vmap cannot meta-learn rule.rates.0"):
        build_module(compose_train(f"algo={algo}", "algo.task_batching=vmap"))


def loop_and_grouped(name: str, **settings) -> tuple[TaskLoop, GroupedTasks]:
    """The same float64 learner twice: its tasks in a loop, and grouped in lockstep."""
    learner, _ = small(name, **settings)
    learner.double()
    return TaskLoop(learner), GroupedTasks(copy.deepcopy(learner))


GROUPED_CASES = {
    "maml": {},
    "maml-first-order": {"first_order": True},
    "maml-support-norm": {"batch_norm_train": "support", "batch_norm_test": "support"},
    "maml-checkpoint-inner": {"checkpoint_inner": True},
    "anil": {},
    "metasgd": {},
    "mamlpp": {},  # multi-step loss and per-step batch norm shared by the tasks
}


@pytest.mark.parametrize("case", GROUPED_CASES)
def test_grouped_tasks_give_the_loops_meta_loss_and_meta_gradient(case):
    batch = double_episodes(tasks=3)
    results = []
    for tasks in loop_and_grouped(case.split("-")[0], **GROUPED_CASES[case]):
        outcome = meta_batch(tasks, batch, True, track_steps=True, backward=plain_backward)
        results.append((outcome, {n: p.grad for n, p in tasks.learner.named_parameters()}))
    (loop, loop_grads), (grouped, grouped_grads) = results
    torch.testing.assert_close(grouped.loss, loop.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grouped.accuracy, loop.accuracy)
    torch.testing.assert_close(grouped.step_accuracy, loop.step_accuracy)
    assert len(loop.step_accuracy) == 3  # before + 2 inner steps: the traces were compared
    for name, grad in loop_grads.items():
        assert grad is not None and grad.abs().sum() > 0, name  # a gradient that was compared
        torch.testing.assert_close(grouped_grads[name], grad, rtol=1e-6, atol=1e-12, msg=name)


@pytest.mark.parametrize("batch_norm", ["transductive", "support"])
def test_grouped_evaluation_gives_the_loops_per_task_accuracy(batch_norm):
    batch = double_episodes(tasks=4)
    loop, grouped = loop_and_grouped(
        "maml", batch_norm_train=batch_norm, batch_norm_test=batch_norm
    )
    with torch.no_grad():  # as Lightning runs validation: adaptation must still differentiate
        expected = meta_batch(loop, batch, training=False, track_steps=True)
        got = meta_batch(grouped, batch, training=False, track_steps=True)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.accuracy, expected.accuracy)
    torch.testing.assert_close(got.step_accuracy, expected.step_accuracy)
    assert len(got.step_accuracy) == 4 and got.step_accuracy[-1] != got.step_accuracy[0]


def test_grouped_tasks_refuse_a_rule_that_reads_each_tasks_loss():
    with pytest.raises(ConfigError, match="algo.task_batching=grouped cannot run MetaLSTM"):
        GroupedTasks(small("metalstm")[0])
