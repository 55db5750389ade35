"""Test a checkpoint on fixed meta-test episodes:  python evaluate.py ckpt=<file> [episodes=600]"""

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fewshot.algorithms import ALGORITHMS
from fewshot.data.files import atomic_path
from fewshot.errors import reported_as_one_line
from fewshot.evaluation import evaluate_checkpoint

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    """Print and write to JSON the test accuracy, its 95% CI and the protocol; return the accuracy."""
    with reported_as_one_line():
        result = evaluate_checkpoint(
            cfg.ckpt,
            cfg.episodes,
            cfg.seed,
            cfg.data.root,
            cfg.algo.inner_steps_test,
            cfg.trainer.threads,
        )
    ckpt = Path(cfg.ckpt)
    name = f"{ckpt.stem}_{cfg.episodes}ep_seed{cfg.seed}.json"
    output = Path(cfg.output) if cfg.output else ckpt.resolve().parent.parent / "eval" / name
    with atomic_path(output) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    p = result["protocol"]
    inner_loop = " ".join(f"{k}={p[k]}" for k in ALGORITHMS[p["algorithm"]].test_keys)
    print(
        f"test accuracy {100 * result['test/acc']:.2f} ± {100 * result['test/acc_ci95']:.2f}% "
        f"(95% CI, {result['episodes']} episodes, {p['way']}-way {p['shot']}-shot, "
        f"{p['algorithm']} {inner_loop}, {p['batch_norm']} batch norm) -> {output}"
    )
    return result["test/acc"]


if __name__ == "__main__":
    main()
