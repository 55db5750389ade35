"""The README's results tables, made from evaluate.py's JSON files beside the papers' numbers:
python -m fewshot.reporting.results outputs/*/*/eval/*.json [--output results.md]"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewshot.errors import DataError
from fewshot.reporting.tables import SEED, Row, markdown, mean_std


@dataclass(frozen=True)
class PaperResult:
    """A test accuracy a paper reports, as printed there (percent ± 95% CI where it gives one)."""

    algorithm: str
    first_order: bool | None
    dataset: str
    way: int
    shot: int
    accuracy: str


@dataclass(frozen=True)
class Paper:
    title: str
    algorithm: str
    protocol: str  # how the paper's numbers were obtained, to read ours against
    results: tuple[PaperResult, ...]


def _maml(dataset: str, way: int, shot: int, accuracy: str, first_order: bool = False):
    return PaperResult("maml", first_order, dataset, way, shot, accuracy)


PAPERS = (
    Paper(
        "MAML (Finn, Abbeel & Levine, ICML 2017, Tables 1 and 2)",
        "maml",
        "Omniglot: 1200 training characters (`vinyals` split), rotations as classes, 28x28; "
        "transductive batch norm; Mini-ImageNet: 15 query images per class, 10 inner steps at test.",
        (
            _maml("omniglot", 5, 1, "98.7 ± 0.4"),
            _maml("omniglot", 5, 5, "99.9 ± 0.1"),
            _maml("omniglot", 20, 1, "95.8 ± 0.3"),
            _maml("omniglot", 20, 5, "98.9 ± 0.2"),
            _maml("miniimagenet", 5, 1, "48.70 ± 1.84"),
            _maml("miniimagenet", 5, 5, "63.11 ± 0.92"),
            _maml("miniimagenet", 5, 1, "48.07", first_order=True),
            _maml("miniimagenet", 5, 5, "63.15", first_order=True),
        ),
    ),
    Paper(
        "Meta-LSTM (Ravi & Larochelle, ICLR 2017, Table 1)",
        "metalstm",
        "Mini-ImageNet 64/16/20 classes, 84x84; batch norm at test with support-set statistics.",
        (
            PaperResult("metalstm", None, "miniimagenet", 5, 1, "43.44 ± 0.77"),
            PaperResult("metalstm", None, "miniimagenet", 5, 5, "60.60 ± 0.71"),
        ),
    ),
    Paper(
        "Meta-SGD (Li, Zhou, Chen & Li, arXiv 2017, Tables 1 and 2)",
        "metasgd",
        "MAML's nets and splits, one inner step, step sizes meta-learned per coordinate.",
        (
            PaperResult("metasgd", False, "omniglot", 5, 1, "99.53 ± 0.26"),
            PaperResult("metasgd", False, "omniglot", 20, 1, "95.93 ± 0.38"),
            PaperResult("metasgd", False, "miniimagenet", 5, 1, "50.47 ± 1.87"),
            PaperResult("metasgd", False, "miniimagenet", 5, 5, "64.03 ± 0.94"),
        ),
    ),
    Paper(
        "MAML++ (Antoniou, Edwards & Storkey, ICLR 2019, Tables 1 and 2)",
        "mamlpp",
        "5 inner steps, every MAML++ part on; numbers as listed for the paper (Papers with "
        "Code), without the paper's ± (not checked against its table here).",
        (
            PaperResult("mamlpp", False, "omniglot", 5, 1, "99.47"),
            PaperResult("mamlpp", False, "omniglot", 5, 5, "99.85"),
            PaperResult("mamlpp", False, "omniglot", 20, 1, "97.65"),
            PaperResult("mamlpp", False, "omniglot", 20, 5, "99.33"),
            PaperResult("mamlpp", False, "miniimagenet", 5, 1, "52.40"),
            PaperResult("mamlpp", False, "miniimagenet", 5, 5, "67.15"),
        ),
    ),
    Paper(
        "ANIL (Raghu, Raghu, Bengio & Vinyals, ICLR 2020, Table 2)",
        "anil",
        "MAML's Mini-ImageNet settings, the inner loop adapting the head alone.",
        (
            PaperResult("anil", False, "miniimagenet", 5, 1, "46.7 ± 0.4"),
            PaperResult("anil", False, "miniimagenet", 5, 5, "61.5 ± 0.5"),
        ),
    ),
)

DATASET_NAMES = {
    "omniglot": "Omniglot",
    "miniimagenet": "Mini-ImageNet",
    "tieredimagenet": "tieredImageNet",
    "cifarfs": "CIFAR-FS",
    "fc100": "FC100",
}
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


def _setting(dataset: str, way: int, shot: int, first_order: bool | None) -> str:
    name = f"{DATASET_NAMES.get(dataset, dataset)} {way}-way {shot}-shot"
    return name + (" (first order)" if first_order else "")


def _key(algorithm: str, first_order: Any, dataset: str, way: int, shot: int) -> tuple:
    return algorithm, bool(first_order), dataset, way, shot


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


def results_tables(results: Sequence[dict[str, Any]]) -> str:
    """One Markdown table per paper: every setting it reports with our results for it (one row
    per result file, "not run" where there is none), then our results for settings it lacks."""
    by_key: dict[tuple, list[Row]] = {}
    for result in sorted(
        results, key=lambda r: (r["episodes"], r.get("trained_steps") or 0, r["test/acc"])
    ):
        seed = result.get("train_seed")
        row = Row.evaluated("", {} if seed is None else {SEED: str(seed)}, [result])
        p = row.protocol
        key = _key(p["algorithm"], p.get("first_order"), p["dataset"], p["way"], p["shot"])
        by_key.setdefault(key, []).append(row)
    sections = []
    for paper in PAPERS:
        rows = []
        for reported in paper.results:
            key = _key(reported.algorithm, reported.first_order, *_dws(reported))
            paper_cell = reported.accuracy
            setting = _setting(*_dws(reported), reported.first_order)
            ours = by_key.pop(key, [])
            rows += _ours_with_seeds(ours, {"setting": setting, "paper": paper_cell})
            if not ours:
                rows.append({"setting": setting, "paper": paper_cell, "fewshot": "not run"})
        for key in [k for k in by_key if k[0] == paper.algorithm]:
            setting = _setting(key[2], key[3], key[4], key[1])
            rows += _ours_with_seeds(by_key.pop(key), {"setting": setting, "paper": "—"})
        sections.append(
            f"### {paper.title}\n\nPaper's protocol: {paper.protocol}\n\n" + markdown(COLUMNS, rows)
        )
    for key, others in by_key.items():  # algorithms no paper here reports
        setting = _setting(key[2], key[3], key[4], key[1])
        rows = _ours_with_seeds(others, {"setting": setting, "paper": "—"})
        sections.append(f"### {key[0]}\n\n" + markdown(COLUMNS, rows))
    return "\n".join(sections)


def _dws(reported: PaperResult) -> tuple[str, int, int]:
    return reported.dataset, reported.way, reported.shot


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fewshot.reporting.results", description=__doc__.splitlines()[0]
    )
    parser.add_argument("results", nargs="+", help="evaluate.py result JSON files")
    parser.add_argument("--output", help="also write the tables to this Markdown file")
    args = parser.parse_args(argv)
    try:
        text = results_tables(load_results(args.results))
    except DataError as err:
        parser.exit(2, f"error: {err}\n")
    if args.output:
        Path(args.output).write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
