"""Speed and memory of fewshot's meta-learning workloads beside a plain implementation, measured
in the same run.

    OMP_NUM_THREADS=1 python -m bench.speed [--threads 1] [--iters 3] [--rounds 3]
        [--only maml_omniglot_5w1s] [--batching loop vmap]   # default: every TASK_BATCHING
        [--compile] [--bf16]    # also every row with algo.compile / under bfloat16 autocast
        [--device cuda]         # default cpu
        [--memory-steps 1 5 10 20] [--memory-only]

    python -m bench.speed --whole-machine --data-root <omniglot> [--beside-busy]
        # train.py and evaluate.py at their default threads beside the reference's best
        # (bench/whole_machine.py; its options: --whole-machine -h)
    python -m bench.speed --time-to-accuracy --data-root <omniglot> [--budgets 2 5 10]
        # the quick start and the reference's MAML given the same minutes, scored alike
        # (bench/time_to_accuracy.py)
    python -m bench.speed --paired-budget --data-root <omniglot> [--minutes 10]
        # the quick start and ProtoNet given the same minutes, paired on the same episodes
        # (bench/paired_budget.py)

`python -m bench.speed` (from the repository root) and `python bench/speed.py` both import this
checkout's bench and fewshot: run as a script, it puts the repository root first on sys.path,
ahead of any installed fewshot.

Each workload (synthetic inputs of the paper's shapes) is run by its reference
(bench/reference.py: the same mathematics written the usual way, task by task) and by fewshot
with each task batching of fewshot.methods.TASK_BATCHING. Every measurement is a fresh child
process (so its peak memory is its own), and the children alternate: `--rounds` rounds of
reference, then fewshot in each batching, the order reversed every other round, so that load from
other processes falls on all of them alike. A child times `--iters` meta-iterations and test
episodes (after two of each as warm-up) and reports their medians and its peak memory. The ratio
printed for a batching is the median over rounds of (that round's reference time / its time):
above 1, fewshot is faster. Peak memory is the median over rounds of the child's peak RSS on CPU
(so it includes the interpreter and torch), of torch.cuda.max_memory_allocated on CUDA.

On CUDA every timing is bracketed by torch.cuda.synchronize, and the utilisation is the device's
busy time in one more meta-iteration (test episode), run under torch.profiler (the union of its
kernels' and copies' intervals on the device), over the median wall time of the unprofiled ones.

Then second-order MAML's peak memory by inner steps, with and without algo.checkpoint_inner, and
its cost in time (fewshot's loop only; `--memory-only`: this report alone).
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: bench/ is on sys.path, the repository root is not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import importlib
import multiprocessing as mp
import platform
import queue
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.autograd import DeviceType

from bench import reference
from fewshot.checkpoints.format import group_option
from fewshot.config import backbone_config, check_exclusive, learner_from
from fewshot.data.episodes import Episodes
from fewshot.errors import ConfigError
from fewshot.methods import TASK_BATCHING, plain_backward, run_tasks, task_scorer
from fewshot.methods.tasks import TaskScorer
from fewshot.models.conv4 import Conv4
from fewshot.models.resnet12 import ResNet12

REFERENCE = "reference"
# Other measurements, in their own modules: `python -m bench.speed <flag> [their options]`.
MODES = {
    "--whole-machine": "bench.whole_machine",
    "--time-to-accuracy": "bench.time_to_accuracy",
    "--paired-budget": "bench.paired_budget",
}


@dataclass(frozen=True)
class Workload:
    name: str
    algo: dict
    backbone: dict  # Conv4 settings besides in_channels, image_size, num_classes
    way: int
    shot: int
    query: int
    tasks: int
    image_size: int
    in_channels: int
    compile: bool = False  # algo.compile: torch.compile evaluation's passes
    bf16: bool = False  # trainer.precision=bf16-mixed: bfloat16 autocast
    net: str = "conv4"  # backbone.name: conv4 (`backbone` its settings) or resnet12


MAML_TRANSDUCTIVE = {
    "name": "maml",
    "first_order": False,
    "batch_norm_train": "transductive",
    "batch_norm_test": "transductive",
}
# The layout is conf/backbone/conv4.yaml's default, auto: channels-last with pool or from 64 px.
STRIDED = {
    "channels": 64,
    "padding": 1,
    "stride": 2,
    "pool": False,
    "channels_last": "auto",
}  # the MAML paper's Omniglot net
POOLED_32 = {"channels": 32, "padding": 1, "stride": 1, "pool": True, "channels_last": "auto"}
# Second-order MAML with ResNet-12 at Mini-ImageNet's 84 px, one task: memory only (the
# reference has no ResNet-12); `--memory-only --only maml_miniimagenet_resnet12_5w1s
# --memory-steps 1 5` is issue #24's table.
RESNET12 = Workload(
    "maml_miniimagenet_resnet12_5w1s",
    {**MAML_TRANSDUCTIVE, "base_lr": 0.01, "inner_steps": 5, "inner_steps_test": 10},
    {"widths": [64, 160, 320, 640]},
    5,
    1,
    15,
    1,
    84,
    3,
    net="resnet12",
)
MEMORY_WORKLOADS = ("maml_omniglot_5w1s", "maml_miniimagenet_5w1s")  # RESNET12 when named

WORKLOADS = [
    Workload(
        "maml_omniglot_5w1s",
        {**MAML_TRANSDUCTIVE, "base_lr": 0.4, "inner_steps": 5, "inner_steps_test": 10},
        STRIDED,
        5,
        1,
        15,
        32,
        28,
        1,
    ),
    Workload(
        "maml_omniglot_20w1s",
        {**MAML_TRANSDUCTIVE, "base_lr": 0.1, "inner_steps": 5, "inner_steps_test": 10},
        STRIDED,
        20,
        1,
        15,
        16,
        28,
        1,
    ),
    Workload(
        "maml_miniimagenet_5w1s",
        {**MAML_TRANSDUCTIVE, "base_lr": 0.01, "inner_steps": 5, "inner_steps_test": 10},
        POOLED_32,
        5,
        1,
        15,
        4,
        84,
        3,
    ),
    Workload(
        "metalstm_miniimagenet_5w5s",
        {
            "name": "metalstm",
            "hidden_size": 20,
            "inner_epochs": 8,
            "inner_batch_size": 25,
            "learn_init": True,
            "batch_norm_train": "transductive",
            "batch_norm_test": "support",
        },
        POOLED_32,
        5,
        5,
        15,
        1,
        84,
        3,
    ),
]


def build(workload: Workload, batching: str) -> TaskScorer:
    """The workload's learner, in the task scorer train.py would build for it; ConfigError
    where train.py would refuse the settings."""
    cfg = OmegaConf.create(
        {
            "algo": {**workload.algo, "task_batching": batching, "compile": workload.compile},
            "backbone": workload.backbone,
            "trainer": {"precision": "bf16-mixed" if workload.bf16 else "32-true"},
        }
    )
    check_exclusive(cfg)
    torch.manual_seed(0)
    algo = OmegaConf.merge(group_option("algo", workload.algo["name"]), cfg.algo)
    if workload.net == "resnet12":
        backbone = ResNet12(
            workload.in_channels, workload.image_size, workload.way, **workload.backbone
        )
    else:
        settings = backbone_config(cfg)  # the backbone's `auto` layout, as train.py resolves it
        backbone = Conv4(workload.in_channels, workload.image_size, workload.way, **settings)
    return task_scorer(learner_from(algo, backbone), batching, workload.compile)


def reference_net(workload: Workload) -> reference.ConvNet:
    """The reference's net of the workload's shape, batch norm as its learner needs."""
    settings = {k: v for k, v in workload.backbone.items() if k != "channels_last"}
    support = workload.algo["batch_norm_test"] == "support"
    torch.manual_seed(0)
    return reference.ConvNet(
        workload.in_channels,
        workload.image_size,
        workload.way,
        **settings,
        support_statistics=support,
    )


def episodes(workload: Workload, tasks: int, device: torch.device) -> Episodes:
    g = torch.Generator().manual_seed(0)
    shape = (workload.in_channels, workload.image_size, workload.image_size)
    labels = torch.arange(workload.way)
    batch = Episodes(
        torch.rand(tasks, workload.way * workload.shot, *shape, generator=g),
        labels.repeat_interleave(workload.shot).expand(tasks, -1),
        torch.rand(tasks, workload.way * workload.query, *shape, generator=g),
        labels.repeat_interleave(workload.query).expand(tasks, -1),
    )
    return Episodes(*(t.to(device) for t in batch))


Step = Callable[[], object]


def fewshot_steps(workload: Workload, batching: str, device: torch.device) -> tuple[Step, Step]:
    """fewshot's meta-iteration (as EpisodicModule.training_step runs it, without clipping) and
    test episode for the workload."""
    tasks = build(workload, batching)
    tasks.learner.to(device)
    optimizer = torch.optim.Adam(tasks.learner.parameters(), lr=1e-3)
    train_batch, test_batch = (
        episodes(workload, workload.tasks, device),
        episodes(workload, 1, device),
    )

    def meta_iteration():
        optimizer.zero_grad()
        run_tasks(tasks, train_batch, training=True, backward=plain_backward)
        optimizer.step()

    def test_episode():
        with torch.no_grad():
            run_tasks(tasks, test_batch, training=False)

    return meta_iteration, test_episode


def reference_steps(workload: Workload, device: torch.device) -> tuple[Step, Step]:
    """The reference's meta-iteration and test episode for the workload."""
    algo, net = workload.algo, reference_net(workload).to(device)
    train_batch, test_batch = (
        episodes(workload, workload.tasks, device),
        episodes(workload, 1, device),
    )
    support_x, support_y, query_x, query_y = (t[0] for t in test_batch)
    if algo["name"] == "maml" and algo["batch_norm_test"] == "transductive":
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        settings = (algo["base_lr"], algo["inner_steps"], algo["first_order"])

        def meta_iteration():
            optimizer.zero_grad()
            reference.maml_backward(net, *train_batch, *settings)
            optimizer.step()

        def test_episode():
            with torch.no_grad():
                logits = reference.maml_test_episode(
                    net, support_x, support_y, query_x, algo["base_lr"], algo["inner_steps_test"]
                )
                F.cross_entropy(logits, query_y)

        return meta_iteration, test_episode
    if algo["name"] == "metalstm" and algo["inner_batch_size"] >= workload.way * workload.shot:
        meta = reference.MetaLearner(algo["hidden_size"]).to(device)
        net.requires_grad_(algo["learn_init"])
        meta_parameters = [p for p in (*net.parameters(), *meta.parameters()) if p.requires_grad]
        optimizer = torch.optim.Adam(meta_parameters, lr=1e-3)

        def meta_iteration():
            optimizer.zero_grad()
            reference.metalstm_backward(net, meta, *train_batch, algo["inner_epochs"])
            optimizer.step()

        def test_episode():
            with torch.no_grad():
                logits = reference.metalstm_test_episode(
                    net, meta, support_x, support_y, query_x, algo["inner_epochs"]
                )
                F.cross_entropy(logits, query_y)

        return meta_iteration, test_episode
    raise ConfigError(f"bench/reference.py has no implementation of {workload.name}'s settings")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Step, iters: int, device: torch.device, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def busy_seconds(fn: Step, device: torch.device) -> float:
    """Seconds the device spends running kernels and copies during `fn()`: the union of their
    intervals, as torch.profiler records them."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        fn()
        synchronize(device)
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in profile.events()
        if e.device_type == DeviceType.CUDA
    )
    busy, reached = 0.0, float("-inf")
    for start, end in spans:  # microseconds
        if end > reached:
            busy += end - max(start, reached)
            reached = end
    return busy / 1e6


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@dataclass(frozen=True)
class Run:
    """One child's measurement: `implementation` is REFERENCE or a TASK_BATCHING name."""

    workload: Workload
    implementation: str
    iters: int
    threads: int
    device: str


