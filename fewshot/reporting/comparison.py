"""Many runs (a sweep's jobs, or a list of checkpoints) scored on the same fixed test episodes,
in one table beside their overrides and validation accuracy."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fewshot.errors import ConfigError, DataError, user_error
from fewshot.evaluation.protocol import evaluate_prefixes, recorded_test_keys, result_paths
from fewshot.experiments.runs import Run, sweep_jobs
from fewshot.files import unwritable, write_json
from fewshot.reporting.paired import compared, paired_line, reference_index
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

# The status of a checkpoint that could not be scored (damaged, or refusing the overrides):
# its row is kept, with the reason, and the others are scored.
NOT_EVALUATED = "not evaluated"


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
    threads: int | str | None = None,
) -> list[Row]:
    """One row per target: its results for every episode count (also written as the usual JSON
    files beside each checkpoint), or why it has none. A checkpoint that cannot be scored (a
    user error: damaged, refusing the overrides, its result files unwritable) is a row marked
    NOT_EVALUATED with its one-line reason, and the others are still scored. On a terminal, a
    progress bar per checkpoint says which of how many it is and the time the others will take."""
    rows = []
    scored = [t for t in targets if t.ckpt is not None]
    started = time.monotonic()
    tried = done = 0
    for target in targets:
        run_overrides = target.run.override_values()
        if target.ckpt is None:
            error = (target.run.read_result() or {}).get("error")
            status = "failed" if error else "no best.ckpt"
            rows.append(Row(target.name, run_overrides, status, error=error))
            continue
        label = f"checkpoint {tried + 1}/{len(scored)} {target.name}"
        if done:
            per_checkpoint = (time.monotonic() - started) / done
            label += f" (then ~{per_checkpoint * (len(scored) - tried - 1) / 60:.0f} min more)"
        tried += 1
        try:
            results = scored_and_written(target.ckpt, counts, seed, overrides, threads, label)
        except Exception as err:
            reason = user_error(err)
            if reason is None:  # a bug, not the checkpoint's fault: a traceback
                raise
            rows.append(Row(target.name, run_overrides, NOT_EVALUATED, error=str(reason)))
            continue
        done += 1
        rows.append(Row.evaluated(target.name, run_overrides, results))
    return sorted(rows, key=Row.rank)


def scored_and_written(
    ckpt: Path,
    counts: Sequence[int],
    seed: int,
    overrides: Mapping[str, Any] | None,
    threads: int | str | None,
    label: str,
) -> list[dict[str, Any]]:
    """evaluate_prefixes' results of one checkpoint, each written to the file evaluate.py
    gives it alone (evaluation.result_paths), which is checked writable before scoring."""
    paths: list[Path] = []

    def check_files(cfg: DictConfig, own: DictConfig) -> None:
        paths.extend(result_paths(ckpt, counts, seed, overrides or {}, cfg, own))
        for path in paths:
            reason = unwritable(path)
            if reason is not None:
                raise ConfigError(f"its result file {path} cannot be written: {reason}")

    results = evaluate_prefixes(ckpt, counts, seed, overrides, threads, label, check_files)
    for path, result in zip(paths, results):
        write_json(path, result)
    return results


def check_all_evaluated(targets: Sequence[Target], rows: Sequence[Row], table: Path) -> None:
    """Raise a DataError naming the checkpoints `rows` mark NOT_EVALUATED: called once the
    table is written, so that the others' results are kept and the exit status still says
    that some are missing."""
    names = {row.name for row in rows if row.status == NOT_EVALUATED}
    if not names:
        return
    failed = [str(t.ckpt) for t in targets if t.name in names]
    tried = sum(t.ckpt is not None for t in targets)
    raise DataError(
        f"{len(failed)} of {tried} checkpoints could not be evaluated: {', '.join(failed)}; "
        f"why is in the status column of {table}"
    )


# Protocol fields that get no column of their own: batch norm has its column, the inner loop
# (the test keys and their values) too, and `settings` (every algo key) stays in the JSON.
_SHOWN_ELSEWHERE = ("batch_norm", "batch_norm_train", "settings", "test_keys")


def protocol_fields(protocol: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a result's protocol that may be columns of its own."""
    hidden = {*_SHOWN_ELSEWHERE, *recorded_test_keys(protocol)}
    return {k: v for k, v in protocol.items() if k not in hidden}


