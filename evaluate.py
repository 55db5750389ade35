"""Test a checkpoint on fixed meta-test episodes:  python evaluate.py ckpt=<file> [episodes=600]
Several at once, into one table:  python evaluate.py run=<sweep folder> [episodes=[100,250,600]]

Without output=, a result goes to `<run>/eval/<ckpt stem><test>_<n>ep_seed<seed>.json` for a
checkpoint in a run's checkpoints/ folder, else beside the checkpoint as
`<file name><test>_<n>ep_seed<seed>.json`. `<test>` names each override that changes the number
and differs from the run's own value (runs.task_suffix): `_<way>w<shot>s<query>q`,
`_steps-<k>` (algo.inner_steps_test), `_bn-<mode>` (algo.batch_norm_test), `_<precision>`
(trainer.precision); data.root and algo.compile say where and how the same test runs, and are
not named. The run's own test is `best_600ep_seed0.json`. Where a result or table cannot be
written is refused before anything is scored."""

import fewshot.training.threads  # noqa: F401  (first: OpenMP reads its wait policy when torch loads it)

# isort: split
import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fewshot.cli import reported_as_one_line, run_entry_point
from fewshot.config import CONF, check_declared_keys
from fewshot.errors import ConfigError
from fewshot.evaluation.protocol import check_output, result_line, score_checkpoint
from fewshot.reporting.comparison import (
    check_all_evaluated,
    evaluate_targets,
    targets_of,
    write_evaluation_table,
)
from fewshot.training.console import quiet_lightning

log = logging.getLogger(__name__)


def run_overrides(cfg: DictConfig) -> dict[str, Any]:
    """The run-config keys this evaluation may change (None: keep the run's own)."""
    return {
        "data.root": cfg.data.root,
        "algo.inner_steps_test": cfg.algo.inner_steps_test,
        "algo.batch_norm_test": cfg.algo.batch_norm_test,
        "way": cfg.way,
        "shot": cfg.shot,
        "query": cfg.query,
        "algo.compile": cfg.algo.compile,
        "trainer.precision": cfg.trainer.precision,
    }


def as_list(value) -> list:
    if value is None:
        return []
    return list(value) if OmegaConf.is_list(value) else [value]


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    """Print and write to JSON the test accuracy, its 95% CI and the protocol; return the accuracy.
    With several checkpoints, runs or episode counts, also write one table of them all."""
    with reported_as_one_line():
        check_declared_keys(cfg, OmegaConf.load(CONF / "evaluate.yaml"), "evaluate.py")
        ckpts, runs = as_list(cfg.ckpt), as_list(cfg.run)
        if not ckpts and not runs:
            raise ConfigError("give ckpt=<file> (or a list [a,b]) or run=<run or sweep folder>")
        if runs or len(ckpts) > 1 or OmegaConf.is_list(cfg.episodes):
            evaluate_many(cfg, ckpts, runs)
            return None
        result, output = score_checkpoint(
            cfg.ckpt, cfg.episodes, cfg.seed, run_overrides(cfg), cfg.threads, cfg.output
        )
    print(result_line(result, output))
    return result["test/acc"]


def evaluate_many(cfg: DictConfig, ckpts: list[str], runs: list[str]) -> None:
    """Evaluate every checkpoint once on the largest episode count; write and print the table.
    A checkpoint that cannot be scored is marked in it, and named in the error raised after."""
    counts = sorted(set(as_list(cfg.episodes)))
    targets = targets_of(ckpts, runs)
    if cfg.output:
        table = Path(cfg.output)
    elif len(runs) == 1 and not ckpts:
        table = Path(runs[0]) / f"evaluation_seed{cfg.seed}.md"
    else:
        table = Path(HydraConfig.get().runtime.output_dir) / f"evaluation_seed{cfg.seed}.md"
    for path in (table.with_suffix(".md"), table.with_suffix(".csv")):
        check_output(path, given=bool(cfg.output))
    rows = evaluate_targets(targets, counts, cfg.seed, run_overrides(cfg), cfg.threads)
    md_path = write_evaluation_table(table, rows, counts, cfg.seed)
    print(md_path.read_text() + f"-> {md_path} and {md_path.with_suffix('.csv')}")
    check_all_evaluated(targets, rows, md_path)


if __name__ == "__main__":
    quiet_lightning()
    run_entry_point(main)
