"""No training, validation or test step waits on the host (#18): a read of a tensor's value
on the host (`.item()`, `.cpu()`, `if tensor:` ...) stalls a GPU's queue of kernels every step.

On the CPU the reads are counted under patched Tensor methods, each charged to the first frame
outside torch that made it: fewshot's own must be none. Lightning's reads (its logging of
`self.log` values, every trainer.log_every_n_steps, and its progress bar) happen outside the
steps, at its own cadence. On CUDA, `torch.cuda.set_sync_debug_mode("error")` turns any sync
inside a step into an error, copies to and from the device included."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from tests.helpers import small_datamodule, small_module, small_trainer

FEWSHOT = Path(__file__).resolve().parents[1] / "fewshot"
TORCH = Path(torch.__file__).resolve().parent
# Adam keeps its step counts on the host (unless capturable or fused): its reads of them are no
# device sync, on a GPU either.
HOST_STATE = TORCH / "optim"
# The methods that read a tensor's value on the host: a device sync on a GPU.
HOST_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
# The per-step hooks of fewshot's LightningModule (its callbacks' per-step hooks run inside
# training_step: manual optimisation calls them from manual_backward and optimizer.step).
STEP_HOOKS = ("on_after_batch_transfer", "training_step", "validation_step", "test_step")

# Every MAML-family learner, with the settings that change its step's code path.
LEARNERS = [
    pytest.param("maml", "loop", {}, id="maml"),
    pytest.param("maml", "vmap", {}, id="maml-vmap"),
    pytest.param("maml", "grouped", {}, id="maml-grouped"),
    pytest.param("maml", "loop", {"checkpoint_inner": True}, id="maml-checkpoint_inner"),
    pytest.param("maml", "loop", {"first_order": True}, id="maml-first_order"),
    pytest.param("anil", "loop", {}, id="anil"),
    pytest.param("metasgd", "loop", {}, id="metasgd"),
    pytest.param("mamlpp", "loop", {"lslr": True, "per_step_norm": True}, id="mamlpp"),
    pytest.param("metalstm", "loop", {}, id="metalstm"),
]


def reader(frame) -> str:
    """file:line of the first frame outside torch from `frame` out: who asked for the value."""
    while frame is not None and Path(frame.f_code.co_filename).is_relative_to(TORCH):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"


class HostReads:
    """Counts host reads of tensor values while `active`, as (file:line, method) of the
    first frame outside torch."""

    def __init__(self) -> None:
        self.active = False
        self.reads: list[tuple[str, str]] = []

    def ours(self) -> list[tuple[str, str]]:
        return [r for r in self.reads if Path(r[0].rsplit(":", 1)[0]).is_relative_to(FEWSHOT)]

    @contextmanager
    def counting(self, hook: str = "") -> Iterator[None]:
        """Count the reads made inside this block (`hook`: the step hook it wraps, unused)."""
        self.active = True
        try:
            yield
        finally:
            self.active = False

    @contextmanager
    def patched(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[HostReads]:
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, _name=name, **kwargs):
                frame = sys._getframe(1)
                if self.active and not Path(frame.f_code.co_filename).is_relative_to(HOST_STATE):
                    self.reads.append((reader(frame), _name))
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)
        yield self
        monkeypatch.undo()


def watch_steps(module: pl.LightningModule, during) -> None:
    """Run every per-step hook of `module` inside the context manager `during(hook name)`."""
    for name in STEP_HOOKS:
        hook = getattr(module, name)

        def watched(*args, _hook=hook, _name=name, **kwargs):
            with during(_name):
                return _hook(*args, **kwargs)

        setattr(module, name, watched)


def fit_and_test(module, datamodule, trainer: pl.Trainer) -> None:
    trainer.fit(module, datamodule)
    trainer.test(module, datamodule, verbose=False)


@pytest.mark.parametrize(("name", "batching", "settings"), LEARNERS)
@pytest.mark.parametrize("on_device", [False, True], ids=["host-episodes", "device-episodes"])
def test_no_step_reads_a_tensor_value_on_the_host(
    name, batching, settings, on_device, monkeypatch, tmp_path
):
    pl.seed_everything(0, verbose=False)
    module = small_module(name, batching, **settings)
    reads = HostReads()

    watch_steps(module, reads.counting)
    # Lightning logging every step: its reads of the logged values come outside the steps.
    trainer = small_trainer("cpu", logger=CSVLogger(tmp_path), log_every_n_steps=1)
    with reads.patched(monkeypatch):
        fit_and_test(module, small_datamodule(on_device), trainer)
    assert reads.ours() == [], f"host reads inside the steps: {reads.ours()}"
    assert reads.reads == [], f"host reads by others inside the steps: {reads.reads}"


def test_the_counter_catches_a_host_read_in_a_step(monkeypatch):
    module = small_module("maml")
    reads = HostReads()

    with reads.patched(monkeypatch), reads.counting():
        loss = module.learner.backbone.head.weight.sum()
        if loss > 0:  # a host read, as a step must not make
            pass
        float(loss)
    assert [method for _, method in reads.ours()] == []  # this file is not fewshot's
    assert [method for _, method in reads.reads] == ["__bool__", "__float__"]


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "batching", "settings"), LEARNERS)
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"], ids=["fp32", "bf16"])
def test_no_step_syncs_with_the_cuda_device(name, batching, settings, precision, cuda_device):
    if precision == "bf16-mixed" and batching == "vmap":
        pytest.skip("bf16-mixed cannot run with algo.task_batching=vmap (fewshot.config EXCLUSIVE)")
    pl.seed_everything(0, verbose=False)
    module = small_module(name, batching, **settings)
    # One task a batch: two validation and two test batches, so every hook runs more than once.
    datamodule = small_datamodule(on_device=True, meta_batch_size=1)
    # The images' one move to the device, done before: every batch is then a gather there.
    datamodule.device_images = {
        split: classes.images.flatten(0, 1).to(cuda_device)
        for split, classes in datamodule.splits.items()
    }

    seen: set[str] = set()

    @contextmanager
    def during(hook: str):
        # Lightning moves the state of each key a step logs to the device when the key is first
        # logged: a one-off copy of its own, so each hook's first call is left out.
        if hook not in seen:
            seen.add(hook)
            yield
            return
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    watch_steps(module, during)
    fit_and_test(module, datamodule, small_trainer("cuda", max_steps=5, precision=precision))
    assert seen == set(STEP_HOOKS)
