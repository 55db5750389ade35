"""From a composed config to the objects of a run, after checking the config's values."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger

from fewshot.algorithms import ALGORITHMS
from fewshot.checkpointing import AtomicCheckpointIO, checkpoint_callbacks
from fewshot.dashboards import TensorBoardViews
from fewshot.data.datamodule import EpisodeDataModule
from fewshot.divergence import StopOnNonFinite, divergence_hint
from fewshot.errors import ConfigError
from fewshot.module import EpisodicModule


def int_at_least(low: int) -> tuple[Callable[[Any], bool], str]:
    return (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low
    ), f"an integer >= {low}"


_POSITIVE = (
    (lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v > 0),
    "a number > 0",
)

_BOOLEAN = ((lambda v: isinstance(v, bool)), "true or false")

# key -> (test, what is allowed); a key absent from the config (another algorithm's) is skipped.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "way": int_at_least(2),
    "shot": int_at_least(1),
    "query": int_at_least(1),
    "val_episodes": int_at_least(2),
    "algo.meta_lr": _POSITIVE,
    "algo.base_lr": _POSITIVE,
    "algo.meta_batch_size": int_at_least(1),
    "algo.inner_steps": int_at_least(1),
    "algo.inner_steps_test": int_at_least(1),
    "algo.grad_clip": ((lambda v: v is None or _POSITIVE[0](v)), "null or a number > 0"),
    "algo.hidden_size": int_at_least(1),
    "algo.inner_epochs": int_at_least(1),
    "algo.inner_batch_size": int_at_least(1),
    "algo.learn_init": _BOOLEAN,
    "algo.first_order": _BOOLEAN,
    "algo.vmap_tasks": _BOOLEAN,
    "trainer.compile": _BOOLEAN,
    # Lightning's names. 16-mixed is left out: its loss scaling is untested with the per-task
    # backward passes (and bf16 needs none).
    "trainer.precision": ((lambda v: v in ("32-true", "bf16-mixed")), "32-true or bf16-mixed"),
    "algo.checkpoint_inner": _BOOLEAN,
    "trainer.max_steps": int_at_least(1),
    "trainer.val_check_interval": int_at_least(1),
    "backbone.channels": int_at_least(1),
    "backbone.padding": int_at_least(0),
    "backbone.stride": int_at_least(1),
    "backbone.channels_last": (
        (lambda v: isinstance(v, bool) or v == "auto"),
        "true, false or auto",
    ),
    "data.image_size": int_at_least(1),
    "data.workers": int_at_least(0),
}


def check_value(key: str, value: Any, rule: tuple[Callable[[Any], bool], str]) -> None:
    """Raise ConfigError naming `key` unless `value` passes the rule's test."""
    ok, allowed = rule
    if not ok(value):
        raise ConfigError(f"{key}={value!r} is out of range: expected {allowed}")


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first key whose value is out of range."""
    for key, rule in RULES.items():
        value = OmegaConf.select(cfg, key, default="<absent>")
        if value != "<absent>":
            check_value(key, value, rule)
    if cfg.algo.name not in ALGORITHMS:
        raise ConfigError(
            f"algo.name={cfg.algo.name!r} is unknown; choose one of {list(ALGORITHMS)}"
        )
    if OmegaConf.select(cfg, "algo.checkpoint_inner") and cfg.algo.first_order:
        raise ConfigError(
            "algo.checkpoint_inner=true has nothing to checkpoint with algo.first_order=true "
            "(first order keeps no graph through the inner steps): set one of them to false"
        )
    if OmegaConf.select(cfg, "backbone.channels_last") is True and cfg.algo.get("vmap_tasks"):
        raise ConfigError(
            "backbone.channels_last=true cannot run with algo.vmap_tasks=true (vmap keeps tensors "
            "in the standard layout): set backbone.channels_last=auto or false"
        )
    if OmegaConf.select(cfg, "algo.checkpoint_inner") and cfg.algo.get("vmap_tasks"):
        raise ConfigError(
            "algo.checkpoint_inner=true cannot run with algo.vmap_tasks=true (torch.func.vmap "
            "does not batch its recomputation, a custom autograd Function): set one of them to false"
        )
    if OmegaConf.select(cfg, "trainer.precision") == "bf16-mixed" and cfg.algo.get("vmap_tasks"):
        raise ConfigError(
            "trainer.precision=bf16-mixed cannot run with algo.vmap_tasks=true (torch.func.grad "
            "under autocast fails with a dtype mismatch in torch 2.15): set "
            "trainer.precision=32-true or algo.vmap_tasks=false"
        )
    if cfg.trainer.val_check_interval > cfg.trainer.max_steps:
        raise ConfigError(
            f"trainer.val_check_interval={cfg.trainer.val_check_interval} exceeds "
            f"trainer.max_steps={cfg.trainer.max_steps}: the run would never validate"
        )


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's config as plain data, with data.root absolute, as stored in checkpoints."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config["data"]["root"] = os.path.abspath(os.path.expanduser(config["data"]["root"]))
    return config


def build_module(cfg: DictConfig) -> EpisodicModule:
    backbone = hydra.utils.instantiate(cfg.backbone)
    algorithm = ALGORITHMS[cfg.algo.name].from_config(cfg.algo, backbone)
    if cfg.trainer.get("compile"):
        algorithm.compile_evaluation()
    return EpisodicModule(
        algorithm, cfg.algo.meta_lr, cfg.algo.get("grad_clip"), resolved_config(cfg)
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


def set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def build_trainer(cfg: DictConfig, run_dir: Path, resume_step: int | None = None) -> pl.Trainer:
    """A Trainer that counts meta-iterations, keeps best and last checkpoints, logs to TensorBoard.

    `resume_step`: the step of the checkpoint a run resumes from. TensorBoard then drops the
    events the interrupted run logged after it, which the resumed run logs again.
    """
    options = OmegaConf.to_container(cfg.trainer, resolve=True)
    set_threads(options.pop("threads"))
    options.pop("compile", None)  # not a Trainer argument: build_module applies it
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
        ],
        plugins=[AtomicCheckpointIO()],
        default_root_dir=run_dir,
        # Validation adapts with gradients; under inference mode enable_grad could not undo it.
        inference_mode=False,
        # Training is one endless stream of meta-batches: validate by step count, not by epoch.
        check_val_every_n_epoch=None,
    )
    check_world_size(cfg, trainer.world_size)
    return trainer


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
