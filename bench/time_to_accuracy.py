"""Accuracy in a wall-clock budget: fewshot's quick start (`python train.py experiment=quickstart`,
threads at their default) beside the plain-loop reference's MAML with the paper's settings, on
the whole machine, one after the other, both scored on the same fixed test episodes.

    python -m bench.speed --time-to-accuracy --data-root <omniglot folder> [--budgets 2 5 10]
        [--episodes 600] [--reference-threads N] [--fewshot-override KEY=VALUE ...] [--keep]

For each budget (minutes of training; the order of the two alternates from budget to budget):

- fewshot: `python train.py experiment=quickstart data.root=<omniglot> trainer.max_steps=<large>
  ++trainer.max_time=<budget>` (Lightning's Timer, from the start of training: set-up is outside
  the budget, validation inside), whatever conf/experiment/quickstart.yaml says at run time but
  its step count, so that the budget is what stops it; then `python evaluate.py
  ckpt=<run>/checkpoints/best.ckpt episodes=<episodes>`, the checkpoint its validation chose.
- the reference (bench/reference.py, one process at `--reference-threads` torch threads, the
  physical cores by default): second-order MAML as Finn et al. (ICML 2017) train Omniglot 5-way
  (Adam at 1e-3, 32 tasks a meta-batch, base_lr 0.4, 1 inner step, 3 at test) on the strided
  Omniglot net of bench.speed.STRIDED, on tasks it draws itself from the quick start's
  meta-training classes, until the budget is spent (checked after each meta-iteration, as
  Lightning's Timer does); then its final weights score the episodes in a loop of its own.

Both are scored on the first `--episodes` of fewshot.data.episodes.FixedEpisodes over the
quick start's meta-test classes with seed 0: the episodes evaluate.py scores. Accuracy is the
mean over episodes +- 1.96 std / sqrt(n). Children's environment: as bench/whole_machine.py's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.whole_machine import (
    NET,
    REPO,
    BenchError,
    child_environment,
    omniglot_parser,
    omniglot_root,
    run_timed,
)

# The reference's settings: Finn, Abbeel & Levine, ICML 2017, Section 5.2 and Appendix A.1
# (Omniglot 5-way; second order).
PAPER = {
    "meta_lr": 1e-3,
    "tasks": 32,
    "base_lr": 0.4,
    "inner_steps": 1,
    "inner_steps_test": 3,
}
MANY_STEPS = 10**7  # the quick start's step count, raised so that its budget stops it
SEED = 0  # evaluate.py's episode seed


def max_time(minutes: float) -> str:
    """Lightning's `max_time` ("DD:HH:MM:SS") for a budget in minutes, to the second."""
    seconds = round(minutes * 60)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    return f"{days:02d}:{hours:02d}:{seconds // 60:02d}:{seconds % 60:02d}"


def quickstart_overrides(data_root: Path, cache: Path) -> list[str]:
    return ["experiment=quickstart", f"data.root={data_root}", f"data.cache_dir={cache}"]


def train_command(
    overrides: Sequence[str], minutes: float, run_dir: Path, extra: Sequence[str]
) -> list[str]:
    """train.py with `overrides` (an experiment's) for `minutes` of training, without its final
    test (scored apart)."""
    return [
        sys.executable,
        str(REPO / "train.py"),
        *overrides,
        f"trainer.max_steps={MANY_STEPS}",
        f"++trainer.max_time={max_time(minutes)}",
        "test_after_training=false",
        "trainer.enable_progress_bar=false",
        *extra,
        f"hydra.run.dir={run_dir}",
    ]


def evaluate_command(ckpt: Path, episodes: int, output: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable,
        str(REPO / "evaluate.py"),
        f"ckpt={ckpt}",
        f"episodes={episodes}",
        f"seed={SEED}",
        f"output={output}",
        f"hydra.run.dir={run_dir}",
    ]


