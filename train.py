"""Meta-train a few-shot learner:  python train.py [experiment=<preset>] [key=value ...]"""

from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fewshot.build import build_datamodule, build_module, build_trainer, check_config
from fewshot.errors import reported_as_one_line
from fewshot.sweep import recorded_job


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train; return the best val/acc, the value a Hydra sweeper optimises (None: the job failed)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    with reported_as_one_line(), recorded_job(run_dir, cfg, multirun) as job:
        if job.finished:
            return job.value
        check_config(cfg)
        datamodule = build_datamodule(cfg)
        datamodule.setup()  # data errors surface now, before any training
        pl.seed_everything(cfg.seed, workers=True)
        module = build_module(cfg)
        trainer = build_trainer(cfg, run_dir)
        trainer.fit(module, datamodule, ckpt_path=cfg.ckpt_path)
        job.completed(trainer.checkpoint_callback.best_model_score, trainer.global_step)
    return job.value


if __name__ == "__main__":
    main()