def measure(run: Run, out: mp.Queue) -> None:
    torch.set_num_threads(run.threads)
    device, workload = torch.device(run.device), run.workload
    try:
        if run.implementation == REFERENCE:
            meta_iteration, test_episode = reference_steps(workload, device)
        else:
            meta_iteration, test_episode = fewshot_steps(workload, run.implementation, device)
    except ConfigError as err:
        out.put({"skipped": str(err)})
        return
    # As Lightning runs steps under trainer.precision=bf16-mixed (the optimiser step inside
    # here: its share of the time is small), for the reference as for fewshot.
    autocast = partial(torch.autocast, device.type, torch.bfloat16, enabled=workload.bf16)

    def train():
        with autocast():
            meta_iteration()

    def test():
        with autocast():
            test_episode()

    s_train = median_seconds(train, run.iters, device)
    synchronize(device)
    start = time.perf_counter()
    test()  # compiles, with algo.compile
    synchronize(device)
    s_first_test = time.perf_counter() - start
    s_test = median_seconds(test, run.iters, device)
    result = {
        "s_train": s_train,
        "s_test": s_test,
        "s_first_test": s_first_test,
        "peak_gb": peak_memory_gb(device),  # before the profiled steps below
    }
    if device.type == "cuda":
        result["busy_train"] = busy_seconds(train, device) / s_train
        result["busy_test"] = busy_seconds(test, device) / s_test
    out.put(result)


