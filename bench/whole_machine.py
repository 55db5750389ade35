"""fewshot as a user runs it (`python train.py`, `python evaluate.py`, threads left at their
default) beside the plain-loop reference at its best thread count, on the whole machine.

    python -m bench.speed --whole-machine --data-root <omniglot folder> [--beside-busy]
        [--rounds 4] [--steps 5 30] [--episodes 20 420]
        [--reference-iters 8] [--reference-episodes 40] [--reference-threads 1 2] [--keep]

The workload (issue #23's table): MAML on Omniglot 5-way 1-shot, 15 query images per class,
meta-batches of 8 tasks, 5 second-order inner steps at base_lr 0.4 (10 at test), transductive
batch norm, Adam at 1e-3, on the MAML paper's strided Omniglot net (bench.speed.STRIDED).

Every measurement is a fresh process, and they alternate: `--rounds` rounds of every row below,
the order reversed every other round, so that load from elsewhere falls on all of them alike.

- The reference (bench/reference.py, task by task, on synthetic episodes of the workload's
  shapes) at each thread count 1..N, N the physical cores this process may use: seconds per
  meta-iteration and per test episode (the mean over the timed steps, after two warm-ups), and
  its start-up (launch to its first step). Its best thread count, for training and for test
  apart, is the one with the lowest median over rounds.
- fewshot's default, as a user runs it: `python train.py <workload> data.root=<omniglot>
  trainer.max_steps=K` (validation, the final test and the progress bar off; `threads` not
  given) at two run lengths K1 < K2. Seconds per meta-iteration = (wall(K2) - wall(K1)) /
  (K2 - K1); start-up = the intercept, wall(K1) - K1 x that (imports, data loading, the Trainer,
  the last checkpoint). Test episodes likewise from `python evaluate.py ckpt=<a checkpoint of
  the workload> episodes=E` at E1 < E2.
- fewshot at threads=1 (one process, one thread), beside the reference at 1 thread: the ratio
  per core.

A ratio is the median over rounds of that round's reference time over fewshot's (above 1:
fewshot is faster). Before the rounds, untimed: a one-step train.py run that decodes Omniglot
into a cache made for this bench and writes the checkpoint the evaluate.py runs score, and a
default train.py run of one step. `--beside-busy` keeps a neighbour, the reference's training
loop at one thread, running through all the rounds: the ratio beside a job using one core.

Every child gets this process's environment without OMP_NUM_THREADS and MKL_NUM_THREADS (which
fewshot's default would follow), and with OMP_WAIT_POLICY as set, else PASSIVE: fewshot's own
default, given to the reference too, so that the table compares how the work is split, not
OpenMP's waits (docs/performance.md, Threads). Runs are written under a temporary folder,
removed at the end (`--keep`: kept and named), never under outputs/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The workload, for the reference and as train.py's overrides.
WAY, SHOT, QUERY, TASKS = 5, 1, 15, 8
BASE_LR, INNER_STEPS, INNER_STEPS_TEST, META_LR = 0.4, 5, 10, 1e-3
IMAGE_SIZE, IN_CHANNELS = 28, 1
NET = {"channels": 64, "padding": 1, "stride": 2, "pool": False}  # bench.speed.STRIDED's net
WORKLOAD = [
    f"way={WAY}",
    f"shot={SHOT}",
    f"query={QUERY}",
    "data=omniglot",
    f"data.image_size={IMAGE_SIZE}",
    "algo=maml",
    "algo.first_order=false",
    f"algo.meta_batch_size={TASKS}",
    f"algo.meta_lr={META_LR}",
    f"algo.base_lr={BASE_LR}",
    f"algo.inner_steps={INNER_STEPS}",
    f"algo.inner_steps_test={INNER_STEPS_TEST}",
    "algo.batch_norm_train=transductive",
    "algo.batch_norm_test=transductive",
    "backbone=conv4",
    *(f"backbone.{key}={str(value).lower()}" for key, value in NET.items()),
]
# Timed runs only train: no validation, no final test, no progress bar.
TRAIN_ONLY = [
    "++trainer.limit_val_batches=0",
    "test_after_training=false",
    "trainer.enable_progress_bar=false",
]
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

REFERENCE, DEFAULT, ONE_THREAD = "reference", "fewshot default", "fewshot threads=1"
TRAIN, TEST = "train", "test"
FLOORS = {"idle": {TRAIN: 1.6, TEST: 1.7}, "busy": {TRAIN: 1.0, TEST: 1.0}}  # issue #23


class BenchError(Exception):
    """A run that failed or settings that cannot be measured, in one line."""


def steady_state(first: tuple[int, float], second: tuple[int, float]) -> tuple[float, float]:
    """(seconds per unit, start-up seconds) of the line through two (units, wall seconds) runs."""
    (n1, w1), (n2, w2) = first, second
    if n1 == n2:
        raise ValueError(f"two run lengths are needed, got {n1} twice")
    per_unit = (w2 - w1) / (n2 - n1)
    return per_unit, w1 - n1 * per_unit


def best_threads(seconds_by_threads: dict[int, list[float]]) -> int:
    """The thread count whose median seconds over rounds is lowest (the fewer threads on a tie)."""
    return min(seconds_by_threads, key=lambda t: (statistics.median(seconds_by_threads[t]), t))


def paired_ratio(reference_seconds: Sequence[float], fewshot_seconds: Sequence[float]) -> float:
    """The median over rounds of the round's reference seconds / fewshot's: above 1, fewshot is
    faster."""
    if len(reference_seconds) != len(fewshot_seconds) or not fewshot_seconds:
        raise ValueError("one reference time per fewshot time, at least one of each")
    return statistics.median(r / f for r, f in zip(reference_seconds, fewshot_seconds))


@dataclass(frozen=True)
class Job:
    """One measured process: a reference child at `threads`, or a fewshot entry point (`kind`
    TRAIN: train.py for `count` meta-iterations; TEST: evaluate.py on `count` episodes)."""

    row: str  # REFERENCE, DEFAULT or ONE_THREAD
    kind: str = ""  # fewshot's: TRAIN or TEST
    count: int = 0
    threads: int = 0  # the reference's

    @property
    def label(self) -> str:
        if self.row == REFERENCE:
            return f"reference at {self.threads} thread(s)"
        script = "train.py trainer.max_steps" if self.kind == TRAIN else "evaluate.py episodes"
        return f"{self.row}: {script}={self.count}"


def round_jobs(
    reference_threads: Sequence[int], steps: Sequence[int], episodes: Sequence[int]
) -> list[Job]:
    """One round's processes, in the order of the even rounds (odd rounds reverse it)."""
    jobs = [Job(REFERENCE, threads=t) for t in reference_threads]
    for kind, counts in ((TRAIN, steps), (TEST, episodes)):
        jobs += [Job(row, kind, n) for row in (DEFAULT, ONE_THREAD) for n in counts]
    return jobs


