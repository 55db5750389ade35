"""Every bad input is refused before any work with one line naming the key and what is allowed."""

from pathlib import Path

import pytest
import torch
from hydra.errors import HydraException

from fewshot import errors
from fewshot.checkpoints.reading import check_resumable, load_checkpoint
from fewshot.cli import hydra_error_line
from fewshot.config import check_config
from fewshot.training.build import build_datamodule, build_module
from tests.helpers import OLD_CHECKPOINTS, checkpoint_that_runs_code, compose_train, run_script

CONF = Path(__file__).resolve().parents[1] / "conf"


def changed_copy(good: Path, path: Path, change) -> Path:
    """A copy of checkpoint `good` that `change(checkpoint)` has edited."""
    checkpoint = torch.load(good, map_location="cpu", weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(trained_run, tmp_path_factory) -> dict[str, Path]:
    """A real 5-way conv4 checkpoint (the shared trained run's last.ckpt); a truncated copy, a
    Lightning-less torch file, and copies whose run config is incomplete or names an algorithm
    fewshot lacks, or that hold no weights or no training state; an old Meta-LSTM checkpoint."""
    good = trained_run / "checkpoints" / "last.ckpt"
    folder = tmp_path_factory.mktemp("checkpoints")
    truncated = folder / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:5000])
    foreign = folder / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    edits = {
        "incomplete": lambda c: [c["fewshot_config"].pop(k) for k in ("algo", "way")],
        "unknown_algo": lambda c: c["fewshot_config"]["algo"].update(name="r2d2"),
        "no_weights": lambda c: c.pop("state_dict"),
        "weights_only": lambda c: [c.pop(k) for k in ("optimizer_states", "loops")],
    }
    return {
        "ckpt": good,
        "truncated": truncated,
        "foreign": foreign,
        "absent": folder / "no.ckpt",
        **{name: changed_copy(good, folder / f"{name}.ckpt", e) for name, e in edits.items()},
        "metalstm": OLD_CHECKPOINTS / "metalstm.ckpt",
    }


def user_error(check, *args) -> str:
    """The line the entry points print for what `check` raises: a user error, unwrapped as they
    unwrap it (hydra.utils.instantiate wraps a dataset loader's DataError)."""
    with pytest.raises(Exception) as caught:
        check(*args)
    error = errors.user_error(caught.value)
    assert error is not None, repr(caught.value)
    return str(error)


def composition_error(overrides: list[str]) -> str:
    """The line the entry points print for overrides Hydra cannot compose."""
    with pytest.raises(HydraException) as caught:
        compose_train(*overrides)
    return hydra_error_line(caught.value)


# The checks train.py and evaluate.py run, one by one, on train.py's config; the entry points
# themselves run as subprocesses. Each case below runs one of them; together with the
# entry-point cases they cover every path by which a bad input reaches the user.
CHECKS = {
    "compose": composition_error,
    "check_config": lambda o: user_error(check_config, compose_train(*o)),
    "data": lambda o: user_error(lambda: build_datamodule(compose_train(*o)).setup()),
    "resume": lambda o: user_error(
        lambda cfg: check_resumable(cfg, build_module(cfg)), compose_train(*o)
    ),
    "load_checkpoint": lambda o: user_error(load_checkpoint, *o),
}

