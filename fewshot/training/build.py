"""The composition root: from a checked config to the objects of a run."""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger

from fewshot.checkpoints.format import meta_lr_schedule
from fewshot.checkpoints.writing import AtomicCheckpointIO, checkpoint_callbacks
from fewshot.config import backbone_config, learner_from, resolved_config
from fewshot.data.datamodule import EpisodeDataModule
from fewshot.errors import ConfigError, instantiate
from fewshot.experiments.cluster import cluster_trainer_settings
from fewshot.methods import Learner, run_tasks, task_scorer
from fewshot.models.functional import FunctionalBackbone
from fewshot.training.console import progress_bars
from fewshot.training.dashboards import TensorBoardViews
from fewshot.training.divergence import StopOnNonFinite, divergence_hint
from fewshot.training.module import EpisodicModule
from fewshot.training.threads import AUTO, auto_threads


def build_learner(cfg: DictConfig) -> Learner:
    """The backbone, and on it the learner `cfg.algo._target_` names."""
    backbone = instantiate(backbone_config(cfg))
    if not isinstance(backbone, FunctionalBackbone):
        raise ConfigError(
            f"backbone._target_={cfg.backbone._target_} has no forward_with(weights, x, "
            "statistics) and statistics(weights, x): fewshot's learners run it on task weights"
        )
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
    )


def build_datamodule(cfg: DictConfig, test_episodes: int = 600) -> EpisodeDataModule:
    return EpisodeDataModule(
        cfg.data,
        cfg.way,
        cfg.shot,
        cfg.query,
        cfg.algo.meta_batch_size,
        cfg.val_episodes,
        test_episodes,
        cfg.seed,
    )


def set_threads(threads: int | str | None) -> int:
    """Set torch's CPU threads: a number, `auto` (fewshot.training.threads.auto_threads, or the count
    OMP_NUM_THREADS asks for where it is set) or None (torch's own default); return the number
    torch uses."""
    if threads == AUTO:
        threads = None if os.environ.get("OMP_NUM_THREADS") else auto_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def build_trainer(cfg: DictConfig, run_dir: Path, resume_step: int | None = None) -> pl.Trainer:
    """A Trainer that counts meta-iterations, keeps best and last checkpoints, logs to TensorBoard.

    `resume_step`: the step of the checkpoint a run resumes from. TensorBoard then drops the
    events the interrupted run logged after it, which the resumed run logs again.
    """
    options, cluster_plugins = cluster_trainer_settings(
        OmegaConf.to_container(cfg.trainer, resolve=True)
    )
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
    )
    check_world_size(cfg, trainer.world_size)
    return trainer


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
    """Raise ConfigError unless the meta-batch and the validation episodes split evenly over
    the DDP processes (uneven shares would weight tasks unequally or repeat episodes)."""
    for key, count in (
        ("algo.meta_batch_size", cfg.algo.meta_batch_size),
        ("val_episodes", cfg.val_episodes),
    ):
        if count % world_size:
            raise ConfigError(
                f"{key}={count} does not split over {world_size} DDP processes "
                f"(trainer.devices x trainer.num_nodes): make it a multiple of {world_size}"
            )