def measure_memory(workload: Workload, threads: int, device: str, out: mp.Queue) -> None:
    """Peak memory growth over the built model during three meta-iterations, and their median
    time."""
    # The modules train.py has loaded: else the first backward through checkpointed steps (a
    # backward with given output gradients) loads sympy lazily, memory that is not the graph's.
    import fewshot.training.module  # noqa: F401

    torch.set_num_threads(threads)
    device = torch.device(device)
    tasks, batch = build(workload, "loop"), episodes(workload, workload.tasks, device)
    tasks.learner.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = peak_memory_gb(device)

    def meta_iteration():
        tasks.learner.zero_grad()
        run_tasks(tasks, batch, training=True, backward=plain_backward)

    seconds = median_seconds(meta_iteration, iters=3, device=device, warmup=0)
    out.put((peak_memory_gb(device) - before, seconds))


def in_child(target, *args):
    """Run `target(*args, queue)` in a fresh process (its own peak memory) and return what it
    put."""
    context = mp.get_context("spawn")
    out = context.Queue()
    child = context.Process(target=target, args=(*args, out))
    child.start()
    while True:
        try:
            result = out.get(timeout=1)
            break
        except queue.Empty:
            if not child.is_alive() and out.empty():  # it failed: its traceback is above
                raise SystemExit(f"error: {target.__name__} exited with {child.exitcode}") from None
    child.join()
    return result


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    for flag, module in MODES.items():  # their own options: python -m bench.speed <flag> -h
        if flag in argv:
            importlib.import_module(module).main([a for a in argv if a != flag])
            return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3, help="timed steps per child")
    parser.add_argument("--rounds", type=int, default=3, help="alternations per workload")
    parser.add_argument("--only", nargs="*", default=None, help="workload names")
    parser.add_argument(
        "--batching",
        nargs="+",
        choices=list(TASK_BATCHING),
        default=list(TASK_BATCHING),
        help="fewshot's task batchings to measure (fewshot.methods.TASK_BATCHING)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--compile", action="store_true", help="also run every row with algo.compile=true"
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="also run every row under bfloat16 autocast (trainer.precision=bf16-mixed; not "
        "the papers' precision)",
    )
    parser.add_argument(
        "--memory-steps",
        nargs="*",
        type=int,
        default=[1, 5, 10, 20],
        help="inner steps at which to report second-order MAML's memory, with and without "
        "algo.checkpoint_inner (none: skip the report)",
    )
    parser.add_argument("--memory-only", action="store_true", help="only the memory report")
    parser.add_argument(
        "--whole-machine",
        action="store_true",
        help="instead: train.py and evaluate.py at their default threads beside the reference "
        "at its best thread count (bench/whole_machine.py; its options: --whole-machine -h)",
    )
    parser.add_argument(
        "--time-to-accuracy",
        action="store_true",
        help="instead: the quick start and the reference's MAML trained for the same minutes, "
        "scored on the same test episodes (bench/time_to_accuracy.py; --time-to-accuracy -h)",
    )
    parser.add_argument(
        "--paired-budget",
        action="store_true",
        help="instead: the quick start and ProtoNet trained for the same minutes, paired on "
        "the same test episodes (bench/paired_budget.py; --paired-budget -h)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device cuda: CUDA is not available to torch {torch.__version__} here")
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU only"
    print(
        f"{cpu_name()} ({device}), torch {torch.__version__}, {args.threads} thread(s), "
        f"{args.rounds} rounds of {args.iters} steps per implementation"
    )
    if not args.memory_only:
        speed_table(args)
    if args.memory_steps:
        memory_report(args)


