"""Meta-train a few-shot learner:  python train.py [experiment=<preset>] [key=value ...]"""

from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fewshot.build import build_datamodule, build_module, build_trainer, check_config
from fewshot.errors import reported_as_one_line


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train; return the best val/acc, the value a Hydra sweeper optimises."""
    with reported_as_one_line():
        check_config(cfg)
        datamodule = build_datamodule(cfg)
        datamodule.setup()  # data errors surface now, before any training
        pl.seed_everything(cfg.seed, workers=True)
        module = build_module(cfg)
        trainer = build_trainer(cfg, Path(HydraConfig.get().runtime.output_dir))
        trainer.fit(module, datamodule, ckpt_path=cfg.ckpt_path)
        best = trainer.checkpoint_callback.best_model_score
        return None if best is None else best.item()


if __name__ == "__main__":
    main()
