"""Two methods in the same wall-clock budget, paired on the same test episodes: the quick start
(MAML++, `experiment=quickstart`) and ProtoNet (`experiment=protonet_omniglot_5w1s`, the paper's
60-way training episodes), each trained on the whole machine for the budget, one after the other,
then scored together by `python evaluate.py "ckpt=[<quick start>,<protonet>]"`: the unpaired
accuracies, and the paired difference with its 95% CI and the episodes each won.

    python -m bench.speed --paired-budget --data-root <omniglot folder> [--minutes 10]
        [--episodes 600] [--val-every 200] [--val-episodes 100] [--keep]

Each run is `python train.py experiment=<its preset> data.root=<omniglot>
trainer.max_steps=<large> ++trainer.max_time=<budget>` (Lightning's Timer: set-up outside the
budget, validation inside), validated every `--val-every` meta-iterations on `--val-episodes`
episodes, both alike; evaluate.py scores each run's best checkpoint (its validation's choice)
on the first `--episodes` fixed test episodes of seed 0. The quick start's step count is raised
so that the budget stops it (its cosine schedule then barely anneals, as in
bench/time_to_accuracy.py); ProtoNet's meta-batch is one 60-way episode per process, the preset's
one per update on each core. Children's environment: as bench/whole_machine.py's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.time_to_accuracy import SEED, quickstart_overrides, train_command
from bench.whole_machine import (
    REPO,
    BenchError,
    child_environment,
    omniglot_parser,
    omniglot_root,
    run_timed,
)


def contenders(data_root: Path, cache: Path, processes: int) -> dict[str, list[str]]:
    """Each method's train.py overrides, by the name its row carries."""
    return {
        "quickstart": quickstart_overrides(data_root, cache),
        "protonet": [
            "experiment=protonet_omniglot_5w1s",
            f"data.root={data_root}",
            f"data.cache_dir={cache}",
            f"algo.meta_batch_size={processes}",  # one episode per process: the whole machine
        ],
    }


def budget_overrides(val_every: int, val_episodes: int) -> list[str]:
    """What both runs share beside their presets: the same validation, no progress bar."""
    return [
        f"trainer.val_check_interval={val_every}",
        f"val_episodes={val_episodes}",
        "trainer.enable_progress_bar=false",
    ]


def paired_command(ckpts: Sequence[Path], episodes: int, table: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable,
        str(REPO / "evaluate.py"),
        f"ckpt=[{','.join(str(c) for c in ckpts)}]",
        f"episodes={episodes}",
        f"seed={SEED}",
        f"output={table}",
        f"hydra.run.dir={run_dir}",
    ]


def train(
    name: str, overrides: list[str], args: argparse.Namespace, folder: Path, env: dict[str, str]
) -> tuple[Path, str]:
    """Train one contender for the budget: its best checkpoint and a line of what it did."""
    run_dir = folder / name
    extra = budget_overrides(args.val_every, args.val_episodes)
    command = train_command(overrides, args.minutes, run_dir, extra)
    trained = run_timed(command, env, folder / f"{name}.log", f"{name} for {args.minutes:g} min")
    outcome = json.loads((run_dir / "result.json").read_text())
    best = run_dir / "checkpoints" / "best.ckpt"
    if not best.is_file():
        raise BenchError(
            f"{name} never validated in {args.minutes:g} min ({outcome.get('step')} steps): "
            "lower --val-every"
        )
    line = (
        f"{name}: {outcome.get('step')} meta-iterations in {trained.wall:.0f} s wall, best "
        f"val/acc {100 * outcome['val/acc']:.2f}%"
    )
    return best, line


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = omniglot_parser("--paired-budget", __doc__)
    p.add_argument("--minutes", type=float, default=10.0, help="each run's budget (%(default)s)")
    p.add_argument("--episodes", type=int, default=600, help="test episodes (%(default)s)")
    p.add_argument(
        "--val-every",
        type=int,
        default=200,
        help="meta-iterations between validations (%(default)s)",
    )
    p.add_argument(
        "--val-episodes", type=int, default=100, help="episodes a validation scores (%(default)s)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary folder of the runs")
    args = p.parse_args(argv)
    if args.minutes <= 0:
        p.error("--minutes: above 0")
    if args.episodes < 2:
        p.error("--episodes: at least 2 (a confidence interval)")
    if args.val_every < 1 or args.val_episodes < 1:
        p.error("--val-every and --val-episodes: at least 1")
    args.data_root = omniglot_root(p, args.data_root)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    import torch

    from bench.speed import cpu_name
    from fewshot.training.threads import usable_cores

    args = parse(list(sys.argv[1:] if argv is None else argv))
    env = child_environment()
    folder = Path(tempfile.mkdtemp(prefix="fewshot-bench-"))
    processes = usable_cores()
    print(
        f"{cpu_name()}, {processes} usable core(s), torch {torch.__version__}; "
        f"{args.minutes:g} min each at the default threads; runs under {folder}",
        flush=True,
    )
    try:
        bests, lines = [], []
        for name, overrides in contenders(args.data_root, folder / "cache", processes).items():
            best, line = train(name, overrides, args, folder, env)
            bests.append(best)
            lines.append(line)
            print(f"  {line}", flush=True)
        table = folder / "paired.md"
        command = paired_command(bests, args.episodes, table, folder / "evaluate")
        run_timed(command, env, folder / "evaluate.log", "scoring both")
    except BenchError as err:
        sys.exit(f"error: {err}")
    finally:
        if args.keep:
            print(f"runs kept in {folder}")
    print()
    print(table.read_text())
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
