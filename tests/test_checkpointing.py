"""Checkpoints are written whole and hold everything a resume needs."""

from pathlib import Path

import pytest
import torch
from lightning_fabric.plugins.io import torch_io

from fewshot.build import build_module, build_trainer
from fewshot.checkpointing import AtomicCheckpointIO
from fewshot.data.episodes import MetaBatchStream
from fewshot.data.omniglot import omniglot_splits
from fewshot.learners import run_tasks
from tests.conftest import compose_train

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_the_trainer_writes_checkpoints_through_the_atomic_writer(tmp_path):
    trainer = build_trainer(compose_train("trainer.enable_progress_bar=false"), tmp_path)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_a_checkpoint_write_that_crashes_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    def crash_half_way(checkpoint, filepath):
        filepath.write_bytes(path.read_bytes()[:100])
        raise OSError("disk full")

    monkeypatch.setattr(torch_io, "_atomic_save", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("algo", ["maml", "metalstm"])
def test_a_training_step_draws_no_global_random_numbers(algo, omniglot):
    """Why a checkpoint needs no RNG state to resume exactly: a step's meta-loss and
    meta-gradient depend only on the weights and the batch, which is a function of (seed, step)."""
    cfg = compose_train(f"algo={algo}", "algo.meta_batch_size=2")
    module = build_module(cfg)
    classes = omniglot_splits(omniglot, cfg.data.split)["train"]
    stream = MetaBatchStream(classes, cfg.way, cfg.shot, cfg.query, 2, cfg.seed, start=3)
    batch = module.on_after_batch_transfer(stream.batch(3), 0)
    outcomes = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        module.zero_grad()
        loss = run_tasks(module.tasks, batch, training=True).loss
        loss.backward()
        outcomes.append([loss.detach(), *(p.grad.clone() for p in module.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*outcomes))
