"""The test protocol: fixed episodes of held-out classes, mean accuracy and its 95% interval."""

from __future__ import annotations

import hashlib
import logging
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from fewshot.checkpoints.format import current_state_dict
from fewshot.checkpoints.reading import check_checkpoint_fits, check_state_fits, load_checkpoint
from fewshot.config import (
    OUTER_LOOP_KEYS,
    check_config,
    check_value,
    component_class,
    int_at_least,
    training_task,
)
from fewshot.data.episodes import share
from fewshot.errors import ConfigError
from fewshot.experiments.runs import best_val_acc, eval_result_path, task_suffix
from fewshot.files import unwritable, write_json
from fewshot.methods.maml import MAML
from fewshot.methods.metalstm import MetaLSTM
from fewshot.training.build import build_datamodule, build_module, on_cpu, set_threads
from fewshot.training.console import EpisodeCountdown, EpisodeProgress, quiet_lightning
from fewshot.training.module import EpisodicModule
from fewshot.training.threads import AUTO, auto_processes

log = logging.getLogger(__name__)


def mean_ci95(accuracies: Tensor) -> tuple[float, float]:
    """Mean of per-episode accuracies and 1.96 * std / sqrt(n), std with Bessel's correction."""
    n = accuracies.numel()
    if n < 2:
        raise ValueError(f"a confidence interval needs at least 2 episodes, got {n}")
    acc = accuracies.double()
    return acc.mean().item(), 1.96 * acc.std().item() / math.sqrt(n)


def protocol(cfg: DictConfig) -> dict[str, Any]:
    """What a test number depends on, recorded beside it."""
    return {
        "dataset": cfg.data.name,
        "split": cfg.data.get("split"),
        "way": cfg.way,
        "shot": cfg.shot,
        "query": cfg.query,
        "algorithm": cfg.algo.name,
        "backbone": cfg.backbone.get("name", "conv4"),
        "first_order": cfg.algo.get("first_order"),
        "settings": {
            k: v
            for k, v in OmegaConf.to_container(cfg.algo, resolve=True).items()
            if k not in OUTER_LOOP_KEYS and k != "_target_"
        },
        "test_keys": list(test_keys(cfg)),
        **{key: cfg.algo[key] for key in test_keys(cfg)},
        **dict(zip(("train_way", "train_query"), training_task(cfg), strict=True)),
        "batch_norm": cfg.algo.batch_norm_test,
        "batch_norm_train": cfg.algo.batch_norm_train,
        "episode_seed": cfg.seed,
        "precision": precision(cfg),
    }


def test_keys(cfg: DictConfig) -> tuple[str, ...]:
    """The `algo` keys that shape the learner's adaptation at test time."""
    return component_class(cfg, "algo").test_keys


def precision(cfg: DictConfig) -> str:
    """The run's trainer.precision; runs from before the key existed trained in float32."""
    return OmegaConf.select(cfg, "trainer.precision", default=None) or "32-true"


def recorded_test_keys(protocol: Mapping[str, Any]) -> tuple[str, ...]:
    """The `algo` keys a result's protocol records as shaping its test (its `test_keys`)."""
    algorithm = protocol.get("algorithm")
    return tuple(protocol.get("test_keys", _TEST_KEYS_BEFORE_RECORDED.get(algorithm, ())))


def inner_loop_summary(protocol: dict[str, Any]) -> str:
    """The test-time inner loop a result used, e.g. `base_lr=0.4 inner_steps_test=3`; empty for
    an algorithm fewshot does not have (a result file from elsewhere)."""
    keys = recorded_test_keys(protocol)
    return " ".join(f"{key}={protocol[key]}" for key in keys if key in protocol)


# Result files written before protocols recorded their test-time keys.
_TEST_KEYS_BEFORE_RECORDED = {"maml": MAML.test_keys, "metalstm": MetaLSTM.test_keys}


def evaluate_checkpoint(
    ckpt: str | Path,
    episodes: int,
    seed: int,
    overrides: Mapping[str, Any] | None = None,
    threads: int | str | None = None,
    progress: str | None = "test",
) -> dict[str, Any]:
    """Score a checkpoint on `episodes` fixed meta-test episodes drawn with `seed`."""
    return evaluate_prefixes(ckpt, [episodes], seed, overrides, threads, progress)[0]


def score_checkpoint(
    ckpt: str | Path,
    episodes: int,
    seed: int,
    overrides: Mapping[str, Any] | None = None,
    threads: int | str | None = None,
    output: str | Path | None = None,
    progress: str | None = "test",
) -> tuple[dict[str, Any], Path]:
    """evaluate.py's protocol for one checkpoint and one episode count: score it, write the
    result JSON to `output` (None: named by `result_paths`); return the result and where it
    went. Where the JSON cannot be written is refused before the episodes are scored."""
    paths = [] if output is None else [Path(output)]
    if output is not None:
        check_output(output, given=True)

    def check_default_output(cfg: DictConfig, own: DictConfig) -> None:
        paths.extend(result_paths(ckpt, [episodes], seed, overrides or {}, cfg, own))
        check_output(paths[0], given=False)

    (result,) = evaluate_prefixes(
        ckpt,
        [episodes],
        seed,
        overrides,
        threads,
        progress,
        before_scoring=check_default_output if output is None else None,
    )
    write_json(paths[0], result)
    return result, paths[0]


