"""CPU threads that stay fast beside other jobs. Imported before torch by the entry points:
OpenMP reads its wait policy once, when torch loads it, so setting it later has no effect."""

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
        "auto, null (torch's default) or an integer >= 1",
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


def auto_threads(cores: int | None = None) -> int:
    """`threads: auto`: one thread per physical core. With the passive wait set above, that
    measured faster beside a busy neighbour than one thread, and steady where torch's own
    default (the same count, spinning waits) was several times slower (docs/performance.md, Threads)."""
    return max(1, physical_cores() if cores is None else cores)