def child_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Every child's environment: without thread counts, waits passive unless set otherwise."""
    env = dict(os.environ if environ is None else environ)
    for name in THREAD_VARIABLES:
        env.pop(name, None)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


@dataclass
class Bench:
    """Where this bench's runs go and what they read."""

    data_root: Path
    folder: Path  # the temporary folder of every run, the data cache and the checkpoint
    env: dict[str, str]
    serial: int = 0

    @property
    def cache(self) -> Path:
        return self.folder / "cache"

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint" / "checkpoints" / "best.ckpt"

    def new_folder(self, name: str) -> Path:
        self.serial += 1
        return self.folder / "runs" / f"{self.serial:03d}_{name}"

    def train_command(self, steps: int, threads: int | None, run_dir: Path) -> list[str]:
        """`python train.py` on the workload for `steps` meta-iterations, training only;
        threads=None leaves fewshot's default."""
        return [
            sys.executable,
            str(REPO / "train.py"),
            *WORKLOAD,
            f"data.root={self.data_root}",
            f"data.cache_dir={self.cache}",
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}",
            *TRAIN_ONLY,
            *([] if threads is None else [f"threads={threads}"]),
            f"hydra.run.dir={run_dir}",
        ]

    def checkpoint_command(self) -> list[str]:
        """One meta-iteration and a short validation, at one thread: decodes Omniglot into the
        bench's cache and writes the checkpoint evaluate.py scores (untimed)."""
        return [
            sys.executable,
            str(REPO / "train.py"),
            *WORKLOAD,
            f"data.root={self.data_root}",
            f"data.cache_dir={self.cache}",
            "trainer.max_steps=1",
            "trainer.val_check_interval=1",
            "val_episodes=4",
            "test_after_training=false",
            "trainer.enable_progress_bar=false",
            "threads=1",
            f"hydra.run.dir={self.checkpoint.parent.parent}",
        ]

    def evaluate_command(self, episodes: int, threads: int | None, run_dir: Path) -> list[str]:
        """`python evaluate.py` of the bench's checkpoint on `episodes` test episodes."""
        return [
            sys.executable,
            str(REPO / "evaluate.py"),
            f"ckpt={self.checkpoint}",
            f"episodes={episodes}",
            f"output={run_dir / 'result.json'}",
            *([] if threads is None else [f"threads={threads}"]),
            f"hydra.run.dir={run_dir}",
        ]


