"""What a run shows in TensorBoard besides its scalars: its hyperparameters beside its final
metrics (the HParams view, one row per run of a sweep), validation accuracy against the inner
step, and one training episode as a labelled image."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw, ImageFont
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

INNER_STEP_TAG = "val_inner_steps/acc_at_step_{step:07d}"  # x axis: inner step, 0 = before
# The inner-step curves go to an event file of their own (TensorBoard run `<run>/inner_steps`):
# their x axis is the inner step, which a resumed run's purge of steps >= its checkpoint's
# step would otherwise cut from the main file.
INNER_STEP_DIR = "inner_steps"
EPISODE_TAG = "episode/train"


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested run config -> {"algo.meta_lr": 0.001, ...}: the names a user types to override."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, bool | int | float | str) else str(value)
    return flat


def episode_grid(
    support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, min_size: int = 56
) -> Tensor:
    """One task as an image: a row per class, its support images, a gap, its query images,
    each tile marked with its label. support_x [way*shot, C, H, W], query_x [way*query, C, H, W]
    floats in [0, 1] (or uint8); labels 0..way-1. Returns uint8 [3, height, width]."""
    scale = max(1, math.ceil(min_size / support_x.shape[-1]))  # room for a readable label

    def tiles(x: Tensor, y: Tensor) -> tuple[Tensor, int]:
        x = x.detach().cpu().float()
        x = x / 255 if x.max() > 1 else x
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
        order = y.cpu().argsort(stable=True)  # class by class, one row each
        per_class = len(y) // (int(y.max()) + 1)
        return make_grid(x[order], nrow=per_class, padding=2, pad_value=0.5), per_class

    support, shot = tiles(support_x, support_y)
    query, _ = tiles(query_x, query_y)
    gap, header = 12, 16
    caption = f"support: left, {shot} per class | query: right | tile mark: label"
    font = ImageFont.load_default()
    width = max(support.shape[2] + gap + query.shape[2], math.ceil(font.getlength(caption)) + 4)
    canvas = Image.new("RGB", (width, header + support.shape[1]), (255, 255, 255))
    for grid, left in ((support, 0), (query, support.shape[2] + gap)):
        array = (grid.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        canvas.paste(Image.fromarray(array), (left, header))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), caption, fill=(0, 0, 0), font=font)
    tile = support_x.shape[-1] * scale + 2  # make_grid's pitch: image + padding
    for grid, left, labels in (
        (support, 0, support_y.cpu().sort().values),
        (query, support.shape[2] + gap, query_y.cpu().sort().values),
    ):
        per_row = (grid.shape[2] - 2) // tile
        for i, label in enumerate(labels.tolist()):
            x, y = left + 2 + (i % per_row) * tile, header + 2 + (i // per_row) * tile
            draw.rectangle((x, y, x + 12, y + 11), fill=(255, 220, 0))
            draw.text((x + 2, y), str(label), fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).contiguous()


class TensorBoardViews(pl.Callback):
    """Adds the HParams row, the inner-step curves and the episode image to a run's
    TensorBoard log; does nothing under any other logger."""

    def __init__(self) -> None:
        self.episode_logged = False
        self.inner_step_writer: SummaryWriter | None = None

    @staticmethod
    def _logger(trainer: pl.Trainer) -> TensorBoardLogger | None:
        logger = trainer.logger
        return logger if isinstance(logger, TensorBoardLogger) else None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        logger = self._logger(trainer)
        if logger is None or self.episode_logged:
            return
        self.episode_logged = True  # the first task this run is fed, once
        image = episode_grid(
            batch.support_x[0], batch.support_y[0], batch.query_x[0], batch.query_y[0]
        )
        logger.experiment.add_image(EPISODE_TAG, image, trainer.global_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = self._logger(trainer)
        # Under DDP the metrics are synced already; rank 0 alone writes them.
        if logger is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if self.inner_step_writer is None:
            self.inner_step_writer = SummaryWriter(Path(logger.log_dir) / INNER_STEP_DIR)
        metrics = trainer.callback_metrics
        step = 0
        while f"val/acc_step{step}" in metrics:
            value = metrics[f"val/acc_step{step}"].item()
            self.inner_step_writer.add_scalar(
                INNER_STEP_TAG.format(step=trainer.global_step), value, step
            )
            step += 1
        self.inner_step_writer.flush()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.inner_step_writer is not None:
            self.inner_step_writer.close()
        logger = self._logger(trainer)
        if logger is None:
            return
        metrics = trainer.callback_metrics
        best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
        # Final metrics shown beside the hyperparameters; their own tags, so that they do not
        # add a point to the training curves.
        final = {
            "hp/val_acc_best": best,
            "hp/val_acc": metrics.get("val/acc"),
            "hp/train_loss": metrics.get("train/loss"),
        }
        final = {k: float(v) for k, v in final.items() if v is not None}
        logger.log_hyperparams(flat_hparams(pl_module.config), final, step=trainer.global_step)
