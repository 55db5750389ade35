"""A diverging run stops with one line naming the step and the last good checkpoint."""

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from fewshot.checkpoints.reading import load_checkpoint
from fewshot.checkpoints.writing import LatestCheckpoint
from fewshot.errors import TrainingDiverged
from fewshot.training.divergence import StopOnNonFinite, divergence_hint
from tests.helpers import run_script


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(quick_overrides, tmp_path):
    # Adam's first step at this meta-lr sends the weights to ~1e30: the next meta-loss is NaN.
    proc = run_script(
        "train.py",
        *quick_overrides,
        "algo.meta_lr=1e30",
        "trainer.val_check_interval=1",
        f"hydra.run.dir={tmp_path}",
        expect_ok=False,
    )
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: training diverged at step 2: the meta-loss is nan; last good checkpoint: "
        f"{last} (step 1); lower algo.base_lr=0.4 or algo.meta_lr=1e+30, "
        "or set algo.first_order=true"
    ]
    checkpoint = load_checkpoint(last)[1]
    assert checkpoint["global_step"] == 1
    tensors = [*checkpoint["state_dict"].values()]
    tensors += [t for s in checkpoint["optimizer_states"][0]["state"].values() for t in s.values()]
    assert all(torch.isfinite(t).all() for t in tensors)


def test_a_non_finite_gradient_is_recorded_on_the_device_and_stops_the_next_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    model.weight.grad = torch.tensor([[0.0, float("inf")], [0.0, 0.0]])
    model.bias.grad = torch.zeros(2)
    latest = LatestCheckpoint(tmp_path / "last.ckpt")
    trainer = SimpleNamespace(global_step=7, callbacks=[latest])
    guard = StopOnNonFinite(divergence_hint(OmegaConf.create({"meta_lr": 1e-3})))
    guard.on_before_optimizer_step(trainer, model, optimizer=None)  # records, does not sync
    model.weight.grad.zero_()
    trainer.global_step = 8
    guard.on_before_optimizer_step(trainer, model, optimizer=None)  # finite: the first stays
    with pytest.raises(TrainingDiverged) as caught:
        guard.on_save_checkpoint(trainer, model, {})
    assert str(caught.value) == (
        "training diverged at step 8: the meta-gradient of weight is not finite; "
        "no checkpoint was written before it; lower algo.meta_lr=0.001"
    )


def test_finite_steps_pass_every_check():
    model = torch.nn.Linear(2, 2)
    model.weight.grad, model.bias.grad = torch.ones(2, 2), torch.ones(2)
    trainer = SimpleNamespace(global_step=3, callbacks=[], log_every_n_steps=1)
    guard = StopOnNonFinite("lower algo.meta_lr")
    guard.on_before_backward(trainer, model, torch.tensor(0.5))
    guard.on_before_optimizer_step(trainer, model, optimizer=None)
    guard.on_train_batch_end(trainer, model, None, None, 0)
    guard.on_validation_start(trainer, model)
    guard.on_save_checkpoint(trainer, model, {})
    assert int(guard._bad_step) == -1  # recorded on the device: no step was marked bad


def test_a_last_checkpoint_holding_nan_is_never_called_the_last_good_one(tmp_path):
    model = torch.nn.Linear(2, 2)
    last = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"weight": torch.full((2, 2), float("nan"))}}, last)
    trainer = SimpleNamespace(
        global_step=3, callbacks=[LatestCheckpoint(last)], log_every_n_steps=1
    )
    guard = StopOnNonFinite("lower algo.meta_lr")
    guard.on_before_backward(trainer, model, torch.tensor(float("nan")))
    with pytest.raises(TrainingDiverged) as caught:
        guard.on_validation_start(trainer, model)
    assert "last good" not in str(caught.value)
    assert f"{last} holds non-finite weights too, so no checkpoint is good" in str(caught.value)


def test_a_non_finite_meta_loss_is_named_with_its_value_at_the_logging_step():
    model = torch.nn.Linear(2, 2)
    trainer = SimpleNamespace(global_step=4, callbacks=[], log_every_n_steps=5)
    guard = StopOnNonFinite("lower algo.meta_lr")
    guard.on_before_backward(trainer, model, torch.tensor(0.5))
    guard.on_before_backward(trainer, model, torch.tensor(float("inf")))
    guard.on_train_batch_end(trainer, model, None, None, 0)  # step 4: Lightning does not log
    trainer.global_step = 5
    with pytest.raises(TrainingDiverged, match="at step 5: the meta-loss is inf; no checkpoint"):
        guard.on_train_batch_end(trainer, model, None, None, 0)
