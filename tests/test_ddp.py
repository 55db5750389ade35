"""Processes that share each meta-batch: the default on several cores (threads=auto, forked CPU
processes) and trainer=ddp (spawned, gloo); one run folder, the meta-gradient and the logged
values of one process over all the tasks, an uneven split included, under a single run and a
multirun."""

import json
import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy

from fewshot.training.build import build_datamodule, build_module
from fewshot.training.threads import usable_cores
from tests.helpers import meta_gradients, run_script, scalars

# Each test runs two processes, one a CPU: under xdist, one test after another on one worker.
pytestmark = pytest.mark.xdist_group("ddp")

DDP = [
    "trainer=ddp",
    "trainer.devices=2",
    "trainer.accelerator=cpu",
    "algo.meta_batch_size=3",  # 2 tasks in one process, 1 in the other
    "trainer.max_steps=1",
    "trainer.val_check_interval=1",
]
# Folders named to the microsecond: a process that composed its own config would create a
# folder of its own beside the first.
RUN_DIR = "${now:%H-%M-%S-%f}"


@pytest.fixture(scope="module")
def ddp_outputs(quick_overrides, tmp_path_factory) -> Path:
    outputs = tmp_path_factory.mktemp("outputs")
    run_script("train.py", *quick_overrides, *DDP, f"hydra.run.dir={outputs}/{RUN_DIR}")
    return outputs


def test_ddp_training_creates_one_run_folder_with_checkpoints_and_tensorboard(ddp_outputs):
    (run_dir,) = ddp_outputs.iterdir()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    result = json.loads((run_dir / "result.json").read_text())
    # The spawned processes trained; the score and step still reach the sweeper's record.
    assert result["status"] == "completed" and result["step"] == 1
    assert 0 <= result["val/acc"] <= 1


def test_ddp_meta_gradient_is_the_mean_over_all_tasks_of_all_ranks(ddp_outputs):
    (run_dir,) = ddp_outputs.iterdir()
    ddp_grads, single, rank0 = meta_gradients(run_dir / "checkpoints" / "last.ckpt", 2)
    assert len(single) == len(ddp_grads)  # single: one process, all 2k tasks
    for mine, theirs in zip(single, ddp_grads):
        torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-7)
    # The ranks trained on different tasks: rank 0's share alone gives another gradient.
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(rank0, ddp_grads))


def test_ddp_multirun_creates_one_folder_per_job(quick_overrides, tmp_path):
    # With Lightning's `ddp`, the second process would re-run the sweep in a sweep folder of its own.
    run_script("train.py", "-m", *quick_overrides, *DDP, f"hydra.sweep.dir={tmp_path}/{RUN_DIR}")
    (sweep_dir,) = tmp_path.iterdir()
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0"]
    assert json.loads((sweep_dir / "0" / "result.json").read_text())["status"] == "completed"


def test_a_meta_batch_smaller_than_the_processes_is_refused(quick_overrides, tmp_path):
    proc = run_script(
        "train.py",
        *quick_overrides,
        *DDP,
        "algo.meta_batch_size=1",
        f"hydra.run.dir={tmp_path}",
        expect_ok=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: algo.meta_batch_size=1")


# MAML++ trains first-order for 2 steps, its step sizes without a gradient (DDP's own
# all-reduce would refuse that), then second-order.
MAMLPP = [
    "algo=mamlpp",
    "algo.inner_steps=2",
    "algo.first_order_iterations=2",
    "algo.msl_iterations=2",
]


@pytest.mark.skipif(usable_cores() < 2, reason="one usable core: the default is one process")
@pytest.mark.parametrize("algo", [[], MAMLPP], ids=["maml", "mamlpp"])
def test_the_default_on_several_cores_logs_what_one_process_logs(algo, quick_overrides, tmp_path):
    default = [o for o in quick_overrides if not o.startswith("threads=")]
    uneven = [*algo, "algo.meta_batch_size=3", "val_episodes=5"]  # over 2 processes
    run_script("train.py", *default, *uneven, f"hydra.run.dir={tmp_path / 'spread'}")
    run_script("train.py", *default, *uneven, "threads=1", f"hydra.run.dir={tmp_path / 'one'}")
    assert "2 processes of 1 CPU thread each" in (tmp_path / "spread" / "train.log").read_text()
    spread, one = scalars(tmp_path / "spread"), scalars(tmp_path / "one")
    assert spread.keys() == one.keys()
    for tag, values in one.items():
        assert [s for s, _ in spread[tag]] == [s for s, _ in values], tag
        # The values that depend on one meta-update at most, to float32 rounding (the uneven
        # shares' meta-gradient itself: test_ddp_meta_gradient_is_the_mean_over_all_tasks...).
        # Adam then makes rounding-level gradient coordinates full steps, as another task
        # batching of one process does (MAML++, loop against grouped: train/loss 2e-4 apart
        # at step 2, 3e-3 at step 3): later values agree only roughly, a few queries flipped.
        for (step, got), (_, want) in zip(spread[tag], values):
            one_update = tag.startswith("train/") and step <= 1  # validation comes after two
            rough = dict(abs=0.05) if "/acc" in tag else dict(rel=5e-2)
            close = dict(rel=1e-4) if one_update else rough
            assert got == pytest.approx(want, **close), f"{tag} at step {step}"


class CountAllReduces(pl.Callback):
    """Notes each all-reduce a process of the run makes, in a file of `folder` per process."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reduce, record = trainer.strategy.reduce, Path(self.folder) / str(os.getpid())

        def counted(tensor, *args, **kwargs):
            with open(record, "a") as out:
                out.write("all-reduce\n")
            return reduce(tensor, *args, **kwargs)

        trainer.strategy.reduce = counted


def test_ddp_all_reduces_the_meta_gradient_once_per_meta_iteration(quick_overrides, tmp_path):
    from hydra import compose, initialize_config_dir

    from tests.helpers import REPO

    steps, tasks_per_rank = 2, 3
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        overrides = [o for o in quick_overrides if not o.startswith("algo.meta_batch_size")]
        cfg = compose(
            "train",
            [
                *overrides,
                f"algo.meta_batch_size={2 * tasks_per_rank}",
                f"trainer.max_steps={steps}",
            ],
        )
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(start_method="spawn"),
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        inference_mode=False,
        callbacks=[CountAllReduces(tmp_path)],
    )
    trainer.fit(build_module(cfg), datamodule)
    # The meta-gradient and the logged sums together: one all-reduce per step, not one per task.
    counts = [len(f.read_text().splitlines()) for f in tmp_path.iterdir()]
    assert counts == [steps, steps]