def speed_table(args: argparse.Namespace) -> None:
    cuda = args.device == "cuda"
    memory = "peak GB" if cuda else "RSS GB"
    print(
        f"{'workload':28} {'batching':9} {'s/iter':>7} {'speedup':>7} {'s/test':>7} "
        f"{'speedup':>7} {memory:>7}" + (f" {'busy it':>7} {'busy ts':>7}" if cuda else "")
    )
    base = [w for w in WORKLOADS if not args.only or w.name in args.only]
    workloads = list(base)
    if args.compile:
        workloads += [replace(w, name=f"{w.name}+compile", compile=True) for w in base]
    if args.bf16:
        workloads += [replace(w, name=f"{w.name}+bf16", bf16=True) for w in base]
    first_tests = {}
    for workload in workloads:
        # The compiled passes are the loop's alone (fewshot.methods.task_scorer).
        batchings = ["loop"] if workload.compile else args.batching
        results = alternated(workload, [REFERENCE, *batchings], args)
        ref = results.get(REFERENCE)
        for implementation in [REFERENCE, *batchings]:
            runs = results.get(implementation)
            label = f"{workload.name:28} {implementation:9}"
            if isinstance(runs, str):
                print(f"{label} skipped: {runs}")
                continue
            row = f"{label} {median(runs, 's_train'):7.3f} "
            row += f"{speedup(ref, runs, 's_train'):>7} {median(runs, 's_test'):7.4f} "
            row += f"{speedup(ref, runs, 's_test'):>7} {median(runs, 'peak_gb'):7.2f}"
            if cuda:
                row += f" {median(runs, 'busy_train'):7.0%} {median(runs, 'busy_test'):7.0%}"
            print(row)
            if workload.compile and implementation != REFERENCE:
                first_tests[workload.name] = median(runs, "s_first_test")
    if first_tests:
        print(
            "first test episode, compiling included: "
            + ", ".join(f"{name} {s:.1f} s" for name, s in first_tests.items())
        )
    print(
        "speedup = the reference's time / fewshot's, the median over rounds of each round's "
        "pair; the reference: bench/reference.py, the same mathematics task by task"
    )


