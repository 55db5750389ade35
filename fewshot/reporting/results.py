"""Results tables (docs/results-*.md), made from evaluate.py's JSON files beside the papers' numbers:
python -m fewshot.reporting.results outputs/*/*/eval/*.json [--output results.md]"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fewshot.data.registry import dataset as dataset_named
from fewshot.errors import DataError
from fewshot.reporting.paired import compared, paired_line, reference_index
from fewshot.reporting.papers import PAPERS, key, result_key
from fewshot.reporting.tables import SEED, Row, markdown, mean_std

COLUMNS = (
    "setting",
    "paper",
    "fewshot",
    "test episodes",
    "split",
    "batch norm (train/test)",
    "inner loop (test)",
    "meta-iterations",
)


def load_results(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """evaluate.py's result files; anything else is refused naming the file."""
    results = []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"{path} is not readable as an evaluation result: {err}") from err
        if not isinstance(result, dict) or not {"test/acc", "protocol"} <= result.keys():
            raise DataError(f"{path} is not an evaluation result of evaluate.py (no test/acc)")
        results.append(result)
    return results


def _setting(
    algorithm: str, first_order: bool, dataset: str, way: int, shot: int, backbone: str = "conv4"
) -> str:
    """A row's setting, from its key (papers.key)."""
    name = f"{dataset_named(dataset).title} {way}-way {shot}-shot"
    return (
        name
        + (" (first order)" if first_order else "")
        + (f" ({backbone})" if backbone != "conv4" else "")
    )


def _ours(row: Row) -> dict[str, Any]:
    (episodes,) = row.results  # one result file per row
    return {
        "fewshot": row.test_acc(episodes),
        "test episodes": episodes,
        "split": row.protocol.get("split"),
        "batch norm (train/test)": row.batch_norm,
        "inner loop (test)": row.inner_loop,
        "meta-iterations": row.step,
    }


def _ours_with_seeds(rows: Sequence[Row], cells: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per result file, then, where files of one protocol (episodes, split,
    batch norm, inner loop, meta-iterations) come from several training seeds, a row of the
    mean ± std (n - 1) over those seeds."""
    table = [{**cells, **_ours(row)} for row in rows]
    pooled: dict[tuple, list[tuple[Row, dict[str, Any]]]] = {}
    for row, line in zip(rows, table):
        protocol = tuple(v for k, v in line.items() if k not in ("fewshot", *cells))
        pooled.setdefault(protocol, []).append((row, line))
    for members in pooled.values():
        seeds = {row.overrides.get(SEED) for row, _ in members} - {None}
        if len(seeds) < 2:
            continue
        (episodes,) = members[0][0].results
        mean, std, n = mean_std([row.results[episodes]["test/acc"] for row, _ in members])
        table.append(
            {
                **members[0][1],
                "fewshot": f"{100 * mean:.2f} ± {100 * std:.2f} over {n} seeds "
                f"({', '.join(sorted(seeds))})",
            }
        )
    return table


def results_tables(results: Sequence[dict[str, Any]], names: Sequence[str] | None = None) -> str:
    """One Markdown table per paper: every setting it reports with our results for it (one row
    per result file, "not run" where there is none), then our results for settings it lacks;
    with several results, a last table pairing each with the first (paired_table; `names`:
    the results' files, in the same order)."""
    by_key: dict[tuple, list[Row]] = {}
    for result in sorted(
        results, key=lambda r: (r["episodes"], r.get("trained_steps") or 0, r["test/acc"])
    ):
        seed = result.get("train_seed")
        row = Row.evaluated("", {} if seed is None else {SEED: str(seed)}, [result])
        p = row.protocol
        # Results from before the protocol recorded the backbone were all Conv4's.
        backbone = p.get("backbone", "conv4")
        setting = key(
            p["algorithm"], p.get("first_order"), p["dataset"], p["way"], p["shot"], backbone
        )
        by_key.setdefault(setting, []).append(row)
    reported = {result_key(paper, result) for paper in PAPERS for result in paper.results}
    sections = []
    for paper in PAPERS:
        rows = []
        for result in paper.results:
            setting = _setting(*result_key(paper, result))
            ours = by_key.pop(result_key(paper, result), [])
            rows += _ours_with_seeds(ours, {"setting": setting, "paper": result.accuracy})
            if not ours:
                rows.append({"setting": setting, "paper": result.accuracy, "fewshot": "not run"})
        # Then the method's settings no paper reports (those another paper does wait for it).
        for other in [k for k in by_key if k[0] == paper.algorithm and k not in reported]:
            rows += _ours_with_seeds(by_key.pop(other), {"setting": _setting(*other), "paper": "—"})
        sections.append(
            f"### {paper.title}\n\nPaper's protocol: {paper.protocol}\n\n" + markdown(COLUMNS, rows)
        )
    for other, ours in by_key.items():  # algorithms no paper here reports
        rows = _ours_with_seeds(ours, {"setting": _setting(*other), "paper": "—"})
        sections.append(f"### {other[0]}\n\n" + markdown(COLUMNS, rows))
    if len(results) > 1:
        names = names or [f"result {i + 1}" for i in range(len(results))]
        sections.append(paired_table(results, names))
    return "\n".join(sections)


PAIRED_COLUMNS = (
    "result",
    "setting",
    "algorithm",
    "test/acc %",
    "test episodes",
    "batch norm (train/test)",
    "Δ % vs reference",
    "won/lost/tied",
    "paired",
)


def paired_table(results: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    """A Markdown section pairing each result with the reference, the first named that keeps
    per-episode accuracies (reporting.paired): its unpaired accuracy beside the mean paired
    difference and the episodes each won, or why it is not paired."""
    index = reference_index(results)
    rows = []
    for i, (result, name) in enumerate(zip(results, names)):
        row = Row.evaluated(name, {}, [result])
        p = row.protocol
        cells = {
            "result": name,
            "setting": _setting(p["algorithm"], False, p["dataset"], p["way"], p["shot"]),
            "algorithm": p["algorithm"] + (" (first order)" if p.get("first_order") else ""),
            "test/acc %": row.test_acc(result["episodes"]),
            "test episodes": result["episodes"],
            "batch norm (train/test)": row.batch_norm,
        }
        if i == index:
            cells["paired"] = "reference"
            rows.append(cells)
            continue
        difference = compared(result, {} if index is None else results[index])
        if isinstance(difference, str):
            cells["paired"] = f"not paired: {difference}"
        else:
            cells["Δ % vs reference"] = difference.percent()
            cells["won/lost/tied"] = difference.counts()
            cells["paired"] = "paired"
        rows.append(cells)
    reference = None if index is None else names[index]
    chosen = "the first file named that keeps per-episode accuracies"
    return (
        "### Paired comparisons\n\n"
        + paired_line("result", reference, chosen)
        + "\n"
        + markdown(PAIRED_COLUMNS, rows)
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fewshot.reporting.results", description=__doc__.splitlines()[0]
    )
    parser.add_argument("results", nargs="+", help="evaluate.py result JSON files")
    parser.add_argument("--output", help="also write the tables to this Markdown file")
    args = parser.parse_args(argv)
    try:
        text = results_tables(load_results(args.results), args.results)
    except DataError as err:
        parser.exit(2, f"error: {err}\n")
    if args.output:
        Path(args.output).write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
