"""What a training job does under a cluster launcher: take a device no other job of the sweep
holds (hydra/launcher=parallel), resume from its own last.ckpt when SLURM requeued it, and leave
requeueing to the launcher (Lightning's own SLURM handler is turned off)."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from pytorch_lightning.plugins.environments import (
    LightningEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)

from fewshot.errors import ConfigError
from fewshot.experiments.runs import Run, requeued

log = logging.getLogger(__name__)

PARALLEL_LAUNCHER = "hydra_plugins.fewshot_cluster.launchers.ParallelLauncher"
SLOTS = ".slots"
LOCAL_PROCESSES = (
    "ddp_spawn",
    "ddp_fork",
)  # strategies that start a run's processes themselves  # <sweep>/.slots/<i>: the lock a running job holds on device i


def parallel_jobs(n_jobs: int) -> int:
    """How many jobs hydra/launcher=parallel runs at once: `n_jobs`, or for -1 one per GPU, or
    on a machine without one, one per CPU core this process may use."""
    if n_jobs > 0:
        return n_jobs
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return len(os.sched_getaffinity(0))


def uses_gpu(cfg: DictConfig) -> bool:
    accelerator = str(cfg.trainer.accelerator)
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


@contextmanager
def claimed_slot(folder: Path, slots: int) -> Iterator[int]:
    """Hold one of `slots` numbered locks in `folder` for the block, and yield its number.

    flock, not a marker file: the kernel releases the lock of a job that dies, so a crashed
    job never keeps its device from the next one.
    """
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 600  # joblib starts a job only when one has ended
    while True:
        for slot in range(slots):
            handle = open(folder / str(slot), "a")  # noqa: SIM115 (held for the block)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield slot
            finally:
                handle.close()  # releases the lock
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no free slot of {slots} in {folder} after 10 minutes")
        time.sleep(0.1)


@contextmanager
def job_device(cfg: DictConfig, hydra_cfg: Any) -> Iterator[None]:
    """Under hydra/launcher=parallel, give the job a device of its own for the block: GPU i, or
    1/n of the CPUs this process may use (its affinity narrowed to them: `threads: auto` then
    counts its cores, fewshot.training.threads.usable_cores). `cfg` is changed in place."""
    if hydra_cfg.launcher.get("_target_") != PARALLEL_LAUNCHER:
        yield
        return
    jobs = parallel_jobs(hydra_cfg.launcher.n_jobs)
    with claimed_slot(Path(hydra_cfg.sweep.dir) / SLOTS, jobs) as slot:
        if uses_gpu(cfg):
            gpus = torch.cuda.device_count()
            if jobs > gpus:
                raise ConfigError(
                    f"hydra.launcher.n_jobs={jobs} runs more jobs at once than this machine's "
                    f"{gpus} GPUs: two would share one; set it to at most {gpus}"
                )
            if cfg.trainer.devices not in (1, "1", "auto"):
                raise ConfigError(
                    f"trainer.devices={cfg.trainer.devices}: hydra/launcher=parallel gives each "
                    "job one GPU; use hydra/launcher=slurm for multi-GPU jobs"
                )
            cfg.trainer.devices = [slot]
            log.info("job on GPU %d (slot %d of %d)", slot, slot, jobs)
        else:
            before = os.sched_getaffinity(0)
            cpus = sorted(before)
            mine = cpus[len(cpus) * slot // jobs : len(cpus) * (slot + 1) // jobs] or cpus
            # Its own CPUs: threads=auto then runs a process on each of its cores.
            os.sched_setaffinity(0, mine)
            log.info("job on CPUs %s (slot %d of %d)", ",".join(map(str, mine)), slot, jobs)
            try:
                yield
            finally:  # joblib's worker runs the next job: with all the CPUs it had
                os.sched_setaffinity(0, before)
            return
        yield


def requeued_resume(cfg: DictConfig, run_dir: Path) -> int | None:
    """In a job SLURM requeued (preempted, or timed out and requeued by submitit), continue
    from the run's own last.ckpt: set `ckpt_path` to it and return None (its step comes from the
    checkpoint). That holds for a job started from another checkpoint too: its own last.ckpt is
    past it, and starting from it again would overwrite the job's own progress. A requeued job
    with no checkpoint of its own yet starts over in its folder as it first started: from its
    `ckpt_path` (None: the TensorBoard events past that checkpoint's step are dropped), or from
    scratch (0: all the events its first attempt logged are dropped). Otherwise return None,
    `cfg` unchanged."""
    if not requeued():
        return None
    last = Run(run_dir).last_ckpt
    restarts = os.environ["SLURM_RESTART_COUNT"]
    if last.is_file():
        log.info("requeued job (restart %s): resuming from %s", restarts, last)
        cfg.ckpt_path = str(last)
        return None
    if cfg.ckpt_path is not None:
        log.info("requeued job (restart %s): starting again from %s", restarts, cfg.ckpt_path)
        return None
    log.info("requeued job (restart %s) with no checkpoint yet: starting over", restarts)
    return 0


def cluster_trainer_settings(options: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """Trainer options and plugins for the process this runs in.

    Under SLURM, the launcher requeues (submitit, on its own signal): Lightning's SLURM
    environment keeps reading ranks from SLURM but does not install its SIGUSR1 handler, which
    would requeue the job a second time and save checkpoints of its own. Where srun or torchrun
    started one process per device, `ddp_spawn` (trainer=ddp) or `ddp_fork` (threads=auto on
    CPUs) would start more in each: use `ddp`, which joins the processes that exist. In a
    one-task SLURM job the run starts its processes itself, and numbers them.
    """
    plugins: list[Any] = []
    external = TorchElasticEnvironment.detect()
    if SLURMEnvironment.detect():
        external = external or int(os.environ.get("SLURM_NTASKS", 1)) > 1
        if external or options.get("strategy") not in LOCAL_PROCESSES:
            plugins.append(SLURMEnvironment(auto_requeue=False))
        else:  # one SLURM task that starts its own processes on its CPUs: ranks are ours
            plugins.append(LightningEnvironment())
    if external and options.get("strategy") in LOCAL_PROCESSES:
        options = {**options, "strategy": "ddp"}
    return options, plugins
