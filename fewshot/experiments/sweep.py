"""Sweeps that keep their work: every job records its outcome in its own folder, a failed job is
listed instead of ending the sweep, a finished job is not trained twice, and a summary table of
all jobs is kept in the sweep folder."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fewshot.errors import user_error
from fewshot.experiments.runs import Run, continues, process_rank, requeued, sweep_jobs
from fewshot.reporting.tables import (
    SEED,
    Row,
    common_overrides_line,
    markdown,
    mean_std_percent,
    override_columns,
    override_keys,
    seed_groups,
    write_table,
)

log = logging.getLogger(__name__)

SUMMARY = "summary"  # summary.md and summary.csv in the sweep folder
SEEDS = "summary_seeds"  # summary_seeds.md and .csv: the jobs that differ only by seed, pooled


def config_digest(cfg: DictConfig) -> str:
    """SHA-256 of the resolved run config, less `skip_finished`, `test_after_training` and
    `threads` (they say how to run, not what is trained)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    for key in ("skip_finished", "test_after_training", "threads"):
        config.pop(key, None)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def one_line(err: BaseException) -> str:
    """The error as one line: the message alone for the user's errors (a bad config, missing
    data, a diverged run), with its type otherwise."""
    yours = user_error(err)
    if yours is not None:
        return " ".join(str(yours).split())
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


class Job:
    """One training run's outcome. `finished` holds the result of an earlier run of the same
    config in the same folder when it may be reused; `value` is what train.py returns.
    `continuing`: the attempt continues the folder's own run (from its last.ckpt, or requeued by
    SLURM) rather than starting one; `training`: it has started to write into the folder."""

    def __init__(
        self,
        run: Run,
        digest: str,
        finished: dict[str, Any] | None,
        continuing: bool = False,
    ) -> None:
        self.run, self.digest, self.finished = run, digest, finished
        self.value: float | None = None if finished is None else finished["val/acc"]
        self.continuing, self.training = continuing, False

    def starts_training(self) -> None:
        """Called once every check has passed, just before training: from here on the folder
        holds this attempt's work, and its failure is recorded whatever the folder held. An
        attempt that starts over in a folder an earlier one trained in (a sweep's job retried
        after it failed or was interrupted, retrained with skip_finished=false or another
        config) first sets that one's checkpoints, events, evaluations and result aside in
        `earlier/<time>/` (Run.set_aside): it overwrites none of them and mixes no events."""
        self.training = True
        if self.continuing or process_rank() > 0:  # the first process moves them, once
            return
        aside = self.run.set_aside()
        if aside is not None:
            log.info("starting over: the earlier attempt's files are set aside in %s", aside)

    def completed(self, best_val_acc: Any, step: int, tested: dict[str, Any] | None = None) -> None:
        """Record a run that trained to the end; `best_val_acc` is a number, tensor or None;
        `tested`: the result of its final test (evaluate.py's), if it had one."""
        best = None if best_val_acc is None else float(best_val_acc)
        # A sweeper is handed a finite number or None (Optuna's plugin fails the study on NaN).
        self.value = best if best is not None and math.isfinite(best) else None
        result = {"status": "completed", "val/acc": self.value, "step": step}
        if tested is not None:
            result |= {key: tested[key] for key in ("test/acc", "test/acc_ci95", "episodes")}
        self.run.write_result({**result, "config": self.digest})

    def failed(self, err: BaseException) -> None:
        self.value = None
        result = {"status": "failed", "error": one_line(err), "config": self.digest}
        if user_error(err) is None:  # a bug or a crash: keep where it was
            result["traceback"] = "".join(traceback.format_exception(err))
        self.run.write_result(result)


@contextmanager
def recorded_job(run_dir: Path, cfg: DictConfig, multirun: bool) -> Iterator[Job]:
    """Record the run's outcome in `<run_dir>/result.json`.

    In a multirun a failure is recorded and swallowed, so the sweep goes on with its other jobs
    (the job returns None); a single run re-raises it (a user error then exits with status 2).
    With `skip_finished` (default true), a multirun job whose folder already holds a completed
    result of the same config reuses it instead of training again.

    A failure before training starts (Job.starts_training: a refused resume, a config or data
    error) has changed nothing in the folder, and leaves its record so: it replaces no completed
    result (only a run that trained may), and no result of a run it was to continue (a resume
    refused leaves the run as it was; the error is on stderr and in the log). Otherwise it is
    recorded: in a fresh folder, or over the failure of an earlier attempt it retried.
    """
    digest = config_digest(cfg)
    run = Run(run_dir)
    earlier = run.read_result()
    reuse = (
        multirun
        and cfg.get("skip_finished", True)
        and earlier is not None
        and earlier.get("status") == "completed"
        and earlier.get("config") == digest
    )
    continuing = requeued() or continues(run_dir, cfg.get("ckpt_path"))
    job = Job(run, digest, earlier if reuse else None, continuing)
    if reuse:
        log.info("%s finished earlier (val/acc %s): not training it again", run_dir, job.value)
    try:
        yield job
    except Exception as err:
        kept = earlier is not None and (continuing or earlier.get("status") == "completed")
        if job.training or not kept:
            job.failed(err)
        else:
            job.value = None
            log.info("%s keeps its result: this attempt failed before it trained", run_dir)
        if not multirun:
            raise
        if user_error(err) is not None:
            log.error("job failed: %s", one_line(err))
        else:
            log.exception("job failed: %s", one_line(err))  # the traceback goes to the job's log