def result_paths(
    ckpt: str | Path,
    counts: Sequence[int],
    seed: int,
    overrides: Mapping[str, Any],
    cfg: DictConfig,
    own: DictConfig,
) -> list[Path]:
    """Where evaluate.py writes the result of `ckpt` for each episode count of `counts` unless
    told otherwise (runs.eval_result_path), named by the test-time settings among `overrides`
    in which the evaluation's config `cfg` differs from the run's own config `own`: an override
    that restates the run's own value leaves the name, and so the run's own file, as it is."""
    own_values = {key: OmegaConf.select(own, key, default=None) for key in overrides}
    own_values["trainer.precision"] = precision(own)
    task = task_suffix(overrides, protocol(cfg), own_values)
    return [eval_result_path(ckpt, n, seed, task) for n in counts]


def check_output(path: str | Path, given: bool) -> None:
    """Refuse a result path no file can be written at, in one line naming it and the key
    `output` (`given`: the path is output='s; else the one output=null chooses). Checked
    before scoring: found at the end, it would throw the scored episodes away."""
    reason = unwritable(path)
    if reason is None:
        return
    where = f"output={path}" if given else f"the result file {path} (output=null)"
    raise ConfigError(
        f"{where} cannot be written: {reason}; give output=<a file in a writable folder>"
    )


def result_line(result: Mapping[str, Any], output: str | Path) -> str:
    """The line evaluate.py (and train.py, at its end) prints for a test result."""
    p = result["protocol"]
    return (
        f"test accuracy {100 * result['test/acc']:.2f} ± {100 * result['test/acc_ci95']:.2f}% "
        f"(95% CI, {result['episodes']} episodes, {p['way']}-way {p['shot']}-shot, "
        f"{' '.join(filter(None, (p['algorithm'], inner_loop_summary(p))))}, "
        f"{p['batch_norm']} batch norm, "
        f"{p['precision']}) -> {output}"
    )


def restored_module(
    cfg: DictConfig, checkpoint: Mapping[str, Any], ckpt: str | Path
) -> EpisodicModule:
    """The module `cfg` builds, holding the weights of `checkpoint` (read from `ckpt`; the
    names of older versions mapped), refused in one line where they do not fit it."""
    module = build_module(cfg)
    state_dict = current_state_dict(checkpoint["state_dict"])
    check_state_fits(module, state_dict, "ckpt", ckpt)
    module.load_state_dict(state_dict)
    return module


def scored_episodes(
    cfg: DictConfig,
    checkpoint: Mapping[str, Any],
    ckpt: str | Path,
    count: int,
    threads: int | str | None,
    progress: str | None,
) -> tuple[Tensor, list[str]]:
    """The accuracy of each of the first `count` fixed test episodes [count], in episode order,
    and the meta-test split's class names (what the episodes index).

    With `threads: auto` on the CPU, processes (one per usable core, one thread each) score
    contiguous shares of the episodes, this one the first: each episode is a function of its id
    alone, so the accuracies are those one process would get."""
    processes = auto_processes(threads, on_cpu(str(cfg.trainer.accelerator)), count)
    shares = [share(count, rank, processes) for rank in range(processes)]
    if processes == 1:
        set_threads(threads)
        return share_accuracies(cfg, checkpoint, ckpt, shares[0], progress)
    log.info("scoring %d test episodes in %d processes", count, processes)
    config = OmegaConf.to_container(cfg, resolve=True)
    # Forked where it can be: a spawned process imports torch and Lightning again, seconds
    # before its first episode. Safe here: this process has used one torch thread (an OpenMP
    # pool of several does not survive a fork) and no CUDA.
    set_threads(threads)
    fork = sys.platform.startswith("linux")
    context = torch.multiprocessing.get_context("fork" if fork else "spawn")
    with ProcessPoolExecutor(processes - 1, mp_context=context) as pool:
        others = [pool.submit(scored_share, config, str(ckpt), ids) for ids in shares[1:]]
        note = f"the first share of {processes} processes, scored at once"
        mine, names = share_accuracies(cfg, checkpoint, ckpt, shares[0], progress, note)
        return torch.cat([mine, *(future.result() for future in others)]), names


def scored_share(config: dict[str, Any], ckpt: str, ids: range) -> Tensor:
    """share_accuracies in a process of scored_episodes' pool: `config` is the evaluation's,
    checked; the weights are read from `ckpt` again, as data."""
    quiet_lightning()
    set_threads(AUTO)
    _, checkpoint = load_checkpoint(ckpt)
    return share_accuracies(OmegaConf.create(config), checkpoint, ckpt, ids, None, None)[0]


