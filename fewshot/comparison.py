"""Many runs (a sweep's jobs, or a list of checkpoints) scored on the same fixed test episodes,
in one table beside their overrides and validation accuracy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewshot.data.files import write_json
from fewshot.errors import ConfigError
from fewshot.evaluation import evaluate_prefixes, inner_loop_summary
from fewshot.runs import Run, eval_result_path, sweep_jobs, task_suffix
from fewshot.tables import override_columns, write_table


@dataclass
class Target:
    """A run to evaluate: its name in the table, its checkpoint (None if it has none), its run."""

    name: str
    ckpt: Path | None
    run: Run


def targets_of(ckpts: Sequence[str], runs: Sequence[str]) -> list[Target]:
    """Checkpoints named directly, then the best checkpoint of each run or of each job of a sweep."""
    targets = [Target(str(c), Path(c), Run.of_checkpoint(c)) for c in ckpts]
    for folder in map(Path, runs):
        run = Run(folder)
        if run.best_ckpt.is_file():
            targets.append(Target(folder.name, run.best_ckpt, run))
            continue
        jobs = sweep_jobs(folder) if folder.is_dir() else []
        if not jobs:
            raise ConfigError(
                f"run={folder} holds neither checkpoints/best.ckpt nor the job folders of a sweep"
            )
        for job in jobs:
            best = job.best_ckpt if job.best_ckpt.is_file() else None
            targets.append(Target(job.name_in(folder), best, job))
    return targets


def evaluate_targets(
    targets: Sequence[Target],
    counts: Sequence[int],
    seed: int,
    overrides: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """One row per target: its results for every episode count (also written as the usual JSON
    files beside each checkpoint), or why it has none."""
    rows = []
    for target in targets:
        row: dict[str, Any] = {"target": target, "overrides": target.run.override_values()}
        if target.ckpt is None:
            recorded = target.run.read_result() or {}
            why = f"failed: {recorded['error']}" if recorded.get("error") else "no best.ckpt"
            rows.append({**row, "results": {}, "status": why})
            continue
        results = evaluate_prefixes(target.ckpt, counts, seed, overrides, threads)
        for result in results:
            task = task_suffix(overrides or {}, result["protocol"])
            write_json(eval_result_path(target.ckpt, result["episodes"], seed, task), result)
        rows.append({**row, "results": {r["episodes"]: r for r in results}, "status": "evaluated"})
    # Best validation accuracy first: runs are chosen on validation, never on test.
    best = [_first(r).get("val/acc_best") for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (best[i] is None, -(best[i] or 0.0)))
    return [rows[i] for i in order]


_PROTOCOL_COLUMNS = ("batch_norm", "batch_norm_train")


def _first(row: dict[str, Any]) -> dict[str, Any]:
    return next(iter(row["results"].values()), {})


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.2f}"


def write_evaluation_table(
    path: str | Path, rows: Sequence[dict[str, Any]], counts: Sequence[int], seed: int
) -> Path:
    """Markdown and CSV tables of evaluated runs; returns the Markdown path."""
    varying, common = override_columns([r["overrides"] for r in rows])
    # What the runs share of the protocol goes above the table, what differs in columns;
    # batch norm and test-time inner steps are always columns.
    protocols = [
        {k: v for k, v in _first(r)["protocol"].items() if k not in _PROTOCOL_COLUMNS}
        for r in rows
        if r["results"]
    ]
    keys = list(dict.fromkeys(k for p in protocols for k in p))
    shared = {
        k: protocols[0][k] for k in keys if all(p.get(k) == protocols[0][k] for p in protocols)
    }
    protocol_columns = [k for k in keys if k not in shared]
    acc_columns = [f"test/acc % ({n} ep)" for n in counts]
    md_rows, csv_rows = [], []
    for row in rows:
        first = _first(row)
        p = first.get("protocol", {})
        cells = {
            "run": row["target"].name,
            **row["overrides"],
            **{k: p.get(k) for k in protocol_columns},
            "steps": first.get("trained_steps"),
            "batch norm (train/test)": f"{p['batch_norm_train']}/{p['batch_norm']}" if p else None,
            "inner loop (test)": inner_loop_summary(p) if p else None,
            "status": row["status"],
        }
        md = {**cells, "val/acc %": _percent(first.get("val/acc_best"))}
        csv = {
            **cells,
            "checkpoint": first.get("checkpoint"),
            "val/acc_best": first.get("val/acc_best"),
        }
        for n, column in zip(counts, acc_columns):
            result = row["results"].get(n)
            if result:
                md[column] = f"{100 * result['test/acc']:.2f} ± {100 * result['test/acc_ci95']:.2f}"
                csv[f"test/acc_{n}"] = result["test/acc"]
                csv[f"test/acc_ci95_{n}"] = result["test/acc_ci95"]
        md_rows.append(md)
        csv_rows.append(csv)
    preamble = (
        f"Test accuracy ± 95% CI (1.96·std/√n) on the first n of {max(counts)} fixed meta-test "
        f"episodes (seed {seed}); episode i does not depend on how many are drawn, so each "
        "column equals an evaluation of n episodes alone. Best validation accuracy (val/acc, "
        "the selection metric) first.\n"
    )
    if shared:
        preamble += "Protocol of every run: " + ", ".join(f"{k} {v}" for k, v in shared.items())
        preamble += "\n"
    if common:
        preamble += "Overrides of every run: " + " ".join(f"`{k}={v}`" for k, v in common.items())
        preamble += "\n"
    tail = ["steps", "batch norm (train/test)", "inner loop (test)", "status"]
    md_columns = ["run", *varying, *protocol_columns, "val/acc %", *acc_columns, *tail]
    all_keys = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
    per_count = [f"test/acc{s}_{n}" for n in counts for s in ("", "_ci95")]
    csv_columns = ["run", *all_keys, *protocol_columns, "val/acc_best", *per_count, *tail]
    md_path, _ = write_table(
        path, md_columns, md_rows, [*csv_columns, "checkpoint"], csv_rows, preamble + "\n"
    )
    return md_path