_ORDER = {"completed": 0, "failed": 1, "incomplete": 2}


def sweep_summary(sweep_dir: str | Path) -> tuple[list[str], dict[str, str], list[Row]]:
    """The jobs of a sweep, best first: (columns that vary, overrides all share, rows)."""
    rows = [Row.recorded(job, job.name_in(sweep_dir)) for job in sweep_jobs(sweep_dir)]
    # Completed first, best val/acc first; then failed, then unfinished; ties keep job order.
    rows.sort(key=lambda r: (_ORDER.get(r.status, 3), *r.rank()))
    varying, common = override_columns(rows)
    return varying, common, rows


def write_sweep_summary(sweep_dir: str | Path) -> tuple[Path, list[Row]]:
    """Write `summary.md` and `summary.csv` in the sweep folder; return the .md path and rows."""
    sweep_dir = Path(sweep_dir)
    varying, common, rows = sweep_summary(sweep_dir)
    counts = {s: sum(r.status == s for r in rows) for s in _ORDER}
    preamble = (
        f"# Sweep {sweep_dir}\n\n{len(rows)} jobs: "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        + ". Best validation accuracy (val/acc) of each job, best first.\n"
        + common_overrides_line(common, "job")
    )
    table = [
        {
            "job": r.name,
            "status": r.status,
            "val/acc": r.val_acc,
            "step": r.step,
            "error": r.error,
            **r.overrides,
            "val/acc (%)": r.val_acc_percent,
        }
        for r in rows
    ]
    md_columns = ["job", *varying, "val/acc (%)", "step", "status", "error"]
    csv_columns = ["job", *override_keys(rows), "val/acc", "step", "status", "error"]
    epilogue = write_seed_summary(sweep_dir, varying, rows)
    md_path = write_table(
        sweep_dir / SUMMARY, md_columns, table, csv_columns, table, preamble + "\n", epilogue
    )
    return md_path, rows


def _natural(text: str) -> tuple:
    """Sort key: seeds as numbers where they are numbers (2 before 10)."""
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def write_seed_summary(sweep_dir: Path, varying: list[str], rows: list[Row]) -> str:
    """With `seed` among the overrides that vary, write `summary_seeds.{md,csv}`: per setting
    (the jobs that differ only by seed) the mean ± std of the best val/acc over its completed
    jobs and their number; return the Markdown section for summary.md ("" without a seed axis)."""
    groups = seed_groups([r for r in rows if r.status != "incomplete"])
    if SEED not in varying or not groups:
        return ""
    table = []
    for group in groups:
        completed = [r for r in group.rows if r.status == "completed"]
        mean, std, n = group.val_acc()
        table.append(
            {
                **group.overrides,
                "val/acc (%) over seeds": mean_std_percent((mean, std, n)),
                "val/acc mean": mean,
                "val/acc std": std,
                "n": n,
                "seeds": " ".join(
                    sorted((r.overrides.get(SEED, "") for r in completed), key=_natural)
                ),
                "failed": len(group.rows) - len(completed),
            }
        )
    table.sort(key=lambda t: (t["val/acc mean"] is None, -(t["val/acc mean"] or 0.0)))
    setting = [k for k in varying if k != SEED]
    md_columns = [*setting, "val/acc (%) over seeds", "seeds", "failed"]
    csv_columns = [*setting, "val/acc mean", "val/acc std", "n", "seeds", "failed"]
    heading = (
        "\n## Over seeds\n\nJobs that differ only by `seed`, pooled: mean ± std (n - 1) of "
        "the best val/acc of the completed ones, n of them; best first.\n\n"
    )
    write_table(sweep_dir / SEEDS, md_columns, table, csv_columns, table, heading.lstrip())
    return heading + markdown(md_columns, table)


class SweepSummary(Callback):
    """Hydra callback: rewrites the sweep's summary after every job and at the end, and makes
    the sweep exit with status 1 if a job failed (once every job has run)."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        run = Run(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.FAILED and run.read_result() is None:
            # An error that escaped the job itself (recorded_job records its own).
            err = job_return._return_value
            run.write_result({"status": "failed", "error": one_line(err)})
        write_sweep_summary(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        md_path, rows = write_sweep_summary(config.hydra.sweep.dir)
        print(md_path.read_text(), flush=True)
        log.info("sweep summary: %s and %s", md_path, md_path.with_suffix(".csv"))
        unfinished = sum(r.status == "incomplete" for r in rows)
        if unfinished:  # left by an earlier, interrupted sweep into this folder
            log.warning("%d jobs in %s have no result (interrupted?)", unfinished, md_path.parent)
        failed = sum(r.status == "failed" for r in rows)
        if failed:
            log.error("%d of %d jobs failed; see %s", failed, len(rows), md_path)
            sys.exit(1)
