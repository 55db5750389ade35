"""hydra/launcher=slurm (submitit's SLURM launcher) and hydra/launcher=parallel (joblib's), with
what fewshot adds: bad settings refused before anything is submitted, a job SLURM killed listed
as failed while the others keep their results, and every parallel job on a device of its own."""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException

from fewshot.errors import ConfigError
from fewshot.experiments.cluster import parallel_jobs
from fewshot.experiments.runs import Run

log = logging.getLogger(__name__)

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
        SlurmLauncher as _SubmititSlurm,
    )
except ImportError:  # without the `cluster` extra the launcher configs name the install command
    _SubmititSlurm = None
try:
    from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher as _Joblib
except ImportError:
    _Joblib = None

# Launcher keys -> the sbatch option SLURM checks them by (submitit passes them on so).
SBATCH_OPTIONS = {
    "partition": "--partition",
    "account": "--account",
    "qos": "--qos",
    "timeout_min": "--time",
    "nodes": "--nodes",
    "tasks_per_node": "--ntasks-per-node",
    "cpus_per_task": "--cpus-per-task",
    "gpus_per_node": "--gpus-per-node",
    "mem_gb": "--mem",
    "constraint": "--constraint",
}


# Job states in which a SLURM job runs no more (squeue/scontrol names).
ENDED = frozenset(
    {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY"}
    | {"TIMEOUT"}
)
FORGOTTEN = "no longer known to SLURM"
RESULT_GRACE_S = 20  # a result file written just before the job's end may reach us later (NFS)


class JobLost(RuntimeError):
    """A SLURM job ended without the result file submitit writes at a job's end."""

    def __init__(self, state: str, log_file: Path) -> None:
        super().__init__(f"it ended without writing its result (killed?); its log: {log_file}")
        self.state = state


def controller_state(job_id: str) -> str | None:
    """The job's state as slurmctld holds it (`scontrol show job`), FORGOTTEN once it no longer
    does (MinJobAge after the job's end), None where scontrol cannot say now."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    if proc.returncode != 0:
        return FORGOTTEN if "Invalid job id" in proc.stderr else None
    words = dict(w.split("=", 1) for w in proc.stdout.split() if "=" in w)
    return words.get("JobState")


def waited_result(job: Any, poll_s: float = 2.0) -> Any:
    """The job's return value once it ends (submitit's job.results()), or JobLost.

    Submitit learns a job's end from its result file or from sacct. Where SLURM keeps no
    accounting, sacct answers nothing and submitit reads the state as UNKNOWN for ever: a job
    killed before it could write its result (SIGKILL, the OOM killer, a node lost) would be
    waited for without end. There, ask the controller instead.
    """
    ended_at = None
    while not job.done():
        state = job.state
        if state == "UNKNOWN":
            state = controller_state(job.job_id)
        if state in ENDED or state == FORGOTTEN:
            ended_at = ended_at or time.monotonic()
            if time.monotonic() - ended_at > RESULT_GRACE_S:
                raise JobLost(state, job.paths.stderr)
        else:
            ended_at = None
        time.sleep(poll_s)
    return job.results()[0]


def user_error(message: str) -> HydraException:
    """An error Hydra passes on to the entry point, which prints the ConfigError as one line."""
    error = HydraException(message)
    error.__cause__ = ConfigError(message)
    return error


def sbatch_arguments(params: dict[str, Any]) -> dict[str, list[str]]:
    """Launcher key -> the sbatch arguments it becomes, for the keys SLURM checks."""
    arguments = {}
    for key, option in SBATCH_OPTIONS.items():
        value = params.get(key)
        if value is None or (key == "gpus_per_node" and value == 0):
            continue
        value = f"{value}G" if key == "mem_gb" else value
        arguments[key] = [f"{option}={value}"]
    for key, value in (params.get("additional_parameters") or {}).items():
        arguments[f"additional_parameters.{key}"] = [f"--{key.replace('_', '-')}={value}"]
    return arguments


def refused_by_slurm(arguments: dict[str, list[str]]) -> tuple[str, str] | None:
    """(key, SLURM's reason) for the first key sbatch refuses, or None if it accepts them all.

    `sbatch --test-only` checks a job against the cluster (partitions, accounts, limits, the
    time format) without submitting it; each key is then tried alone to name the culprit.
    """

    def reason(args: list[str]) -> str | None:
        proc = subprocess.run(
            ["sbatch", "--test-only", *args, "--wrap=true"], capture_output=True, text=True
        )
        lines = [line.strip() for line in proc.stderr.splitlines() if "error" in line.lower()]
        return None if proc.returncode == 0 else (lines or [proc.stderr.strip()])[-1]

    if reason([a for args in arguments.values() for a in args]) is None:
        return None
    for key, args in arguments.items():
        refused = reason(args)
        if refused is not None:
            return key, refused
    return "(the combination)", reason([a for args in arguments.values() for a in args]) or ""


if _SubmititSlurm is not None:

    class SlurmLauncher(_SubmititSlurm):
        """Submitit's SLURM launcher; requeueing is submitit's (its `checkpoint` resubmits the
        job's own call, and train.py resumes from the job folder's last.ckpt)."""

        def __init__(self, **params: Any) -> None:
            if shutil.which("sbatch") is None:
                raise ConfigError(
                    "hydra/launcher=slurm submits with SLURM's sbatch, which is not on PATH: "
                    "run the sweep where SLURM is installed (a login node), or use "
                    "hydra/launcher=parallel on this machine"
                )
            super().__init__(**params)
            refused = refused_by_slurm(sbatch_arguments(self.params))
            if refused is not None:
                key, reason = refused
                name = key.removeprefix("additional_parameters.")
                given = self.params if name == key else self.params["additional_parameters"]
                raise ConfigError(
                    f"hydra.launcher.{key}={given.get(name)} is refused by SLURM: {reason}"
                )

        def launch(
            self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
        ) -> Sequence[JobReturn]:
            import submitit

            executor = submitit.AutoExecutor(
                folder=self.params["submitit_folder"],
                cluster=self._EXECUTOR,
                slurm_max_num_timeout=self.params["max_num_timeout"],
            )
            base = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node"}
            base |= {"mem_gb", "nodes", "name", "stderr_to_stdout"}
            executor.update_parameters(
                **{
                    key if key in base else f"slurm_{key}": value
                    for key, value in self.params.items()
                    if key not in ("submitit_folder", "max_num_timeout")
                }
            )
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
            jobs = executor.map_array(
                self,
                [list(o) for o in job_overrides],
                ["hydra.sweep.dir"] * len(job_overrides),
                list(numbers),
                [f"job_id_for_{n}" for n in numbers],
                [Singleton.get_state()] * len(job_overrides),
            )
            log.info("submitted %d jobs: %s", len(jobs), " ".join(j.job_id for j in jobs))
            # Each job in turn: one that SLURM killed raises from results(), and must not stop
            # the waiting for the others (whose results the summary then lists).
            return [
                self._outcome(job, overrides, n)
                for job, overrides, n in zip(jobs, job_overrides, numbers)
            ]

        def _outcome(self, job: Any, overrides: Sequence[str], number: int) -> JobReturn:
            try:
                return waited_result(job)
            except Exception as err:  # killed by SLURM (memory, time, scancel) or lost
                reason = " ".join(str(err).split())[:500]
                state = getattr(err, "state", None) or job.state
                sweep_cfg = self.hydra_context.config_loader.load_sweep_config(
                    self.config, list(overrides)
                )
                sweep_cfg.hydra.job.num = number
                run = Run(Path(sweep_cfg.hydra.sweep.dir) / str(sweep_cfg.hydra.sweep.subdir))
                result = run.read_result()
                if result is None or result.get("status") != "completed":
                    run.dir.mkdir(parents=True, exist_ok=True)
                    error = f"SLURM job {job.job_id} ended {state}: {reason}"
                    run.write_result({"status": "failed", "error": error})
                log.error("job %d (SLURM %s) ended %s", number, job.job_id, state)
                # Completed, returning None: the sweep goes on; the summary lists it as failed.
                ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
                ret.return_value = None
                return ret


if _Joblib is not None:

    class ParallelLauncher(_Joblib):
        """Joblib's launcher running `n_jobs` jobs at once (-1: one per GPU, or per CPU core);
        each job takes a device of its own (fewshot.experiments.cluster.job_device)."""

        def __init__(self, **params: Any) -> None:
            params["n_jobs"] = parallel_jobs(params.get("n_jobs", -1))
            super().__init__(**params)
