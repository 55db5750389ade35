"""Meta-train a few-shot learner, then test it:  python train.py [experiment=<preset>] [key=value ...]"""

import fewshot.training.threads  # noqa: F401  (first: OpenMP reads its wait policy when torch loads it)

# isort: split
import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fewshot.checkpoints.reading import check_resumable
from fewshot.checkpoints.writing import fit_outcome
from fewshot.cli import reported_as_one_line, run_entry_point
from fewshot.config import CONF, check_config
from fewshot.evaluation.protocol import result_line, score_checkpoint
from fewshot.experiments.cluster import job_device, requeued_resume
from fewshot.experiments.runs import Run, config_subdir, locked_run, run_dir_of
from fewshot.experiments.sweep import recorded_job
from fewshot.training.build import build_datamodule, build_module, build_trainer, set_threads
from fewshot.training.console import quiet_lightning

log = logging.getLogger(__name__)

# Used in conf/train.yaml's hydra section: a resumed run continues in its own directory.
OmegaConf.register_new_resolver("fewshot.run_dir_of", run_dir_of, replace=True)
OmegaConf.register_new_resolver("fewshot.config_subdir", config_subdir, replace=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train; return the best val/acc, the value a Hydra sweeper optimises (None: the job failed)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    # A single run's folder was checked and locked before Hydra wrote into it (RunFolderGuard,
    # conf/train.yaml); a sweep's job takes its folder's lock here, before it records anything.
    with reported_as_one_line(), locked_run(run_dir), recorded_job(run_dir, cfg, multirun) as job:
        if job.finished:  # its test, if it had one, is in its eval/ already
            return job.value
        check_config(cfg)
        # After the digest of the job's config is taken: where a job runs is not what it trains.
        with job_device(cfg, hydra_cfg):
            restart_step = requeued_resume(cfg, run_dir)
            set_threads(cfg.threads)
            pl.seed_everything(cfg.seed, workers=True, verbose=False)
            module = build_module(cfg)  # a backbone that does not fit the images fails here
            log.info("%s: %s", type(module.learner).__name__, parameter_count(module))
            if cfg.ckpt_path is not None:
                restart_step = check_resumable(cfg, module)
            datamodule = build_datamodule(cfg)
            datamodule.setup()  # data errors surface now, before any training
            trainer = build_trainer(cfg, run_dir, restart_step)
            log.info("%s", processes_line(trainer, cfg.algo.meta_batch_size))
            job.starts_training()
            trainer.fit(module, datamodule, ckpt_path=cfg.ckpt_path)
            best, step = fit_outcome(trainer)
            tested = final_test(cfg, run_dir, trainer) if cfg.test_after_training else None
            job.completed(best, step, tested)
    return job.value


def processes_line(trainer: pl.Trainer, tasks: int) -> str:
    """How the run uses the machine, in words."""
    threads = torch.get_num_threads()
    where = f"{threads} CPU thread{'s' if threads > 1 else ''}"
    if trainer.world_size == 1:
        return (
            f"one process on {where}"
            if trainer.strategy.root_device.type == "cpu"
            else (f"one process on {trainer.strategy.root_device}")
        )
    return (
        f"{trainer.world_size} processes of {where} each, sharing every meta-batch of {tasks} "
        "tasks and the validation episodes"
    )


def parameter_count(module: pl.LightningModule) -> str:
    """The meta-parameters that train, and those that stay fixed, in words."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return f"{trainable:,} meta-parameters" + (f" ({frozen:,} fixed)" if frozen else "")


def final_test(cfg: DictConfig, run_dir: Path, trainer: pl.Trainer) -> dict[str, Any] | None:
    """Score the run's best.ckpt as `python evaluate.py ckpt=<run>/checkpoints/best.ckpt` would
    (its default episodes and seed, its JSON in `<run>/eval/`, its episodes spread over the
    run's processes as training's were); print its line and return the result (None where
    there is nothing to test, or in the processes srun or torchrun started besides rank 0)."""
    best = Run(run_dir).best_ckpt
    if trainer.global_rank > 0:
        return None
    if not best.is_file():
        log.warning("no %s (the run never validated): nothing to test", best)
        return None
    protocol = OmegaConf.load(CONF / "evaluate.yaml")  # evaluate.py's defaults: one protocol
    progress = "test" if cfg.trainer.enable_progress_bar else None
    result, output = score_checkpoint(
        best, protocol.episodes, protocol.seed, threads=cfg.threads, progress=progress
    )
    print(result_line(result, output), flush=True)
    return result


if __name__ == "__main__":
    quiet_lightning()
    run_entry_point(main)
