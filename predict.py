"""Classify your own images with a trained checkpoint, adapting on a support set you give:
python predict.py ckpt=<run>/checkpoints/best.ckpt support=<folder of class folders> query=<folder>"""

import fewshot.training.threads  # noqa: F401  (first: OpenMP reads its wait policy when torch loads it)

# isort: split
import hydra
from omegaconf import DictConfig, OmegaConf

from fewshot.cli import reported_as_one_line, run_entry_point
from fewshot.config import CONF, check_declared_keys
from fewshot.evaluation.predict import Predictor, class_folders, images_in
from fewshot.training.build import set_threads


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> list[str]:
    """Print each query file and its predicted class; return the predictions."""
    with reported_as_one_line():
        check_declared_keys(cfg, OmegaConf.load(CONF / "predict.yaml"), "predict.py")
        set_threads(cfg.threads)
        support, query = class_folders(cfg.support), images_in(cfg.query, "query")
        predicted = Predictor.from_checkpoint(cfg.ckpt).predict(support, query)
    for path, name in zip(query, predicted):
        print(f"{path}\t{name}")
    return predicted


if __name__ == "__main__":
    run_entry_point(main)
