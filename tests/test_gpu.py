"""The GPU path (#18): training, resume, evaluation and every switch of the step, run on each
device of DEVICES with the episodes gathered there (data.on_device), against the CPU run with
the episodes gathered on the host (the default path).

On the CPU both runs do the same arithmetic and must agree exactly: that pins the on-device
path in CI. On CUDA (`pytest -m gpu`) the kernels differ; the tolerances below say by how much
the two may differ after a few meta-steps, with cuDNN held to float32 (no TF32) so that the
comparison is of the arithmetic, not of a lower precision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from tests.helpers import (
    DEVICES,
    NO_CUDA,
    REPO,
    run_script,
    scalars,
    small_datamodule,
    small_module,
    small_trainer,
)

# (device, precision) -> absolute tolerances of (losses, accuracies, weights). A query set here
# is 6 images, so one prediction that flips moves a task's accuracy by 1/6. The weights' bound is
# Adam's: its first updates are about meta_lr * sign(gradient), and a gradient that is rounding
# noise (a convolution's bias before batch norm, whose true gradient is 0) can take the other
# sign on another device, a difference of up to 2 * meta_lr (1e-3) per step.
TOLERANCE = {
    ("cpu", "32-true"): (0.0, 0.0, 0.0),
    ("cpu", "bf16-mixed"): (0.0, 0.0, 0.0),
    ("cuda", "32-true"): (1e-3, 1 / 6 + 1e-6, 2e-3 * 4),
    ("cuda", "bf16-mixed"): (5e-2, 2 / 6 + 1e-6, 2e-3 * 4),
}
# The step's switches, each one case: (learner, task batching, compiled evaluation, settings).
CASES = {
    "maml": ("maml", "loop", False, {}),
    "metalstm": ("metalstm", "loop", False, {}),
    "maml-vmap": ("maml", "vmap", False, {}),
    "maml-grouped": ("maml", "grouped", False, {}),
    "maml-checkpoint_inner": ("maml", "loop", False, {"checkpoint_inner": True}),
    "maml-compiled_evaluation": ("maml", "loop", True, {}),
    "mamlpp": ("mamlpp", "loop", False, {"lslr": True, "per_step_norm": True}),
}


@dataclass
class Outcome:
    """What a small run gives: the meta-loss of every training step [steps], the validation
    losses and accuracies, every test episode's accuracy, the final weights (all on the CPU)."""

    train_loss: torch.Tensor
    val: torch.Tensor
    test_acc: torch.Tensor
    weights: dict[str, torch.Tensor]


def run_small(
    case: str,
    device: str,
    on_device: bool,
    precision: str = "32-true",
    steps: int = 4,
    resume_at: int | None = None,
    tmp_path: Path | None = None,
) -> Outcome:
    """Train `case` for `steps` meta-steps on `device` (validating every 2), then test. With
    `resume_at`, stop there, save a checkpoint and resume a fresh module from it."""
    name, batching, compiled, settings = CASES[case]
    recorded: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}

    def build():
        pl.seed_everything(0, verbose=False)
        module = small_module(name, batching, compiled, **settings)
        log = module._log

        def recording(stage, loss, acc, step_acc, tasks):  # the logged values, as computed
            recorded[stage].append(torch.stack([loss, acc]).float())
            log(stage, loss, acc, step_acc, tasks)

        module._log = recording
        return module

    datamodule = small_datamodule(on_device)
    module = build()
    if resume_at is None:
        trainer = small_trainer(device, max_steps=steps, precision=precision)
        trainer.fit(module, datamodule)
    else:
        ckpt = tmp_path / "resume.ckpt"
        trainer = small_trainer(device, max_steps=resume_at, precision=precision)
        trainer.fit(module, datamodule)
        trainer.save_checkpoint(ckpt)
        module = build()
        trainer = small_trainer(device, max_steps=steps, precision=precision)
        trainer.fit(module, datamodule, ckpt_path=ckpt)
    trainer.test(module, datamodule, verbose=False)
    return Outcome(
        torch.stack(recorded["train"])[:, 0].cpu(),
        torch.stack(recorded["val"]).cpu(),
        torch.cat(module.test_accuracies).cpu(),
        {n: p.detach().cpu() for n, p in module.learner.state_dict().items()},
    )


_REFERENCES: dict[tuple, Outcome] = {}


