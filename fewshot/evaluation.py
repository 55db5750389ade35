"""The test protocol: fixed episodes of held-out classes, mean accuracy and its 95% interval."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from fewshot.algorithms import ALGORITHMS
from fewshot.build import build_datamodule, build_module, check_config, set_threads
from fewshot.errors import ConfigError


def mean_ci95(accuracies: Tensor) -> tuple[float, float]:
    """Mean of per-episode accuracies and 1.96 * std / sqrt(n), std with Bessel's correction."""
    n = accuracies.numel()
    if n < 2:
        raise ValueError(f"a confidence interval needs at least 2 episodes, got {n}")
    acc = accuracies.double()
    return acc.mean().item(), 1.96 * acc.std().item() / math.sqrt(n)


def protocol(cfg: DictConfig) -> dict[str, Any]:
    """What a test number depends on, recorded beside it."""
    return {
        "dataset": cfg.data.name,
        "split": cfg.data.get("split"),
        "way": cfg.way,
        "shot": cfg.shot,
        "query": cfg.query,
        "algorithm": cfg.algo.name,
        **{key: cfg.algo[key] for key in ALGORITHMS[cfg.algo.name].test_keys},
        "batch_norm": cfg.algo.batch_norm_test,
        "batch_norm_train": cfg.algo.batch_norm_train,
        "episode_seed": cfg.seed,
    }


def load_checkpoint(path: str | Path) -> tuple[DictConfig, dict[str, Any]]:
    """The run config stored in a fewshot checkpoint, and the checkpoint itself."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ckpt={path} is not a file")
    # Our own Lightning checkpoint: it holds optimiser and loop state besides tensors.
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if "fewshot_config" not in checkpoint:
        raise ConfigError(
            f"ckpt={path} was not written by fewshot's train.py (no run config in it)"
        )
    return OmegaConf.create(checkpoint["fewshot_config"]), checkpoint


def evaluate_checkpoint(
    ckpt: str | Path,
    episodes: int,
    seed: int,
    data_root: str | None = None,
    inner_steps_test: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Score a checkpoint on `episodes` fixed meta-test episodes drawn with `seed`."""
    cfg, checkpoint = load_checkpoint(ckpt)
    cfg.seed = seed
    if data_root is not None:
        cfg.data.root = data_root
    if inner_steps_test is not None:
        if "inner_steps_test" not in cfg.algo:
            raise ConfigError(
                f"algo.inner_steps_test is not a setting of algo.name={cfg.algo.name!r}; "
                "leave it null for this checkpoint"
            )
        cfg.algo.inner_steps_test = inner_steps_test
    check_config(cfg)
    if not isinstance(episodes, int) or episodes < 2:
        raise ConfigError(f"episodes={episodes!r} is out of range: expected an integer >= 2")
    set_threads(threads)
    module = build_module(cfg)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise ConfigError(f"ckpt={ckpt} does not fit its run config: {err}") from err
    datamodule = build_datamodule(cfg, test_episodes=episodes)
    datamodule.setup()
    trainer = pl.Trainer(
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        inference_mode=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.test(module, datamodule, verbose=False)
    mean, ci95 = mean_ci95(torch.cat(module.test_accuracies))
    return {
        "test/acc": mean,
        "test/acc_ci95": ci95,
        "episodes": episodes,
        "checkpoint": str(Path(ckpt).resolve()),
        "trained_steps": checkpoint.get("global_step"),
        "protocol": protocol(cfg),
    }