@dataclass
class Finished:
    """A finished process: its wall and CPU seconds (its descendants' included), the most
    processes its tree held at once (helpers, such as multiprocessing's resource tracker,
    included), and its output."""

    wall: float
    cpu: float
    processes: int
    stdout: str = field(repr=False, default="")

    @property
    def says(self) -> str | None:
        """The first line of its output about its processes or threads, if any (fewshot's
        log prefix dropped)."""
        for line in self.stdout.splitlines():
            if "process" in line.lower() or "thread" in line.lower():
                return line.rsplit("] - ", 1)[-1].strip()
        return None


def descendants(pid: int) -> int:
    """Processes in the tree under `pid`, itself included (0 once it is gone)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The parent's pid is the second field after the command, which ends with ')'.
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    if not Path(f"/proc/{pid}").exists():
        return 0
    count, todo = 0, [pid]
    while todo:
        count += 1
        todo.extend(children.get(todo.pop(), []))
    return count


def run_timed(command: list[str], env: dict[str, str], log: Path, label: str) -> Finished:
    """Run `command` from the repository root, its output into `log`; BenchError if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak, done = [0], threading.Event()
    with log.open("w") as out:
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

        def watch() -> None:  # once a second: cheap beside the measured work
            while not done.wait(1.0):
                peak[0] = max(peak[0], descendants(child.pid))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        code = child.wait()
        wall = time.perf_counter() - start
        done.set()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = log.read_text(errors="replace")
    if code != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise BenchError(f"{label} exited with {code}; the end of its output ({log}):\n{tail}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return Finished(wall, cpu, max(peak[0], 1), text)


def run_fewshot(bench: Bench, job: Job) -> Finished:
    threads = None if job.row == DEFAULT else 1
    run_dir = bench.new_folder(f"{job.kind}_{'default' if threads is None else 't1'}_{job.count}")
    if job.kind == TRAIN:
        command = bench.train_command(job.count, threads, run_dir)
    else:
        command = bench.evaluate_command(job.count, threads, run_dir)
    finished = run_timed(command, bench.env, run_dir.with_suffix(".log"), job.label)
    if job.kind == TRAIN:
        check_trained(run_dir, job)
    shutil.rmtree(run_dir, ignore_errors=True)
    return finished


def check_trained(run_dir: Path, job: Job) -> None:
    """BenchError unless the run's result.json (where it writes one) records `job.count` steps."""
    result = run_dir / "result.json"
    if result.is_file():
        step = json.loads(result.read_text()).get("step")
        if step is not None and step != job.count:
            raise BenchError(f"{job.label} stopped at step {step}, not {job.count}")


def run_reference(bench: Bench, job: Job, iters: int, episodes: int) -> dict:
    """The reference child's measurement (seconds per meta-iteration and test episode, start-up,
    cores busy) at `job.threads` threads."""
    command = [
        sys.executable,
        "-m",
        "bench.whole_machine",
        "reference-child",
        str(job.threads),
        str(iters),
        str(episodes),
        repr(time.time()),
    ]
    log = bench.new_folder(f"reference_t{job.threads}").with_suffix(".log")
    finished = run_timed(command, bench.env, log, job.label)
    lines = [line for line in finished.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"{job.label} printed no result ({log})")
    return json.loads(lines[-1])


def reference_loop(threads: int) -> tuple[Callable[[], object], Callable[[], object]]:
    """The reference's meta-iteration and test episode on the workload, on synthetic episodes."""
    import torch

    from bench import reference

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = reference.ConvNet(IN_CHANNELS, IMAGE_SIZE, WAY, **NET)
    optimizer = torch.optim.Adam(net.parameters(), lr=META_LR)

    def episodes(tasks: int) -> list:
        shape = (IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
        labels = torch.arange(WAY)
        return [
            torch.rand(tasks, WAY * SHOT, *shape),
            labels.repeat_interleave(SHOT).expand(tasks, -1),
            torch.rand(tasks, WAY * QUERY, *shape),
            labels.repeat_interleave(QUERY).expand(tasks, -1),
        ]

    train_batch, (sx, sy, qx, qy) = episodes(TASKS), (t[0] for t in episodes(1))

    def meta_iteration() -> None:
        optimizer.zero_grad()
        reference.maml_backward(net, *train_batch, BASE_LR, INNER_STEPS, first_order=False)
        optimizer.step()

    def test_episode() -> None:
        with torch.no_grad():
            logits = reference.maml_test_episode(net, sx, sy, qx, BASE_LR, INNER_STEPS_TEST)
            (logits.argmax(1) == qy).float().mean()

    return meta_iteration, test_episode


def timed(fn: Callable[[], object], count: int, warmup: int = 2) -> tuple[float, float]:
    """(mean wall seconds per call, cores busy: CPU seconds over wall) of `count` calls after
    `warmup`."""
    for _ in range(warmup):
        fn()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall / count, cpu / wall


def reference_child(threads: int, iters: int, episodes: int, launched: float) -> dict:
    """Measure the reference in this process; start-up runs from `launched` (the parent's
    time.time() at launch) to the first step."""
    meta_iteration, test_episode = reference_loop(threads)
    startup = time.time() - launched
    import torch

    s_train, busy_train = timed(meta_iteration, iters)
    s_test, busy_test = timed(test_episode, episodes)
    return {
        "threads": torch.get_num_threads(),
        "s_train": s_train,
        "s_test": s_test,
        "startup": startup,
        "busy_train": busy_train,
        "busy_test": busy_test,
        "wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
    }


def neighbour_child() -> None:
    """The busy neighbour: the reference's training loop at one thread until terminated, one
    line per meta-iteration (its seconds) so that the parent can tell it kept busy."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    meta_iteration, _ = reference_loop(1)
    print("ready", flush=True)
    while True:
        start = time.perf_counter()
        meta_iteration()
        print(f"{time.perf_counter() - start:.4f}", flush=True)


def seconds_listed(text: str) -> list[float]:
    """The numbers among `text`'s lines (the neighbour's seconds per meta-iteration)."""
    seconds = []
    for line in text.splitlines():
        try:
            seconds.append(float(line))
        except ValueError:
            continue
    return seconds


class Neighbour:
    """A process keeping one core busy while the rounds run (`--beside-busy`)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log, self.started = log, time.perf_counter()
        env = {**env, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "bench.whole_machine", "neighbour-child"]
        with log.open("w") as out:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        while "ready" not in log.read_text():  # busy from here on
            if self.process.poll() is not None:
                raise BenchError(
                    f"the busy neighbour exited with {self.process.returncode} ({log})"
                )
            time.sleep(0.2)
        self.started = time.perf_counter()

    def stop(self) -> str:
        """Stop it; what it did, in words."""
        seconds = time.perf_counter() - self.started
        self.process.terminate()
        self.process.wait()
        steps = seconds_listed(self.log.read_text())
        if not steps:
            return f"the busy neighbour finished no meta-iteration in {seconds:.0f} s"
        return (
            f"the busy neighbour (the reference's training loop, 1 thread) ran {len(steps)} "
            f"meta-iterations in {seconds:.0f} s ({statistics.median(steps):.2f} s each, median)"
        )


@dataclass
class Results:
    """Per round: the reference's dict by thread count; fewshot's Finished by (row, kind, count)."""

    reference: dict[int, list[dict]] = field(default_factory=dict)
    fewshot: dict[tuple[str, str, int], list[Finished]] = field(default_factory=dict)

    def as_json(self) -> dict:
        """Every round's raw measurements."""
        return {
            "reference": {str(t): rounds for t, rounds in self.reference.items()},
            "fewshot": [
                {
                    "row": row,
                    "kind": kind,
                    "count": count,
                    "rounds": [
                        {"wall": f.wall, "cpu": f.cpu, "processes": f.processes} for f in runs
                    ],
                }
                for (row, kind, count), runs in self.fewshot.items()
            ],
        }

    def add(self, job: Job, result: dict | Finished) -> None:
        if job.row == REFERENCE:
            self.reference.setdefault(job.threads, []).append(result)
        else:
            self.fewshot.setdefault((job.row, job.kind, job.count), []).append(result)

    def fewshot_rounds(self, row: str, kind: str, counts: Sequence[int]) -> list[dict]:
        """Per round: seconds per unit, start-up, and cores busy in the steady state."""
        n1, n2 = counts
        rounds = []
        for short, long in zip(self.fewshot[row, kind, n1], self.fewshot[row, kind, n2]):
            per_unit, startup = steady_state((n1, short.wall), (n2, long.wall))
            steady = long.wall - short.wall
            busy = (long.cpu - short.cpu) / steady if steady > 0 else None
            rounds.append(
                {
                    "s": per_unit,
                    "startup": startup,
                    "busy": busy,
                    "processes": long.processes,
                    "says": long.says,
                }
            )
        return rounds


def measure(args: argparse.Namespace, bench: Bench, say: Callable[[str], None]) -> Results:
    """Every round's measurements, the jobs alternating."""
    jobs, results = round_jobs(args.reference_threads, args.steps, args.episodes), Results()
    for index in range(args.rounds):
        started = time.perf_counter()
        for job in jobs if index % 2 == 0 else jobs[::-1]:
            if job.row == REFERENCE:
                result = run_reference(bench, job, args.reference_iters, args.reference_episodes)
                done = f"{result['s_train']:.3f} s/iter, {result['s_test']:.4f} s/episode"
            else:
                result = run_fewshot(bench, job)
                done = f"{result.wall:.1f} s wall, {result.cpu / result.wall:.2f} cores busy"
            results.add(job, result)
            say(f"  round {index + 1}/{args.rounds}  {job.label}: {done}")
        elapsed = time.perf_counter() - started
        if index == 0 and args.rounds > 1:
            left = elapsed * (args.rounds - 1) / 60
            say(f"  (round 1 took {elapsed:.0f} s: about {left:.0f} min to go)")
    return results


@dataclass
class Row:
    """One row of the table: per round, seconds per meta-iteration and per test episode,
    start-ups, cores busy; and its processes and threads, in words."""

    name: str
    s_train: list[float]
    s_test: list[float]
    startup_train: list[float]
    startup_test: list[float] | None  # None: no start-up of its own (the reference's process)
    busy_train: list[float]
    busy_test: list[float]
    setting: str


def reference_row(name: str, results: Results, t_train: int, t_test: int) -> Row:
    train, test = results.reference[t_train], results.reference[t_test]
    threads = {t_train: train[0]["threads"], t_test: test[0]["threads"]}
    return Row(
        name,
        [r["s_train"] for r in train],
        [r["s_test"] for r in test],
        [r["startup"] for r in train],
        None,
        [r["busy_train"] for r in train],
        [r["busy_test"] for r in test],
        f"one process, torch threads {' / '.join(str(t) for t in threads.values())}, "
        f"OMP_WAIT_POLICY={train[0]['wait_policy']}",
    )


def fewshot_row(name: str, results: Results, args: argparse.Namespace) -> Row:
    train = results.fewshot_rounds(name, TRAIN, args.steps)
    test = results.fewshot_rounds(name, TEST, args.episodes)
    given = "threads not given (fewshot's default)" if name == DEFAULT else "threads=1"
    logs = [
        f"{script} says: {says[0]}"
        for script, rounds in (("train.py", train), ("evaluate.py", test))
        if (says := [r["says"] for r in rounds if r["says"]])
    ]
    return Row(
        name,
        [r["s"] for r in train],
        [r["s"] for r in test],
        [r["startup"] for r in train],
        [r["startup"] for r in test],
        [r["busy"] for r in train],
        [r["busy"] for r in test],
        "; ".join(
            [
                given,
                f"processes at once, train / test: {max(r['processes'] for r in train)} / "
                f"{max(r['processes'] for r in test)}",
                *logs,
            ]
        ),
    )


def rows_of(results: Results, args: argparse.Namespace) -> list[Row]:
    """Reference at its best thread counts (training's and test's), at 1 thread, fewshot's
    default and fewshot at threads=1."""
    ref = results.reference
    best_train = best_threads({t: [r["s_train"] for r in rounds] for t, rounds in ref.items()})
    best_test = best_threads({t: [r["s_test"] for r in rounds] for t, rounds in ref.items()})
    threads = str(best_train) if best_train == best_test else f"{best_train} / {best_test}"
    rows = [reference_row(f"reference, best ({threads} thr.)", results, best_train, best_test)]
    if 1 in ref:
        rows.append(reference_row("reference, 1 thread", results, 1, 1))
    return rows + [fewshot_row(DEFAULT, results, args), fewshot_row(ONE_THREAD, results, args)]


def cell(values: list[float] | None, width: int, digits: int, rate: bool = False) -> str:
    """The median over rounds (its reciprocal with `rate`); n/a where it is not positive: run
    lengths too close to tell the steady state from the noise."""
    if values is None:
        return f"{'-':>{width}}"
    if None in values:
        return f"{'n/a':>{width}}"
    value = statistics.median(values)
    if rate:
        return f"{1 / value:{width}.{digits}f}" if value > 0 else f"{'n/a':>{width}}"
    return f"{value:{width}.{digits}f}"


def ratio_text(reference: list[float], fewshot: list[float]) -> str:
    """The paired ratio and its range over rounds; n/a where a time is not positive."""
    if min(*reference, *fewshot) <= 0:
        return "  n/a (a steady state below zero: longer runs needed, --steps / --episodes)"
    pairs = [r / f for r, f in zip(reference, fewshot)]
    return f"{paired_ratio(reference, fewshot):5.2f}x (rounds {min(pairs):.2f}-{max(pairs):.2f})"


def report(results: Results, args: argparse.Namespace, busy: bool) -> list[str]:
    """The table, the ratios against the issue's floors, and each row's processes and threads."""
    rows = rows_of(results, args)
    best, *_, default, one_thread = rows
    lines = [
        f"{'':30} {'s/meta-iter':>11} {'test ep/s':>9} {'start-up s: train':>17} {'test':>5}"
        f"  {'cores busy: train':>17} {'test':>5}"
    ]
    for row in rows:
        lines.append(
            f"{row.name:30} {cell(row.s_train, 11, 3)} {cell(row.s_test, 9, 1, rate=True)} "
            f"{cell(row.startup_train, 17, 1)} {cell(row.startup_test, 5, 1)}  "
            f"{cell(row.busy_train, 17, 2)} {cell(row.busy_test, 5, 2)}"
        )
    floors = FLOORS["busy" if busy else "idle"]
    where = "beside a busy neighbour" if busy else "idle 2-core machine"
    lines.append("ratios: the median over rounds of the round's reference seconds / fewshot's")
    for kind, ref_s, ours_s in (
        (TRAIN, best.s_train, default.s_train),
        (TEST, best.s_test, default.s_test),
    ):
        text = ratio_text(ref_s, ours_s)
        if "n/a" not in text:
            met = paired_ratio(ref_s, ours_s) >= floors[kind]
            text += f"  floor {floors[kind]}x ({where}): {'met' if met else 'NOT met'}"
        lines.append(f"  {kind + ', fewshot default / reference best':44} {text}")
    if rows[1].name == "reference, 1 thread":
        for kind, ref_s, ours_s in (
            (TRAIN, rows[1].s_train, one_thread.s_train),
            (TEST, rows[1].s_test, one_thread.s_test),
        ):
            label = f"{kind} per core, threads=1 / reference at 1"
            lines.append(f"  {label:44} {ratio_text(ref_s, ours_s)}")
    lines.append("processes and threads:")
    lines += [f"  {row.name:30} {row.setting}" for row in rows]
    return lines


def omniglot_parser(mode: str, doc: str) -> argparse.ArgumentParser:
    """The parser of a mode of `python -m bench.speed` that runs train.py on Omniglot: its
    description (the first paragraph of `doc`) and --data-root."""
    p = argparse.ArgumentParser(
        prog=f"python -m bench.speed {mode}", description=doc.split("\n\n")[0].replace("\n", " ")
    )
    p.add_argument(
        "--data-root",
        type=Path,
        required=True,
        help="the folder holding Omniglot's images_background and images_evaluation (zips or "
        "folders), as train.py's data.root",
    )
    return p


def parser(cores: int) -> argparse.ArgumentParser:
    p = omniglot_parser("--whole-machine", __doc__)
    p.add_argument(
        "--rounds", type=int, default=4, help="alternations of every row (default: %(default)s)"
    )
    p.add_argument(
        "--steps",
        type=int,
        nargs=2,
        default=[5, 30],
        metavar=("K1", "K2"),
        help="train.py's two run lengths in meta-iterations (default: %(default)s)",
    )
    p.add_argument(
        "--episodes",
        type=int,
        nargs=2,
        default=[20, 420],
        metavar=("E1", "E2"),
        help="evaluate.py's two episode counts (default: %(default)s)",
    )
    p.add_argument(
        "--reference-iters",
        type=int,
        default=8,
        help="the reference's timed meta-iterations per child, after two warm-ups "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--reference-episodes",
        type=int,
        default=40,
        help="the reference's timed test episodes per child, after two warm-ups "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--reference-threads",
        type=int,
        nargs="+",
        default=list(range(1, cores + 1)),
        help="the reference's thread counts (default: 1 to the physical cores, %(default)s)",
    )
    p.add_argument(
        "--beside-busy",
        action="store_true",
        help="keep a neighbour (the reference's training loop, one thread) busy throughout",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary folder of the runs")
    p.add_argument(
        "--json", type=Path, help="also write every round's raw measurements to this JSON file"
    )
    return p


def parse(argv: Sequence[str], cores: int) -> argparse.Namespace:
    """The arguments, checked; argparse's error (SystemExit 2) naming the first bad one."""
    p = parser(cores)
    args = p.parse_args(argv)
    for name, (a, b) in (("--steps", args.steps), ("--episodes", args.episodes)):
        if not 1 <= a < b:
            p.error(f"{name} {a} {b}: two counts, 1 <= the first < the second")
    if args.episodes[0] < 2:
        p.error("--episodes: evaluate.py needs at least 2 episodes (a confidence interval)")
    for name in ("rounds", "reference_iters", "reference_episodes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.reference_threads) < 1:
        p.error("--reference-threads: thread counts are at least 1")
    args.reference_threads = sorted(set(args.reference_threads))
    args.data_root = omniglot_root(p, args.data_root)
    return args


def omniglot_root(p: argparse.ArgumentParser, root: Path) -> Path:
    """`root` resolved, or argparse's error unless it holds Omniglot's two parts (so that no run
    of the bench downloads them)."""
    resolved = root.expanduser().resolve()
    missing = [
        name
        for name in ("images_background", "images_evaluation")
        if not (resolved / f"{name}.zip").is_file() and not (resolved / name).is_dir()
    ]
    if missing:
        p.error(
            f"--data-root {root}: no {' or '.join(missing)} (.zip or folder) there; "
            "give the folder holding Omniglot's two zips"
        )
    return resolved


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "reference-child":
        threads, iters, episodes, launched = argv[1:5]
        result = reference_child(int(threads), int(iters), int(episodes), float(launched))
        print(json.dumps(result), flush=True)
        return
    if argv and argv[0] == "neighbour-child":
        neighbour_child()
        return
    import torch

    from fewshot.training.threads import physical_cores

    cores = physical_cores()
    args = parse(argv, cores)
    try:
        sitting(args, cores, torch.__version__)
    except BenchError as err:
        sys.exit(f"error: {err}")


def sitting(args: argparse.Namespace, cores: int, torch_version: str) -> None:
    """Warm up, run the rounds (beside a busy neighbour with --beside-busy), print the report."""

    from bench.speed import cpu_name

    def say(line: str) -> None:
        print(line, flush=True)

    unset = [f"{name}={os.environ[name]}" for name in THREAD_VARIABLES if name in os.environ]
    env = child_environment()
    folder = Path(tempfile.mkdtemp(prefix="fewshot-bench-"))
    bench = Bench(args.data_root, folder, env)
    say(
        f"{cpu_name()}, {cores} physical core(s) ({len(os.sched_getaffinity(0))} CPUs), "
        f"torch {torch_version}, Python {platform.python_version()}"
    )
    say(
        f"workload: MAML Omniglot {WAY}-way {SHOT}-shot, {QUERY} query, {TASKS} tasks, "
        f"{INNER_STEPS} second-order steps at base_lr {BASE_LR} ({INNER_STEPS_TEST} at test), "
        f"Conv4 {NET}"
    )
    say(
        f"{args.rounds} rounds; reference at {args.reference_threads} thread(s), "
        f"{args.reference_iters} meta-iterations and {args.reference_episodes} test episodes a "
        f"child; fewshot: train.py at {args.steps} meta-iterations, evaluate.py at "
        f"{args.episodes} episodes"
    )
    say(
        f"children's environment: OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}"
        + (f"; removed {', '.join(unset)}" if unset else "")
        + f"; runs under {folder}"
    )
    neighbour = None
    try:
        say("warm-up (untimed): decoding Omniglot, the checkpoint to score, a default run")
        run_timed(bench.checkpoint_command(), env, folder / "checkpoint.log", "the warm-up run")
        if not bench.checkpoint.is_file():
            raise BenchError(f"the warm-up run wrote no {bench.checkpoint}")
        warm = bench.new_folder("warmup_default")
        run_timed(bench.train_command(1, None, warm), env, warm.with_suffix(".log"), "warm-up")
        if args.beside_busy:
            neighbour = Neighbour(env, folder / "neighbour.log")
            say("a busy neighbour is running (the reference's training loop, 1 thread)")
        results = measure(args, bench, say)
        busy_line = neighbour.stop() if neighbour else None
        neighbour = None
        say("")
        for line in report(results, args, busy=args.beside_busy):
            say(line)
        if args.json:
            raw = {"argv": sys.argv, "cpu": cpu_name(), "cores": cores, "torch": torch_version}
            args.json.write_text(json.dumps({**raw, **results.as_json()}, indent=1) + "\n")
            say(f"raw measurements: {args.json}")
        if busy_line:
            say(busy_line)
        say(
            "s/meta-iteration and test episodes/s are steady state: fewshot's from two run "
            "lengths (start-up: the intercept), the reference's timed in its process after two "
            "warm-ups (start-up: launch to its first step)"
        )
        if cores != 2:
            say(f"(issue #23's floors are for a 2-core machine; this one has {cores} cores)")
    finally:
        if neighbour:
            neighbour.stop()
        if args.keep:
            say(f"runs kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
