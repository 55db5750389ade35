"""The LightningModule's meta-optimisation step."""

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from fewshot.methods import TaskLoop
from fewshot.training.module import EpisodicModule
from tests.helpers import conv_episode, small


class GradientNorms(pl.Callback):
    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())


def episodes_as_loaded() -> DataLoader:
    batch = conv_episode()  # images travel as uint8-valued tensors
    return DataLoader(
        [batch._replace(support_x=batch.support_x * 255, query_x=batch.query_x * 255)] * 2,
        batch_size=None,
    )


def quick_trainer(**options) -> pl.Trainer:
    return pl.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, accelerator="cpu", inference_mode=False,
        **options,
    )  # fmt: skip


def meta_gradient_norms(grad_clip: float | None) -> list[float]:
    learner, _ = small("maml")
    norms = GradientNorms()
    quick_trainer(callbacks=[norms]).fit(
        EpisodicModule(learner, TaskLoop(learner), 1e-3, grad_clip, {}),
        train_dataloaders=episodes_as_loaded(),
    )
    return norms.norms


def test_meta_gradient_norm_is_clipped_to_grad_clip():
    unclipped = meta_gradient_norms(None)
    assert min(unclipped) > 0.01
    assert max(meta_gradient_norms(0.01)) <= 0.01 * (1 + 1e-4)


def test_bf16_mixed_precision_runs_the_backbone_in_bfloat16_when_training_and_testing():
    learner, _ = small("maml")
    dtypes: list[torch.dtype] = []
    forward_with = learner.backbone.forward_with

    def recording(*args):
        logits = forward_with(*args)
        dtypes.append(logits.dtype)
        return logits

    learner.backbone.forward_with = recording
    trainer = quick_trainer(precision="bf16-mixed")
    module = EpisodicModule(learner, TaskLoop(learner), 1e-3, None, {})
    trainer.fit(module, train_dataloaders=episodes_as_loaded())
    trained = len(dtypes)
    trainer.test(module, dataloaders=episodes_as_loaded(), verbose=False)
    assert 0 < trained < len(dtypes)
    assert set(dtypes) == {torch.bfloat16}
