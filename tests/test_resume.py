"""A run killed with SIGKILL resumes from last.ckpt, in its own directory, exactly."""

import signal
import subprocess
import time
from pathlib import Path

import pytest

from fewshot.training.threads import usable_cores
from tests.helpers import (
    checkpoint_step,
    logged_past_checkpoint,
    run_script,
    scalars,
    start_script,
)

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


def kill_after_a_checkpoint(proc: subprocess.Popen, run_dir: Path) -> int:
    """SIGKILL `proc` once last.ckpt exists and the run has logged a step past it; return the
    step of the checkpoint it leaves."""
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300  # a guard against hanging, not a measurement
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            if logged_past_checkpoint(run_dir) is not None:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return checkpoint_step(last)


# Every MAML++ part on, with its annealing inside the run (the cosine schedule's length fixed:
# the killed run is started with more steps than it will take).
MAMLPP = [
    "algo=mamlpp",
    "algo.inner_steps=2",
    "algo.inner_steps_test=2",
    "algo.msl_iterations=5",
    "algo.first_order_iterations=3",
    f"algo.meta_lr_schedule.T_max={STEPS}",
]


# The default on several cores: processes sharing each meta-batch (3 tasks: unevenly), which
# end with the killed run rather than train on.
SHARED = ["threads=auto", "algo.meta_batch_size=3"]


@pytest.mark.parametrize(
    "algo",
    [
        [],
        MAMLPP,
        pytest.param(
            SHARED,
            marks=pytest.mark.skipif(usable_cores() < 2, reason="one core: one process"),
        ),
    ],
    ids=["maml", "mamlpp", "maml-processes"],
)
def test_a_killed_run_resumes_in_its_own_directory_as_if_never_stopped(
    algo, quick_overrides, tmp_path
):
    quick_overrides = [*quick_overrides, *algo]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_script(
        "train.py", *quick_overrides, f"trainer.max_steps={STEPS}", f"hydra.run.dir={reference}"
    )

    # The same run with no end in sight, killed without warning after its first checkpoint.
    proc = start_script(
        "train.py",
        *quick_overrides,
        "trainer.max_steps=1000",
        f"hydra.run.dir={killed}",
        log=tmp_path / "killed.log",
    )
    assert kill_after_a_checkpoint(proc, killed) < STEPS

    # No hydra.run.dir: the resumed run finds its directory from the checkpoint's path.
    run_script(
        "train.py",
        *quick_overrides,
        f"trainer.max_steps={STEPS}",
        f"ckpt_path={killed}/checkpoints/last.ckpt",
    )
    assert checkpoint_step(killed / "checkpoints" / "last.ckpt") == STEPS
    assert len(list((killed / "tensorboard").glob("events.out.tfevents.*"))) == 2
    # Optimiser state, sampler position and weights carried over: every logged value, before
    # and after the kill, equals the uninterrupted run's, and no step is logged twice.
    got, want = scalars(killed), scalars(reference)
    assert set(want) >= {"train/loss", "val/acc"}
    assert got == want
    # The original run's config is kept; the resume records its own beside it.
    assert "trainer.max_steps=1000" in (killed / ".hydra" / "overrides.yaml").read_text()
    assert list((killed / ".hydra").glob("resumed_*/overrides.yaml"))