def run_fewshot(
    args: argparse.Namespace, folder: Path, minutes: float, env: dict[str, str], name: str
) -> dict:
    """The quick start trained for `minutes` and scored: accuracy, CI, steps, best val/acc."""
    run_dir = folder / f"{name}_fewshot"
    overrides = quickstart_overrides(args.data_root, folder / "cache")
    command = train_command(overrides, minutes, run_dir, args.fewshot_override)
    trained = run_timed(command, env, folder / f"{name}_fewshot.log", f"fewshot at {minutes} min")
    outcome = json.loads((run_dir / "result.json").read_text())
    best = run_dir / "checkpoints" / "best.ckpt"
    result = {"steps": outcome.get("step"), "val_acc": outcome.get("val/acc"), "wall": trained.wall}
    if not best.is_file():  # it never validated within the budget
        return {**result, "acc": None, "ci": None}
    output = folder / f"{name}_fewshot_test.json"
    command = evaluate_command(best, args.episodes, output, folder / f"{name}_evaluate")
    run_timed(command, env, folder / f"{name}_evaluate.log", f"scoring fewshot at {minutes} min")
    scored = json.loads(output.read_text())
    return {**result, "acc": scored["test/acc"], "ci": scored["test/acc_ci95"]}


def run_reference(
    args: argparse.Namespace, folder: Path, minutes: float, env: dict[str, str], name: str
) -> dict:
    spec = {
        "data_root": str(args.data_root),
        "cache": str(folder / "cache"),
        "seconds": minutes * 60,
        "threads": args.reference_threads,
        "episodes": args.episodes,
    }
    command = [sys.executable, "-m", "bench.time_to_accuracy", "reference-child", json.dumps(spec)]
    log = folder / f"{name}_reference.log"
    finished = run_timed(command, env, log, f"the reference at {minutes} min")
    lines = [line for line in finished.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"the reference at {minutes} min printed no result ({log})")
    return {**json.loads(lines[-1]), "wall": finished.wall}


def reference_child(spec: dict) -> dict:
    """Train the reference for `spec["seconds"]` on the quick start's meta-training classes and
    score its final weights on the fixed test episodes."""
    import torch
    from hydra import compose, initialize_config_dir

    from bench import reference
    from fewshot.data.datamodule import load_splits
    from fewshot.data.episodes import FixedEpisodes
    from fewshot.evaluation.protocol import mean_ci95

    torch.set_num_threads(spec["threads"])
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", quickstart_overrides(spec["data_root"], spec["cache"]))
    way, shot, query = cfg.way, cfg.shot, cfg.query
    splits = load_splits(cfg.data)
    images = splits["train"].images  # uint8 [classes, per_class, C, H, W]
    torch.manual_seed(0)
    net = reference.ConvNet(images.shape[2], images.shape[3], way, **NET)
    optimizer = torch.optim.Adam(net.parameters(), lr=PAPER["meta_lr"])
    generator = torch.Generator().manual_seed(0)

    def task() -> list:
        """One task's support x, y and query x, y, drawn from the meta-training classes."""
        classes = torch.randperm(images.shape[0], generator=generator)[:way]
        order = torch.rand(way, images.shape[1], generator=generator).argsort(1)[:, : shot + query]
        x = images[classes[:, None], order].float() / 255.0  # [way, shot+query, C, H, W]
        labels = torch.arange(way)
        return [
            x[:, :shot].flatten(0, 1),
            labels.repeat_interleave(shot),
            x[:, shot:].flatten(0, 1),
            labels.repeat_interleave(query),
        ]

    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < spec["seconds"]:
        batch = [torch.stack(field) for field in zip(*(task() for _ in range(PAPER["tasks"])))]
        optimizer.zero_grad()
        reference.maml_backward(net, *batch, PAPER["base_lr"], PAPER["inner_steps"], False)
        optimizer.step()
        steps += 1
    trained = time.perf_counter() - start
    episodes = FixedEpisodes(splits["test"], "test", way, shot, query, spec["episodes"], SEED)
    accuracies = []
    for index in range(len(episodes)):
        sx, sy, qx, qy = episodes[index]
        logits = reference.maml_test_episode(
            net, sx / 255.0, sy, qx / 255.0, PAPER["base_lr"], PAPER["inner_steps_test"]
        )
        accuracies.append((logits.argmax(1) == qy).float().mean().item())
    acc, ci = mean_ci95(torch.tensor(accuracies))  # evaluate.py's own
    return {
        "acc": acc,
        "ci": ci,
        "steps": steps,
        "trained_s": trained,
        "threads": torch.get_num_threads(),
    }


