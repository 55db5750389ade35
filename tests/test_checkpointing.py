"""Checkpoints are written whole, hold everything a resume needs, and are read as data only."""

import zipfile
from pathlib import Path

import pytest
import torch
from lightning_fabric.plugins.io import torch_io

from fewshot.checkpoints.reading import load_checkpoint
from fewshot.checkpoints.writing import AtomicCheckpointIO
from fewshot.data.episodes import MetaBatchStream
from fewshot.data.omniglot import omniglot_splits
from fewshot.errors import DataError
from fewshot.methods import run_tasks
from fewshot.training.build import build_module, build_trainer
from tests.helpers import OLD_CHECKPOINTS, checkpoint_that_runs_code, compose_train

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


def test_the_payload_of_the_tests_runs_when_unpickled_as_code(tmp_path):
    """The control for the tests below: loaded as torch.load(weights_only=False) used to, the
    payload checkpoint creates its file."""
    marker = tmp_path / "ran"
    torch.load(checkpoint_that_runs_code(tmp_path / "x.ckpt", marker), weights_only=False)
    assert marker.is_file()


def test_lightnings_resume_reads_a_checkpoint_as_data_only(tmp_path, monkeypatch):
    # What trainer.fit(ckpt_path=...) calls to read the file; the variable would make a plain
    # torch.load that leaves weights_only to its default unpickle code.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    strategy = build_trainer(compose_train("trainer.enable_progress_bar=false"), tmp_path).strategy
    marker = tmp_path / "ran"
    payload = checkpoint_that_runs_code(tmp_path / "last.ckpt", marker)
    with pytest.raises(DataError, match=f"ckpt_path={payload} is refused: .*posix.system"):
        strategy.load_checkpoint(payload)
    assert not marker.exists()
    old = strategy.load_checkpoint(OLD_CHECKPOINTS / "maml.ckpt")
    assert old["fewshot_config"]["algo"]["name"] == "maml" and "optimizer_states" in old


@pytest.mark.parametrize("path", sorted(OLD_CHECKPOINTS.glob("*.ckpt")), ids=lambda p: p.stem)
def test_checkpoints_written_before_reading_as_data_still_load(path):
    stored, checkpoint = load_checkpoint(path)
    assert stored.way == 5 and checkpoint["state_dict"]


@pytest.mark.parametrize("algo", ["maml", "metalstm"])
def test_a_training_step_draws_no_global_random_numbers(algo, omniglot):
    """Why a checkpoint needs no RNG state to resume exactly: a step's meta-loss and
    meta-gradient depend only on the weights and the batch, which is a function of (seed, step)."""
    cfg = compose_train(f"algo={algo}", "algo.meta_batch_size=2", "backbone.channels=8")
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


def test_a_checkpoint_with_a_corrupt_pickle_opcode_is_refused_in_one_line(tmp_path):
    damaged = tmp_path / "damaged.ckpt"
    with (
        zipfile.ZipFile(OLD_CHECKPOINTS / "maml.ckpt") as src,
        zipfile.ZipFile(damaged, "w") as dst,
    ):
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data = data[:40] + b"\xff" + data[41:]  # an opcode no unpickler has
            dst.writestr(info, data)
    with pytest.raises(DataError, match=f"ckpt={damaged} cannot be read as data: it is damaged"):
        load_checkpoint(damaged)
