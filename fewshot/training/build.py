"""The composition root: from a checked config to the objects of a run."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger

from fewshot.checkpoints.format import meta_lr_schedule
from fewshot.checkpoints.writing import AtomicCheckpointIO, checkpoint_callbacks
from fewshot.config import (
    backbone_config,
    learner_from,
    resolved_config,
    scores_any_way,
    training_task,
)
from fewshot.data.datamodule import EpisodeDataModule
from fewshot.errors import ConfigError, instantiate
from fewshot.experiments.cluster import cluster_trainer_settings
from fewshot.methods import Learner, run_tasks, task_scorer
from fewshot.models.functional import FunctionalBackbone
from fewshot.training.console import EpisodeCountdown, progress_bars
from fewshot.training.dashboards import TensorBoardViews
from fewshot.training.divergence import StopOnNonFinite, divergence_hint
from fewshot.training.module import EpisodicModule
from fewshot.training.threads import AUTO, auto_processes, thread_count


def build_learner(cfg: DictConfig) -> Learner:
    """The backbone, and on it the learner `cfg.algo._target_` names; one that scores any way
    is given the way of the tasks it scores and of those it meta-trains on."""
    backbone = instantiate(backbone_config(cfg))
    if not isinstance(backbone, FunctionalBackbone):
        raise ConfigError(
            f"backbone._target_={cfg.backbone._target_} has no forward_with(weights, x, "
            "statistics) and statistics(weights, x): fewshot's learners run it on task weights"
        )
    if scores_any_way(cfg):
        return learner_from(cfg.algo, backbone, way=cfg.way, train_way=training_task(cfg)[0])
    return learner_from(cfg.algo, backbone)


def build_module(cfg: DictConfig) -> EpisodicModule:
    learner = build_learner(cfg)
    tasks = task_scorer(learner, cfg.algo.task_batching, cfg.algo.get("compile", False))
    return EpisodicModule(
        learner,
        tasks,
        cfg.algo.meta_lr,
        cfg.algo.get("grad_clip"),
        resolved_config(cfg),
        meta_lr_schedule(cfg.algo.get("meta_lr_schedule")),
        cfg.algo.meta_batch_size,
    )


def build_datamodule(
    cfg: DictConfig, test_episodes: int = 600, test_share: range | None = None
) -> EpisodeDataModule:
    train_way, train_query = training_task(cfg)
    return EpisodeDataModule(
        cfg.data,
        cfg.way,
        cfg.shot,
        cfg.query,
        cfg.algo.meta_batch_size,
        cfg.val_episodes,
        test_episodes,
        cfg.seed,
        test_share,
        train_way=train_way,
        train_query=train_query,
    )


def set_threads(threads: int | str | None) -> int:
    """Set torch's CPU threads for `threads` (fewshot.training.threads.thread_count: a number;
    auto, one per process; None, torch's own default); return the number torch uses."""
    count = thread_count(threads)
    if count is not None:
        torch.set_num_threads(count)
    return torch.get_num_threads()


def on_cpu(accelerator: str) -> bool:
    """Whether a Trainer given `accelerator` runs on the CPU."""
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def process_settings(cfg: DictConfig, options: dict) -> dict:
    """`trainer.devices: auto` (the default) resolved: on a GPU one process; on the CPU with
    `threads: auto`, one per usable core (auto_processes), which split each meta-batch and the
    validation episodes (DDP over gloo, forked: they share the loaded images). Explicit
    devices, a strategy of the user's, or an explicit thread count are left as given."""
    if options.get("devices") != AUTO or options.get("strategy", AUTO) != AUTO:
        return options
    cpu = on_cpu(str(options.get("accelerator", AUTO)))
    tasks = min(cfg.algo.meta_batch_size, cfg.val_episodes)
    processes = auto_processes(cfg.threads, cpu, tasks)
    if processes == 1:
        return {**options, "devices": 1}
    return {**options, "accelerator": "cpu", "devices": processes, "strategy": "ddp_fork"}