def cell(result: dict) -> str:
    if result["acc"] is None:
        return f"no validation in the budget ({result['steps']} steps)"
    return f"{100 * result['acc']:5.2f} +- {100 * result['ci']:.2f}% ({result['steps']} steps)"


def report(results: dict[float, dict[str, dict]], episodes: int) -> list[str]:
    """budget x {fewshot quick start, reference}: accuracy +- CI and the steps it trained."""
    lines = [f"{'budget':>9}  {'fewshot quick start':36} reference, the paper's MAML"]
    for minutes, pair in results.items():
        budget = f"{minutes:g} min"
        lines.append(f"{budget:>9}  {cell(pair['fewshot']):36} {cell(pair['reference'])}")
    lines.append(
        f"accuracy on the first {episodes} fixed test episodes (seed {SEED}) of the quick "
        "start's meta-test classes, mean +- 95% CI; steps: meta-iterations in the budget"
    )
    return lines


def parse(argv: Sequence[str], cores: int) -> argparse.Namespace:
    p = omniglot_parser("--time-to-accuracy", __doc__)
    p.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=[2.0, 5.0, 10.0],
        help="minutes of training, each (default: %(default)s)",
    )
    p.add_argument(
        "--episodes", type=int, default=600, help="test episodes scored (default: %(default)s)"
    )
    p.add_argument(
        "--reference-threads",
        type=int,
        default=cores,
        help="the reference's torch threads (default: the physical cores, %(default)s)",
    )
    p.add_argument(
        "--fewshot-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a train.py override added to the quick start's (repeatable), e.g. "
        "trainer.val_check_interval=20 where a short budget would end before validating",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary folder of the runs")
    args = p.parse_args(argv)
    if min(args.budgets) <= 0:
        p.error("--budgets: minutes above 0")
    if args.episodes < 2:
        p.error("--episodes: at least 2 (a confidence interval)")
    if args.reference_threads < 1:
        p.error("--reference-threads: at least 1")
    args.data_root = omniglot_root(p, args.data_root)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "reference-child":
        print(json.dumps(reference_child(json.loads(argv[1]))), flush=True)
        return
    import torch

    from bench.speed import cpu_name
    from fewshot.training.threads import physical_cores

    cores = physical_cores()
    args = parse(argv, cores)
    env = child_environment()
    folder = Path(tempfile.mkdtemp(prefix="fewshot-bench-"))
    print(
        f"{cpu_name()}, {cores} physical core(s), torch {torch.__version__}; budgets "
        f"{args.budgets} min; the reference at {args.reference_threads} thread(s), fewshot at its "
        f"default threads; OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}; runs under {folder}",
        flush=True,
    )
    results: dict[float, dict[str, dict]] = {}
    try:
        for index, minutes in enumerate(args.budgets):
            order = ["fewshot", "reference"] if index % 2 == 0 else ["reference", "fewshot"]
            results[minutes] = {}
            for who in order:
                run = run_fewshot if who == "fewshot" else run_reference
                result = run(args, folder, minutes, env, f"{index:02d}_{minutes:g}min")
                results[minutes][who] = result
                print(f"  {minutes:g} min, {who}: {cell(result)}", flush=True)
    except BenchError as err:
        sys.exit(f"error: {err}")
    finally:
        if args.keep:
            print(f"runs kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    print()
    for line in report(results, args.episodes):
        print(line)


if __name__ == "__main__":
    main()