def write_evaluation_table(
    path: str | Path, rows: Sequence[Row], counts: Sequence[int], seed: int
) -> Path:
    """Markdown and CSV tables of evaluated runs; returns the Markdown path."""
    varying, common = override_columns(rows)
    # What the runs share of the protocol goes above the table, what differs in columns;
    # batch norm and test-time inner steps are always columns.
    protocols = [protocol_fields(r.protocol) for r in rows if r.results]
    keys = list(dict.fromkeys(k for p in protocols for k in p))
    # A key only some methods record (Meta-LSTM's inner_epochs beside MAML) is a column.
    first = protocols[0] if protocols else {}
    shared = {k: first[k] for k in keys if all(k in p and p[k] == first.get(k) for p in protocols)}
    protocol_columns = [k for k in keys if k not in shared]
    acc_columns = [f"test/acc % ({n} ep)" for n in counts]
    paired = pairing(rows, counts)
    md_rows, csv_rows = [], []
    for i, row in enumerate(rows):
        cells = {
            "run": row.name,
            **row.overrides,
            **{k: row.protocol.get(k) for k in protocol_columns},
            "steps": row.step,
            "batch norm (train/test)": row.batch_norm,
            "inner loop (test)": row.inner_loop,
            "status": f"{row.status}: {row.error}" if row.error else row.status,
        }
        md = {**cells, "val/acc %": row.val_acc_percent}
        md.update((column, row.test_acc(n)) for n, column in zip(counts, acc_columns))
        md.update(paired.md[i] if paired else {})
        csv = {**cells, "checkpoint": row.checkpoint, "val/acc_best": row.val_acc}
        for n, result in row.results.items():
            csv[f"test/acc_{n}"] = result["test/acc"]
            csv[f"test/acc_ci95_{n}"] = result["test/acc_ci95"]
        csv.update(paired.csv[i] if paired else {})
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
    preamble += common_overrides_line(common, "run")
    md_paired, csv_paired = [], []
    if paired:
        chosen = "the first row that keeps per-episode accuracies: best val/acc"
        preamble += paired_line("run", paired.reference, chosen)
        md_paired = [f"{c} ({n} ep)" for n in counts for c in _PAIRED_MD] + [PAIRED]
        csv_paired = [f"{c}_{n}" for n in counts for c in _PAIRED_CSV] + [PAIRED]
    tail = ["steps", "batch norm (train/test)", "inner loop (test)", "status"]
    md_columns = [
        "run",
        *varying,
        *protocol_columns,
        "val/acc %",
        *acc_columns,
        *md_paired,
        *tail,
    ]
    per_count = [f"test/acc{s}_{n}" for n in counts for s in ("", "_ci95")]
    csv_columns = [
        "run",
        *override_keys(rows),
        *protocol_columns,
        "val/acc_best",
        *per_count,
        *csv_paired,
        *tail,
    ]
    epilogue = seed_table(rows, varying, counts)
    return write_table(
        path,
        md_columns,
        md_rows,
        [*csv_columns, "checkpoint"],
        csv_rows,
        preamble + "\n",
        epilogue,
    )


PAIRED = "paired"
_PAIRED_MD = ("Δ % vs reference", "won/lost/tied")
_PAIRED_CSV = ("paired_diff", "paired_diff_ci95", "won", "lost", "tied")


@dataclass
class Pairing:
    """The evaluation table's paired columns: the reference row's name (None where no row
    keeps per-episode accuracies) and each row's Markdown and CSV cells."""

    reference: str | None
    md: list[dict[str, Any]]
    csv: list[dict[str, Any]]


def pairing(rows: Sequence[Row], counts: Sequence[int]) -> Pairing | None:
    """Each row paired with the reference (reporting.paired.reference_index: rows are best
    val/acc first, so it is the run validation selects) at every count, its `paired` cell
    saying reference, paired, or why not; None with fewer than two evaluated rows."""
    largest = [row.results.get(max(counts)) for row in rows]
    if sum(result is not None for result in largest) < 2:
        return None
    index = reference_index(largest)
    reference = None if index is None else rows[index]
    md_rows, csv_rows = [], []
    for row, result in zip(rows, largest):
        md: dict[str, Any] = {}
        csv: dict[str, Any] = {}
        if row is reference:
            md[PAIRED] = csv[PAIRED] = "reference"
        elif result is not None:
            for n in counts:
                difference = compared(row.results[n], reference.results[n] if reference else {})
                if isinstance(difference, str):
                    md[PAIRED] = csv[PAIRED] = f"not paired: {difference}"
                    break
                md[PAIRED] = csv[PAIRED] = PAIRED
                md[f"{_PAIRED_MD[0]} ({n} ep)"] = difference.percent()
                md[f"{_PAIRED_MD[1]} ({n} ep)"] = difference.counts()
                values = (difference.mean, difference.ci95)
                values += (difference.won, difference.lost, difference.tied)
                csv.update((f"{column}_{n}", v) for column, v in zip(_PAIRED_CSV, values))
        md_rows.append(md)
        csv_rows.append(csv)
    return Pairing(None if reference is None else reference.name, md_rows, csv_rows)


def seed_table(rows: Sequence[Row], varying: Sequence[str], counts: Sequence[int]) -> str:
    """A Markdown section pooling the runs that differ only by `seed`: per setting the mean ±
    std (n - 1) over seeds of val/acc and of test accuracy at each episode count; "" when the
    runs have no seed axis. Each seed's own ± is its 95% CI over episodes, in the table above."""
    groups = seed_groups(rows)
    if SEED not in varying or not groups:
        return ""
    setting = [k for k in varying if k != SEED]
    columns = [*setting, "seeds", "val/acc % over seeds"]
    columns += [f"test/acc % over seeds ({n} ep)" for n in counts]
    table = []
    for group in groups:
        cells = {**group.overrides, "seeds": " ".join(group.seeds)}
        cells["val/acc % over seeds"] = mean_std_percent(group.val_acc())
        for n in counts:
            cells[f"test/acc % over seeds ({n} ep)"] = mean_std_percent(group.test_acc(n))
        table.append(cells)
    return (
        "\n## Over seeds\n\nRuns that differ only by `seed`, pooled: mean ± std (n - 1) over "
        "seeds, n seeds with a result.\n\n" + markdown(columns, table)
    )
