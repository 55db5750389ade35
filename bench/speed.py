"""Speed and memory of fewshot's meta-learning workloads against the best existing implementations.

    OMP_NUM_THREADS=1 python bench/speed.py [--threads 1] [--iters 10] [--only maml_omniglot_5w1s]
        [--vmap] [--compile]    # also the MAML rows with algo.vmap_tasks / every row compiled
        [--bf16]                # also every row under bfloat16 autocast

Every workload runs in a fresh child process (so peak RSS is its own) on synthetic inputs of the
paper's shapes, and prints median seconds per meta-iteration and per test episode, peak RSS, the
ratio to the reference figures (measured on this machine kind: 2-core CPU, 1 torch thread,
torch 2.15), the FLOP/s it reaches, and the machine's dense conv forward+backward FLOP/s on the
same layer shapes. Then second-order MAML's peak memory by inner steps, with and without
algo.checkpoint_inner, and its cost in time (`--memory-only`: this report alone).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from fewshot.config import group_option, learner_from
from fewshot.data.episodes import Episodes
from fewshot.learners import TaskLoop, VmappedTasks, plain_backward, run_tasks
from fewshot.learners.tasks import TaskScorer
from fewshot.models.conv4 import Conv4


@dataclass
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
    reference: dict = field(default_factory=dict)  # s_train, s_test, rss_gb of the best other code
    compile: bool = False  # algo.compile: torch.compile evaluation's passes
    bf16: bool = False  # trainer.precision=bf16-mixed: bfloat16 autocast


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
MEMORY_WORKLOADS = ("maml_omniglot_5w1s", "maml_miniimagenet_5w1s")

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
        {"s_train": 3.02, "s_test": 0.051, "rss_gb": 0.98, "by": "learn2learn"},
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
        {"s_train": 4.19, "s_test": 0.128, "by": "learn2learn"},
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
        {"s_train": 4.54, "s_test": 0.68, "by": "learn2learn"},
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
        {"s_train": 2.05, "s_test": 1.50, "rss_gb": 2.1, "by": "Meta-LSTM PyTorch port"},
    ),
]


def build(workload: Workload) -> TaskScorer:
    """The workload's learner, in the task scorer train.py would build for it."""
    torch.manual_seed(0)
    algo = OmegaConf.merge(group_option("algo", workload.algo["name"]), workload.algo)
    settings = dict(workload.backbone)
    if algo.get("vmap_tasks") and settings.get("channels_last") == "auto":
        settings["channels_last"] = False  # as fewshot.config.backbone_config resolves it
    backbone = Conv4(workload.in_channels, workload.image_size, workload.way, **settings)
    learner = learner_from(algo, backbone)
    if algo.get("vmap_tasks"):
        return VmappedTasks(learner)
    return TaskLoop(learner, compiled=workload.compile)


def episodes(workload: Workload, tasks: int) -> Episodes:
    g = torch.Generator().manual_seed(0)
    shape = (workload.in_channels, workload.image_size, workload.image_size)
    labels = torch.arange(workload.way)
    return Episodes(
        torch.rand(tasks, workload.way * workload.shot, *shape, generator=g),
        labels.repeat_interleave(workload.shot).expand(tasks, -1),
        torch.rand(tasks, workload.way * workload.query, *shape, generator=g),
        labels.repeat_interleave(workload.query).expand(tasks, -1),
    )