def share_accuracies(
    cfg: DictConfig,
    checkpoint: Mapping[str, Any],
    ckpt: str | Path,
    ids: range,
    progress: str | None,
    countdown: str | None = "",
) -> tuple[Tensor, list[str]]:
    """The accuracy of each test episode of `ids` [len(ids)], scored in this process, and the
    meta-test split's class names; with
    `progress`, a bar on a terminal; unless `countdown` is None, the time it will take in the
    log (EpisodeCountdown; `countdown`: whose share `ids` is)."""
    module = restored_module(cfg, checkpoint, ckpt)
    datamodule = build_datamodule(cfg, test_episodes=ids.stop, test_share=ids)
    datamodule.setup()
    trainer = pl.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        inference_mode=False,
        enable_progress_bar=False,  # Lightning's counts batches; EpisodeProgress counts episodes
        enable_model_summary=False,
        precision=precision(cfg),
        callbacks=[
            *([EpisodeProgress(progress)] if progress else []),
            *([EpisodeCountdown(countdown)] if countdown is not None else []),
        ],
    )
    trainer.test(module, datamodule, verbose=False)
    return torch.cat(module.test_accuracies), datamodule.splits["test"].names


def evaluate_prefixes(
    ckpt: str | Path,
    counts: Sequence[int],
    seed: int,
    overrides: Mapping[str, Any] | None = None,
    threads: int | str | None = None,
    progress: str | None = "test",
    before_scoring: Callable[[DictConfig, DictConfig], None] | None = None,
) -> list[dict[str, Any]]:
    """Results on the first n fixed meta-test episodes for each n in `counts`, from one pass
    over max(counts) episodes: episode i does not depend on how many are drawn, so each is the
    result of evaluating n episodes alone.

    `overrides` maps dotted keys of the run's config (`data.root`, `algo.inner_steps_test`,
    `algo.batch_norm_test`, `way`, `shot`, `query`, `algo.compile`, `trainer.precision`) to new
    values; None keeps the run's own. `progress`: the label of the progress bar shown on a
    terminal while the episodes are scored (None: no bar). `before_scoring(cfg, own)`, once the
    evaluation's config `cfg` and the run's own `own` are checked and before anything is built
    or scored, may refuse the evaluation (where its result would go cannot be written).
    """
    stored, checkpoint = load_checkpoint(ckpt)
    cfg = stored.copy()
    cfg.seed = seed
    # Evaluation runs where Lightning finds an accelerator, whatever the run trained on.
    OmegaConf.update(cfg, "trainer.accelerator", "auto", force_add=True)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        # trainer keys say how to run, not what was trained: older runs may lack them.
        if OmegaConf.select(cfg, key) is None and not key.startswith("trainer."):
            raise ConfigError(
                f"{key} is not a setting of this checkpoint's run (algo.name="
                f"{cfg.algo.name!r}, data.name={cfg.data.name!r}); leave it null"
            )
        OmegaConf.update(cfg, key, value, force_add=True)
    check_config(cfg)
    check_checkpoint_fits(
        cfg, stored, "ckpt", ckpt, "evaluate.py scores a checkpoint on its own way and backbone"
    )
    for n in counts:
        check_value("episodes", n, int_at_least(2))
    if before_scoring is not None:
        before_scoring(cfg, stored)
    accuracies, names = scored_episodes(cfg, checkpoint, ckpt, max(counts), threads, progress)
    classes = classes_sha256(names)
    results = []
    for n in counts:
        mean, ci95 = mean_ci95(accuracies[:n])
        results.append(
            {
                "test/acc": mean,
                "test/acc_ci95": ci95,
                "episodes": n,
                "checkpoint": str(Path(ckpt).resolve()),
                "trained_steps": checkpoint.get("global_step"),
                "val/acc_best": best_val_acc(checkpoint),
                "train_seed": stored.get("seed"),  # results of several seeds are pooled by it
                "protocol": protocol(cfg),
                PER_EPISODE: float32_values(accuracies[:n]),
                TEST_EPISODES: test_episodes(cfg, classes, n),
            }
        )
    return results


# The result keys that make two results comparable episode by episode (reporting.paired): the
# accuracy of each episode in episode order, and what identifies those episodes.
PER_EPISODE = "test/acc_per_episode"
TEST_EPISODES = "test_episodes"


def test_episodes(cfg: DictConfig, classes: str, count: int) -> dict[str, Any]:
    """What identifies the first `count` fixed test episodes of `cfg`: episode i is a function
    of these alone (its classes by position in the meta-test split, `classes` its digest), so
    two results with equal ones were scored on the same tasks, whatever the method."""
    return {
        "dataset": cfg.data.name,
        "split": cfg.data.get("split"),
        "classes_sha256": classes,
        "way": cfg.way,
        "shot": cfg.shot,
        "query": cfg.query,
        "seed": cfg.seed,
        "ids": {"start": 0, "stop": count},  # episode ids start..stop - 1
    }


def classes_sha256(names: Sequence[str]) -> str:
    """The first 16 hex digits of the SHA-256 of the meta-test split's class `names`, in the
    order episodes index them, one per line."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def float32_values(values: Tensor) -> list[float]:
    """`values` [n] as JSON numbers of no more digits than float32 holds (0.93333334, not
    0.9333333373069763): each reads back as the same float32."""
    return [float(str(v)) for v in values.detach().cpu().float().numpy()]