def reference(case: str, precision: str) -> Outcome:
    """The CPU run with the episodes gathered on the host, once per session."""
    key = (case, precision)
    if key not in _REFERENCES:
        _REFERENCES[key] = run_small(case, "cpu", on_device=False, precision=precision)
    return _REFERENCES[key]


def assert_close(got: Outcome, want: Outcome, device: str, precision: str) -> None:
    atol, acc_atol, weight_atol = TOLERANCE[(device, precision)]
    assert len(got.train_loss) == len(want.train_loss)
    torch.testing.assert_close(got.train_loss, want.train_loss, atol=atol, rtol=0)
    torch.testing.assert_close(got.val[:, 0], want.val[:, 0], atol=atol, rtol=0)
    torch.testing.assert_close(got.val[:, 1], want.val[:, 1], atol=acc_atol, rtol=0)
    torch.testing.assert_close(got.test_acc, want.test_acc, atol=acc_atol, rtol=0)
    for name, weight in want.weights.items():
        torch.testing.assert_close(got.weights[name], weight, atol=weight_atol, rtol=0, msg=name)


@pytest.fixture
def float32_convolutions(monkeypatch):
    """cuDNN without TF32 (its default on Ampere and later rounds convolutions to 10 bits)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_training_and_testing_on_the_device_match_the_host_run(case, device, float32_convolutions):
    got = run_small(case, device, on_device=True)
    assert_close(got, reference(case, "32-true"), device, "32-true")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["maml", "maml-checkpoint_inner"])
def test_bf16_mixed_on_the_device_matches_the_host_run(case, device):
    got = run_small(case, device, on_device=True, precision="bf16-mixed")
    assert_close(got, reference(case, "bf16-mixed"), device, "bf16-mixed")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["maml", "metalstm"])
def test_a_resumed_run_on_the_device_ends_as_the_uninterrupted_one(
    case, device, tmp_path, monkeypatch
):
    # Deterministic convolutions: the resumed run must repeat the uninterrupted one bit for bit.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    straight = run_small(case, device, on_device=True)
    resumed = run_small(case, device, on_device=True, resume_at=2, tmp_path=tmp_path)
    assert_close(resumed, straight, "cpu", "32-true")  # exact, on any device


def test_the_comparison_fails_when_the_runs_differ():
    want = reference("maml", "32-true")
    shifted = Outcome(want.train_loss + 1e-6, want.val, want.test_acc, want.weights)
    with pytest.raises(AssertionError):
        assert_close(shifted, want, "cpu", "32-true")


# End to end, as a user runs them: train.py on CUDA against train.py on the CPU, and evaluate.py
# of the CUDA run's checkpoint on both.
SCRIPT_CASES = {"maml": [], "metalstm": ["algo=metalstm"]}


def evaluate_on(ckpt: Path, out: Path, cuda: bool) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # evaluate.py runs where Lightning finds a device
    proc = subprocess.run(
        [sys.executable, "evaluate.py", f"ckpt={ckpt}", "episodes=20", f"output={out}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["test/acc"]


@pytest.mark.parametrize("case", list(SCRIPT_CASES))
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)  # before reading Omniglot
def test_train_and_evaluate_scripts_on_cuda_match_the_cpu(case, quick_overrides, tmp_path):
    runs = {}
    for accelerator in ("gpu", "cpu"):
        runs[accelerator] = tmp_path / accelerator
        run_script(
            "train.py",
            *quick_overrides,
            *SCRIPT_CASES[case],
            f"trainer.accelerator={accelerator}",
            f"hydra.run.dir={runs[accelerator]}",
        )
    # TF32 convolutions (cuDNN's default) in a user's run: losses agree to about 1e-2.
    gpu, cpu = (
        torch.tensor([v for _, v in scalars(runs[a])["train/loss"]]) for a in ("gpu", "cpu")
    )
    torch.testing.assert_close(gpu, cpu, atol=2e-2, rtol=0)
    ckpt = runs["gpu"] / "checkpoints" / "last.ckpt"
    on_gpu = evaluate_on(ckpt, tmp_path / "gpu.json", cuda=True)
    on_cpu = evaluate_on(ckpt, tmp_path / "cpu.json", cuda=False)
    # 20 episodes of 75 queries: a handful of flipped predictions at most.
    assert abs(on_gpu - on_cpu) <= 0.01
