"""How a run uses the CPU cores it may: `threads: auto` (the default) is one process per
physical core, one torch thread each, the processes sharing every meta-batch's tasks and the
fixed episodes (train.py, through DDP; evaluate.py, through a pool). On these small
convolutions more intra-op threads gain little or lose (docs/performance.md); tasks at once are
what scale. Imported before torch by the entry points: OpenMP reads its wait policy once, when
torch loads it, so setting it later has no effect."""

from __future__ import annotations

import os
from pathlib import Path

from fewshot.settings import Rule, int_at_least

# Waiting threads sleep instead of spinning, so a job never burns a core it does not use while
# a neighbour needs it. A policy the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

AUTO = "auto"

# The run's `threads` key (a key of train.py's and evaluate.py's configs, read by set_threads).
SETTINGS: dict[str, Rule] = {
    "threads": (
        (lambda v: v is None or v == AUTO or int_at_least(1)[0](v)),
        "auto (a process per core, one thread each), null (torch's default) or an integer >= 1",
    ),
}


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyperthreads counted once)."""
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:  # no sysfs topology (a container may hide it): count CPUs
            return len(cpus)
        cores.add((package, core))
    return len(cores)


def usable_cores() -> int:
    """Physical cores this process may use: its CPU affinity (which hydra/launcher=parallel
    narrows to each job's share), hyperthreads counted once, at most the CPUs SLURM gave the
    task."""
    cores = physical_cores()
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    return max(1, min(cores, int(slurm)) if slurm else cores)


def auto_processes(threads: int | str | None, on_cpu: bool, items: int) -> int:
    """The processes that share `items` tasks (or episodes) at a time: with `threads: auto` on
    the CPU, one per usable core, as many as there are items at most (each must have one);
    otherwise one. Decided from the machine alone, never from timing at run time."""
    if threads != AUTO or not on_cpu:
        return 1
    return max(1, min(usable_cores(), items))


def thread_count(threads: int | str | None) -> int | None:
    """torch's intra-op threads for `threads`: auto is one per process (its processes use the
    other cores); None leaves torch's own default."""
    return 1 if threads == AUTO else threads