# (where, overrides, what the one line must say); {tmp} and the `checkpoints` ({ckpt},
# {truncated}, ...) are filled in per run.
BAD_INPUTS = [
    ("train.py", ["algo=nope"], ["algo=nope is not an option", "choose one of: anil, maml"]),
    (
        "compose",
        ["data=nope"],
        [
            "data=nope is not an option",
            "choose one of: cifarfs, fc100, miniimagenet, omniglot, tieredimagenet",
        ],
    ),
    ("compose", ["backbone=resnet"], ["backbone=resnet is not an option", "conv4"]),
    (
        "compose",
        ["experiment=maml_omniglot_5w1S"],
        ["experiment=maml_omniglot_5w1S is not an option", "maml_omniglot_5w1s"],
    ),
    ("compose", ["algo.base_rate=0.1"], ["algo.base_rate is not a config key", "base_lr"]),
    (
        "compose",
        ["algo.vmap_tasks=true"],
        ["algo.vmap_tasks is no longer a config key", "algo.task_batching=vmap or"],
    ),
    ("compose", ["way=[1,"], ["cannot parse the override 'way=[1,'"]),
    ("train.py", ["way=1"], ["way=1 is out of range: expected an integer >= 2"]),
    ("data", ["way=200"], ["way=200 is out of range: expected 2..160", "meta-val split"]),
    ("check_config", ["shot=0"], ["shot=0 is out of range: expected an integer >= 1"]),
    ("check_config", ["query=0"], ["query=0 is out of range: expected an integer >= 1"]),
    (
        "data",
        ["shot=10"],
        ["shot + query = 10 + 15 is out of range: expected at most 20", "lower shot or query"],
    ),
    ("check_config", ["algo.meta_lr=0"], ["algo.meta_lr=0 is out of range: expected a number > 0"]),
    ("check_config", ["algo.base_lr=-0.1"], ["algo.base_lr=-0.1 is out of range", "> 0"]),
    ("check_config", ["algo.inner_steps=0"], ["algo.inner_steps=0 is out of range", ">= 1"]),
    ("check_config", ["algo.inner_steps_test=0"], ["algo.inner_steps_test=0", ">= 1"]),
    ("check_config", ["trainer.max_steps=0"], ["trainer.max_steps=0 is out of range", ">= 1"]),
    ("check_config", ["trainer.val_check_interval=0"], ["trainer.val_check_interval=0", ">= 1"]),
    ("check_config", ["algo.meta_batch_size=0"], ["algo.meta_batch_size=0", ">= 1"]),
    (
        "check_config",
        ["algo.task_batching=batched"],
        ["algo.task_batching='batched' is out of range", "loop or vmap or grouped"],
    ),
    (
        "check_config",
        ["backbone.channels_last=1"],
        ["backbone.channels_last=1", "true, false or auto"],
    ),
    ("check_config", ["algo.checkpoint_inner=1"], ["algo.checkpoint_inner=1", "true or false"]),
    (
        "check_config",
        ["algo.checkpoint_inner=true", "algo.first_order=true"],
        ["algo.checkpoint_inner=true", "algo.first_order=true", "nothing to checkpoint"],
    ),
    (
        "check_config",
        ["algo.checkpoint_inner=true", "algo.task_batching=vmap"],
        ["algo.checkpoint_inner=true cannot run with algo.task_batching=vmap", "or grouped"],
    ),
    (
        "check_config",
        ["trainer.precision=bf16-mixed", "algo.task_batching=vmap"],
        ["trainer.precision=bf16-mixed cannot run with algo.task_batching=vmap", "32-true"],
    ),
    (
        "train.py",
        ["backbone.stride=2"],
        [
            "backbone: block 3 of 4 leaves no spatial size for data.image_size=28",
            "expected data.image_size >= 171 with these, or backbone.stride=1",
        ],
    ),
    (
        "data",
        ["data.root={tmp}/nowhere", "data.download=false", "data.cache_dir={tmp}/cache"],
        ["Omniglot not found under data.root=", "images_background.zip", "data.download=true"],
    ),
    (
        "train.py",
        ["ckpt_path={ckpt}", "way=20"],
        ["ckpt_path={ckpt} does not fit this config: way=20 (checkpoint: 5)", "its overrides"],
    ),
    (
        "resume",
        ["ckpt_path={ckpt}", "backbone.channels=32"],
        ["does not fit this config: backbone.channels=32 (checkpoint: 64)"],
    ),
    ("resume", ["ckpt_path={absent}"], ["ckpt_path={absent} is not a file"]),
    (
        "evaluate.py",
        ["ckpt={ckpt}", "way=20"],
        ["ckpt={ckpt} does not fit this config: way=20 (checkpoint: 5)", "its own way"],
    ),
    ("evaluate.py", ["ckpt={ckpt}", "backbone.channels=32"], ["backbone is not a config key"]),
    ("evaluate.py", [], ["give ckpt=<file> (or a list [a,b]) or run=<run or sweep folder>"]),
    # `+` adds a key to evaluate.py's config; one it does not read would change nothing.
    (
        "evaluate.py",
        ["ckpt={ckpt}", "+anything=1"],
        ["anything is not a config key of evaluate.py, so it would change nothing", "episodes"],
    ),
    (
        "evaluate.py",
        ["ckpt={ckpt}", "+algo.inner_steps=5"],
        ["algo.inner_steps is not a config key of evaluate.py", "algo has: inner_steps_test"],
    ),
    ("evaluate.py", ["ckpt={ckpt}", "++data.split=vinyals"], ["data.split is not a config key"]),
    (
        "evaluate.py",
        ["ckpt={metalstm}", "algo.inner_steps_test=5"],
        ["algo.inner_steps_test is not a setting of this checkpoint's run", "'metalstm'"],
    ),
    (
        "evaluate.py",
        ["ckpt={ckpt}", "algo.batch_norm_test=running"],
        ["algo.batch_norm_test='running' is out of range: expected transductive or support"],
    ),
    ("load_checkpoint", ["{truncated}"], ["ckpt={truncated} cannot be read", "damaged"]),
    ("load_checkpoint", ["{foreign}"], ["ckpt={foreign} was not written by fewshot's train.py"]),
    (
        "evaluate.py",
        ["ckpt={incomplete}"],
        ["ckpt={incomplete} was not written by fewshot's train.py (it lacks way, algo.name)"],
    ),
    (
        "load_checkpoint",
        ["{unknown_algo}"],
        ["ckpt={unknown_algo} is refused", "algo.name='r2d2', which is not an option"],
    ),
    ("load_checkpoint", ["{no_weights}"], ["ckpt={no_weights}", "it lacks state_dict"]),
    (
        "resume",
        ["ckpt_path={weights_only}"],
        ["ckpt_path={weights_only} holds weights but no training state", "cannot resume"],
    ),
]