def alternated(
    workload: Workload, implementations: list[str], args: argparse.Namespace
) -> dict[str, list[dict] | str]:
    """Every implementation's results, one per round, from children run in alternation; a
    string where it was skipped, saying why."""
    results: dict[str, list[dict] | str] = {name: [] for name in implementations}
    for index in range(args.rounds):
        order = implementations if index % 2 == 0 else implementations[::-1]
        for name in order:
            if isinstance(results[name], str):
                continue
            r = in_child(measure, Run(workload, name, args.iters, args.threads, args.device))
            if "skipped" in r:
                results[name] = r["skipped"]
            else:
                results[name].append(r)
    return results


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def speedup(reference_runs: list[dict] | str | None, runs: list[dict], key: str) -> str:
    """The median over rounds of the round's reference time / this implementation's."""
    if not isinstance(reference_runs, list) or reference_runs is runs:
        return "-"
    pairs = zip(reference_runs, runs)
    return f"{statistics.median(ref[key] / ours[key] for ref, ours in pairs):.2f}x"


def memory_report(args: argparse.Namespace) -> None:
    """Second-order MAML's memory by inner steps, plain and with checkpoint_inner (84 px
    Mini-ImageNet activations are where checkpointing matters), and what it costs in time."""
    what = "peak device memory" if args.device == "cuda" else "peak RSS"
    print(
        f"second-order MAML (fewshot, loop), {what} growth over the model in GB by inner steps, "
        "plain / checkpoint_inner (plain's s per meta-iteration, checkpoint_inner's over it):"
    )
    # ResNet-12 only when --only names it: at 10 or 20 second-order steps it outgrows a
    # small machine's memory.
    for name in (*MEMORY_WORKLOADS, RESNET12.name):
        if (args.only and name not in args.only) or (not args.only and name == RESNET12.name):
            continue
        base = next(w for w in [*WORKLOADS, RESNET12] if w.name == name)
        cells = []
        for steps in args.memory_steps:
            (plain_gb, plain_s), (ckpt_gb, ckpt_s) = (
                in_child(
                    measure_memory,
                    replace(base, algo={**base.algo, "inner_steps": steps, "checkpoint_inner": c}),
                    args.threads,
                    args.device,
                )
                for c in (False, True)
            )
            cells.append(
                f"{steps}: {plain_gb:.2f}/{ckpt_gb:.2f} ({plain_s:.2f} s, {ckpt_s / plain_s:.2f}x)"
            )
        print(f"  {name:28} " + "  ".join(cells))


if __name__ == "__main__":
    main()
