"""Test a checkpoint on fixed meta-test episodes:  python evaluate.py ckpt=<file> [episodes=600]"""

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fewshot.data.files import atomic_path
from fewshot.errors import reported_as_one_line, run_entry_point
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
            {"way": cfg.way, "shot": cfg.shot, "query": cfg.query},
        )
    ckpt = Path(cfg.ckpt)
    p = result["protocol"]
    # A result for another task than the run's own gets its own name, not the run's result's.
    task_set = any(cfg[key] is not None for key in ("way", "shot", "query"))
    task = f"_{p['way']}w{p['shot']}s{p['query']}q" if task_set else ""
    name = f"{ckpt.stem}{task}_{cfg.episodes}ep_seed{cfg.seed}.json"
    output = Path(cfg.output) if cfg.output else ckpt.resolve().parent.parent / "eval" / name
    with atomic_path(output) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"test accuracy {100 * result['test/acc']:.2f} ± {100 * result['test/acc_ci95']:.2f}% "
        f"(95% CI, {result['episodes']} episodes, {p['way']}-way {p['shot']}-shot, "
        f"{p['inner_steps_test']} inner steps, {p['batch_norm']} batch norm) -> {output}"
    )
    return result["test/acc"]


if __name__ == "__main__":
    run_entry_point(main)