@pytest.mark.parametrize(
    "where, overrides, message", BAD_INPUTS, ids=[f"{c[0]} {' '.join(c[1])}" for c in BAD_INPUTS]
)
def test_a_bad_input_is_one_clear_line(
    where, overrides, message, checkpoints, quick_overrides, tmp_path
):
    fill = {**{name: str(path) for name, path in checkpoints.items()}, "tmp": str(tmp_path)}
    overrides = [o.format(**fill) for o in overrides]
    message = [m.format(**fill) for m in message]
    if where in CHECKS:
        line = CHECKS[where](
            quick_overrides + overrides if where != "load_checkpoint" else overrides
        )
    else:
        base = quick_overrides if where == "train.py" else ["threads=1"]
        proc = run_script(where, *base, *overrides, f"hydra.run.dir={tmp_path}", expect_ok=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        line = line.removeprefix("error: ")
        assert (proc.stdout + proc.stderr).count(line) == 1  # said once, not also as a log record
    assert "\n" not in line
    for fragment in message:
        assert fragment in line


@pytest.mark.parametrize("script, key", [("evaluate.py", "ckpt"), ("train.py", "ckpt_path")])
def test_a_checkpoint_that_would_run_code_is_refused_unrun(script, key, tmp_path):
    """Opening a shared checkpoint runs nothing: evaluate.py and a resume read it as data."""
    marker = tmp_path / "ran"
    payload = checkpoint_that_runs_code(tmp_path / "checkpoints" / "last.ckpt", marker)
    proc = run_script(
        script, f"{key}={payload}", "threads=1", f"hydra.run.dir={tmp_path}", expect_ok=False
    )
    assert not marker.exists()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {key}={payload} is refused: loading it would call posix.system, which is code, "
        "not data (fewshot reads checkpoints as tensors and plain values only)"
    ]


def test_an_experiment_file_that_is_not_yaml_is_one_line_naming_its_line(tmp_path):
    (tmp_path / "experiment").mkdir()
    broken = tmp_path / "experiment" / "broken.yaml"
    broken.write_text("way: 5\nshot: [1\nalgo:\n  meta_lr: 1\n")
    proc = run_script("train.py", f"--config-dir={tmp_path}", "experiment=broken", expect_ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {broken}, line 3, column 5 is not valid YAML: expected ',' or ']', but got ':' "
        "(while parsing a flow sequence)"
    ]


def test_a_user_error_raised_in_one_of_a_runs_processes_is_still_one_line():
    # torch's launcher passes a child's error on as its traceback's text alone.
    child = "Traceback (most recent call last):\n  ...\nfewshot.errors.TrainingDiverged: diverged at step 2\n"
    passed_on = torch.multiprocessing.ProcessRaisedException(child, 0, 4242)
    assert repr(errors.user_error(passed_on)) == repr(errors.TrainingDiverged("diverged at step 2"))
    crash = torch.multiprocessing.ProcessRaisedException(child.replace("fewshot.errors.", ""), 0, 1)
    assert errors.user_error(crash) is None  # not one of fewshot's: a crash, traceback kept