def median_seconds(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def conv_throughput(workload: Workload, images: int) -> float:
    """Plain forward+backward FLOP/s of the workload's backbone on a batch of `images`."""
    net = Conv4(workload.in_channels, workload.image_size, workload.way, **workload.backbone)
    x = torch.rand(images, workload.in_channels, workload.image_size, workload.image_size)

    def step():
        net.zero_grad()
        net(x).sum().backward()

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / median_seconds(step, 5)


def measure(workload: Workload, iters: int, threads: int, out: mp.Queue) -> None:
    torch.set_num_threads(threads)
    tasks = build(workload)
    optimizer = torch.optim.Adam(tasks.learner.parameters(), lr=1e-3)
    train_batch, test_batch = episodes(workload, workload.tasks), episodes(workload, 1)

    # As Lightning runs steps under trainer.precision=bf16-mixed (the optimiser step outside).
    autocast = partial(torch.autocast, "cpu", torch.bfloat16, enabled=workload.bf16)

    def meta_iteration():  # as EpisodicModule.training_step runs it
        optimizer.zero_grad()
        with autocast():
            run_tasks(tasks, train_batch, training=True, backward=plain_backward)
        optimizer.step()

    def test_episode():
        with torch.no_grad(), autocast():
            run_tasks(tasks, test_batch, training=False)

    s_train = median_seconds(meta_iteration, iters)
    start = time.perf_counter()
    test_episode()  # compiles, with algo.compile
    s_first_test = time.perf_counter() - start
    s_test = median_seconds(test_episode, iters)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # before the probes below
    with FlopCounterMode(display=False) as counter:
        meta_iteration()
    # The dense reference runs one task's images at once: the granularity the workload runs at.
    task_images = workload.way * (workload.shot + workload.query)
    out.put(
        {
            "s_train": s_train,
            "s_test": s_test,
            "flops_per_s": counter.get_total_flops() / s_train,
            "dense_flops_per_s": conv_throughput(workload, task_images),
            "rss_gb": rss_gb,
            "s_first_test": s_first_test,
        }
    )


def measure_memory(workload: Workload, threads: int, out: mp.Queue) -> None:
    """Peak RSS growth over the built model during three meta-iterations, and their median time."""
    # The modules train.py has loaded: else the first backward through checkpointed steps (a
    # backward with given output gradients) loads sympy lazily, ~30 MB that is not the graph's.
    import fewshot.module  # noqa: F401

    torch.set_num_threads(threads)
    tasks, batch = build(workload), episodes(workload, workload.tasks)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def meta_iteration():
        tasks.learner.zero_grad()
        run_tasks(tasks, batch, training=True, backward=plain_backward)

    seconds = median_seconds(meta_iteration, iters=3, warmup=0)
    out.put(((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20, seconds))


def in_child(target, *args):
    """Run `target(*args, queue)` in a fresh process (its own peak RSS) and return what it put."""
    context = mp.get_context("spawn")
    out = context.Queue()
    child = context.Process(target=target, args=(*args, out))
    child.start()
    result = out.get()
    child.join()
    return result


def ratio(reference: float | None, ours: float) -> str:
    return f"{reference / ours:5.2f}x" if reference else "    -"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument(
        "--vmap", action="store_true", help="also run the MAML rows with algo.vmap_tasks=true"
    )
    parser.add_argument(
        "--compile", action="store_true", help="also run every row with algo.compile=true"
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="also run every row with trainer.precision=bf16-mixed (not the papers' precision)",
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
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.iters}")
    if not args.memory_only:
        speed_table(args)
    if args.memory_steps:
        memory_report(args)


def speed_table(args: argparse.Namespace) -> None:
    print(
        f"{'workload':24} {'s/iter':>7} {'speedup':>7} {'s/test':>7} {'speedup':>7} "
        f"{'RSS GB':>6} {'ref GB':>6} {'GFLOP/s':>7} {'of dense':>8}"
    )
    workloads = [w for w in WORKLOADS if not args.only or w.name in args.only]
    base = list(workloads)
    maml = [w for w in base if w.algo["name"] == "maml"]  # Meta-LSTM has no vmap_tasks
    if args.vmap:
        workloads += [
            replace(w, name=f"{w.name}+vmap", algo={**w.algo, "vmap_tasks": True}) for w in maml
        ]
    if args.compile:
        workloads += [replace(w, name=f"{w.name}+compile", compile=True) for w in base]
    if args.bf16:
        workloads += [replace(w, name=f"{w.name}+bf16", bf16=True) for w in base]
    compile_seconds = {}
    for workload in workloads:
        r = in_child(measure, workload, args.iters, args.threads)
        if workload.compile:
            compile_seconds[workload.name] = r["s_first_test"]
        ref = workload.reference
        print(
            f"{workload.name:24} {r['s_train']:7.3f} {ratio(ref.get('s_train'), r['s_train']):>7} "
            f"{r['s_test']:7.4f} {ratio(ref.get('s_test'), r['s_test']):>7} {r['rss_gb']:6.2f} "
            f"{ref.get('rss_gb', float('nan')):6.2f} {r['flops_per_s'] / 1e9:7.1f} "
            f"{r['flops_per_s'] / r['dense_flops_per_s']:8.0%}"
        )
    if compile_seconds:
        print(
            "first test episode, compiling included: "
            + ", ".join(f"{name} {s:.1f} s" for name, s in compile_seconds.items())
        )
    print(
        "speedup = reference time / ours (target: >= 2x training, >= 3x test episode); "
        "references: learn2learn (MAML), the paper's PyTorch port (Meta-LSTM)"
    )


def memory_report(args: argparse.Namespace) -> None:
    """Second-order MAML's memory by inner steps, plain and with checkpoint_inner (84 px
    Mini-ImageNet activations are where checkpointing matters), and what it costs in time."""
    print(
        "second-order MAML, peak RSS growth over the model in GB by inner steps, "
        "plain / checkpoint_inner (time per meta-iteration, checkpoint_inner / plain):"
    )
    for name in MEMORY_WORKLOADS:
        if args.only and name not in args.only:
            continue
        base = next(w for w in WORKLOADS if w.name == name)
        cells = []
        for steps in args.memory_steps:
            (plain_gb, plain_s), (ckpt_gb, ckpt_s) = (
                in_child(
                    measure_memory,
                    replace(base, algo={**base.algo, "inner_steps": steps, "checkpoint_inner": c}),
                    args.threads,
                )
                for c in (False, True)
            )
            cells.append(f"{steps}: {plain_gb:.2f}/{ckpt_gb:.2f} ({ckpt_s / plain_s:.2f}x)")
        print(f"  {name:24} " + "  ".join(cells))


if __name__ == "__main__":
    main()