def build_trainer(cfg: DictConfig, run_dir: Path, resume_step: int | None = None) -> pl.Trainer:
    """A Trainer that counts meta-iterations, keeps best and last checkpoints, logs to TensorBoard.

    `resume_step`: the step of the checkpoint a run resumes from. TensorBoard then drops the
    events the interrupted run logged after it, which the resumed run logs again.
    """
    options = process_settings(cfg, OmegaConf.to_container(cfg.trainer, resolve=True))
    options, cluster_plugins = cluster_trainer_settings(options)
    logger = TensorBoardLogger(
        run_dir, name="tensorboard", version="", default_hp_metric=False, purge_step=resume_step
    )
    trainer = pl.Trainer(
        **options,
        logger=logger,
        callbacks=[
            *checkpoint_callbacks(run_dir),
            StopOnNonFinite(divergence_hint(cfg.algo)),
            TensorBoardViews(),
            FirstEpisodeCheck(),
            EpisodeCountdown(),
            EndWithTheRun(),
            *progress_bars(options.get("enable_progress_bar", True)),
        ],
        plugins=[AtomicCheckpointIO(), *cluster_plugins],
        default_root_dir=run_dir,
        # Validation adapts with gradients; under inference mode enable_grad could not undo it.
        inference_mode=False,
        # Training is one endless stream of meta-batches: validate by step count, not by epoch.
        check_val_every_n_epoch=None,
        # Lightning's sanity check scores two meta-batches of validation episodes, minutes on a
        # CPU; FirstEpisodeCheck scores one episode instead.
        num_sanity_val_steps=0,
        # Processes take contiguous shares of the tasks and episodes (EpisodeDataModule):
        # Lightning's sampler would deal them out and pad uneven shares with repeats.
        use_distributed_sampler=False,
    )
    check_world_size(cfg, trainer.world_size)
    return trainer


class EndWithTheRun(pl.Callback):
    """In the processes a run starts itself to share its tasks (threads=auto on CPUs): end with
    the process that started them. Killed (SIGKILL, the OOM killer), it could not stop them,
    and they would train on, writing checkpoints into a run that is to be resumed."""

    def __init__(self) -> None:
        self.parent = os.getpid()  # made before the processes start: the run's own

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if os.getpid() == self.parent or not sys.platform.startswith("linux"):
            return
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != self.parent:  # it died before the line above
            os._exit(1)


PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal a process gets when its parent dies


class FirstEpisodeCheck(pl.Callback):
    """Before the first meta-iteration, adapt on and score the first validation episode as
    validation does, so that a learner that fails at evaluation fails now, not at the first
    validation. Skipped on resuming (the run validated before). Validation episodes are fixed
    and adaptation draws from no global generator, so training's random stream is untouched."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: EpisodicModule) -> None:
        if trainer.ckpt_path is not None or not trainer.enable_validation:
            return
        loader = trainer.datamodule.val_dataloader()
        batch = loader.collate_fn([loader.dataset[0]])
        batch = pl_module.on_after_batch_transfer(
            pl_module.transfer_batch_to_device(batch, pl_module.device, 0), 0
        )
        pl_module.eval()
        with torch.no_grad():  # as in validation: the learner enables grad for its inner loop
            run_tasks(pl_module.tasks, batch, training=False, track_steps=True)
        pl_module.train()


def check_world_size(cfg: DictConfig, world_size: int) -> None:
    """Raise ConfigError where a DDP process would get no task of a meta-batch or no
    validation episode. Uneven shares are fine: each process weighs its tasks' loss by their
    number, and the episodes' sums are added, so the values are one process's."""
    for key, count in (
        ("algo.meta_batch_size", cfg.algo.meta_batch_size),
        ("val_episodes", cfg.val_episodes),
    ):
        if count < world_size:
            raise ConfigError(
                f"{key}={count} leaves some of the {world_size} DDP processes (trainer.devices "
                f"x trainer.num_nodes) without any: make it at least {world_size}"
            )
