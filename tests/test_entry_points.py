"""train.py and evaluate.py run end to end on the real Omniglot zips, as a user runs them."""

import json
from pathlib import Path

import pytest

from fewshot.checkpoints.reading import load_checkpoint
from tests.helpers import make_miniimagenet, run_script


def test_training_writes_best_and_last_checkpoints_and_tensorboard_events(trained_run):
    assert (trained_run / "checkpoints" / "best.ckpt").is_file()
    last = load_checkpoint(trained_run / "checkpoints" / "last.ckpt")[1]
    assert last["global_step"] == 4
    # last.ckpt is written after the best-model callback: a resumed run remembers its best
    (best_state,) = [v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert best_state["best_model_score"] is not None
    assert last["fewshot_config"]["way"] == 5
    assert list((trained_run / "tensorboard").glob("events.out.tfevents.*"))


def test_evaluate_reports_accuracy_ci_and_protocol_and_another_batch_norm_in_a_file_of_its_own(
    copy_of_trained_run, tmp_path
):
    run = copy_of_trained_run  # evaluate.py writes into the run's eval/
    ckpt = run / "checkpoints" / "best.ckpt"
    proc = run_script("evaluate.py", f"ckpt={ckpt}", "episodes=10", f"hydra.run.dir={tmp_path}")
    own_file = run / "eval" / "best_10ep_seed0.json"
    result = json.loads(own_file.read_text())
    assert result["episodes"] == 10 and 0 <= result["test/acc"] <= 1 and result["test/acc_ci95"] > 0
    assert result["protocol"]["batch_norm"] == "transductive"
    assert result["protocol"]["inner_steps_test"] == 3
    assert "95% CI" in proc.stdout
    own = own_file.read_text()
    proc = run_script(
        "evaluate.py",
        f"ckpt={ckpt}",
        "episodes=10",
        "algo.batch_norm_test=support",
        f"hydra.run.dir={tmp_path}",
    )
    assert "support batch norm" in proc.stdout
    support = json.loads((run / "eval" / "best_bn-support_10ep_seed0.json").read_text())
    assert own_file.read_text() == own  # the run's own, kept
    assert support["protocol"]["batch_norm"] == "support"
    assert support["protocol"]["batch_norm_train"] == "transductive"


def last_checkpoint_accuracy(run: Path, out: Path, *overrides: str) -> float:
    """Test accuracy of evaluate.py on the run's last.ckpt over 6 episodes."""
    run_script(
        "evaluate.py",
        f"ckpt={run}/checkpoints/last.ckpt",
        "episodes=6",
        *overrides,
        f"output={out}",
    )
    return json.loads(out.read_text())["test/acc"]


def test_evaluation_repeats_its_episodes_for_the_same_seed_and_compiled_scores_as_eager(
    trained_run, tmp_path
):
    eager = [last_checkpoint_accuracy(trained_run, tmp_path / f"{n}.json") for n in ("a", "b")]
    assert eager[0] == eager[1]  # the run's own algo.compile=false, twice
    compiled = last_checkpoint_accuracy(trained_run, tmp_path / "c.json", "algo.compile=true")
    # float noise may flip a few of the 6 x 75 queries
    assert compiled == pytest.approx(eager[0], abs=1 / 75)


def test_bf16_evaluation_of_a_float32_run_says_so_in_its_protocol(trained_run, tmp_path):
    out = tmp_path / "bf16.json"
    accuracy = last_checkpoint_accuracy(trained_run, out, "trainer.precision=bf16-mixed")
    assert json.loads(out.read_text())["protocol"]["precision"] == "bf16-mixed"
    assert 0 <= accuracy <= 1


def test_training_resumes_from_a_checkpoint_with_its_step_count(
    trained_run, quick_overrides, tmp_path
):
    run_script(
        "train.py",
        *quick_overrides,
        f"ckpt_path={trained_run}/checkpoints/last.ckpt",
        "trainer.max_steps=6",
        f"hydra.run.dir={tmp_path}",
    )
    last = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")[1]
    assert last["global_step"] == 6


def test_multirun_gives_each_job_its_own_directory(sweep_with_failures):
    sweep_dir, _ = sweep_with_failures
    for job in ("2", "3"):  # the jobs that trained: 0 and 1 asked for a TPU
        assert (sweep_dir / job / "checkpoints" / "best.ckpt").is_file()
        assert list((sweep_dir / job / "tensorboard").glob("events.out.tfevents.*"))


def test_a_bad_value_is_one_line_naming_the_key_not_a_traceback(quick_overrides, tmp_path):
    proc = run_script(
        "train.py", *quick_overrides, "way=1", f"hydra.run.dir={tmp_path}", expect_ok=False
    )
    assert proc.returncode == 2
    assert "error: way=1 is out of range" in proc.stderr
    assert "Traceback" not in proc.stderr


TINY = [
    "trainer.max_steps=2",
    "trainer.val_check_interval=1",
    "val_episodes=2",
    "threads=1",
    "trainer.enable_progress_bar=false",
    "test_after_training=false",  # 600 test episodes; tests/test_first_hour.py has it on
]


@pytest.fixture(scope="module")
def miniimagenet_root(tmp_path_factory) -> Path:
    """Generated JPEGs in the images/ + split CSV layout, with classes enough for 5-way tasks."""
    return make_miniimagenet(tmp_path_factory.mktemp("miniimagenet"), "csv", classes=(6, 5, 5))


@pytest.fixture(scope="module")
def miniimagenet(miniimagenet_root) -> list[str]:
    """The generated data (not the paper's classes: split `any`), at a size and width that keep
    a CPU step well under a second."""
    return [
        f"data.root={miniimagenet_root}",
        "data.split=any",
        "data.image_size=28",
        "backbone.channels=8",
        "query=5",
    ]


@pytest.mark.slow  # trains through train.py, though on generated data (pyproject's markers)
def test_metalstm_trains_on_miniimagenet_and_evaluates(miniimagenet, tmp_path):
    run_script(
        "train.py",
        "algo=metalstm",
        "data=miniimagenet",
        "way=5",
        "shot=5",
        *miniimagenet,
        *TINY,
        f"hydra.run.dir={tmp_path}",
    )
    out = tmp_path / "result.json"
    proc = run_script(
        "evaluate.py", f"ckpt={tmp_path}/checkpoints/best.ckpt", "episodes=4", f"output={out}"
    )
    protocol = json.loads(out.read_text())["protocol"]
    assert (protocol["dataset"], protocol["algorithm"]) == ("miniimagenet", "metalstm")
    assert (protocol["inner_epochs"], protocol["inner_batch_size"]) == (8, 25)
    assert protocol["batch_norm"] == "support"
    assert "metalstm inner_epochs=8 inner_batch_size=25" in proc.stdout
    # A MAML-family setting refused for a Meta-LSTM checkpoint: tests/test_bad_inputs.py


@pytest.mark.parametrize(
    "overrides",
    [["experiment=maml_miniimagenet_5w1s"], ["algo=metalstm", "data=omniglot", "way=5", "shot=1"]],
    ids=["maml-miniimagenet", "metalstm-omniglot"],
)
def test_any_algorithm_trains_on_any_dataset(
    overrides, miniimagenet, omniglot_root, omniglot_cache, tmp_path
):
    if "data=omniglot" in overrides:
        data = [f"data.root={omniglot_root}", f"data.cache_dir={omniglot_cache}"]
        data += ["backbone.channels=8", "query=5"]
    else:
        data = miniimagenet
    run_script("train.py", *overrides, *data, *TINY, f"hydra.run.dir={tmp_path}")
    last = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")[1]
    assert last["global_step"] == 2
