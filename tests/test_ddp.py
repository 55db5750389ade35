"""trainer=ddp: two CPU processes (gloo) share each meta-batch; one run folder, the meta-gradient
of all the tasks, under a single run and a multirun."""

import json
import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from fewshot.training.build import build_datamodule, build_module
from tests.helpers import meta_gradients, run_script

# Each test runs two processes, one a CPU: under xdist, one test after another on one worker.
pytestmark = pytest.mark.xdist_group("ddp")

TASKS_PER_RANK = 2
DDP = [
    "trainer=ddp",
    "trainer.devices=2",
    "trainer.accelerator=cpu",
    f"algo.meta_batch_size={2 * TASKS_PER_RANK}",
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
    ddp_grads, single, rank0 = meta_gradients(run_dir / "checkpoints" / "last.ckpt", TASKS_PER_RANK)
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


def test_a_meta_batch_that_does_not_split_over_the_processes_is_refused(quick_overrides, tmp_path):
    proc = run_script(
        "train.py",
        *quick_overrides,
        *DDP,
        "algo.meta_batch_size=3",
        f"hydra.run.dir={tmp_path}",
        expect_ok=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: algo.meta_batch_size=3")


def counted_allreduce(folder: str, bucket):
    """A DDP communication hook: all-reduces the gradient bucket, noting it in `folder`."""
    with open(Path(folder) / str(os.getpid()), "a") as record:
        record.write("all-reduce\n")
    return allreduce_hook(None, bucket)


class CountAllReduces(pl.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.model.register_comm_hook(self.folder, counted_allreduce)


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
    # One bucket holds the whole Conv4 gradient: one all-reduce per step and rank, not one per task.
    counts = [len(f.read_text().splitlines()) for f in tmp_path.iterdir()]
    assert counts == [steps, steps]
