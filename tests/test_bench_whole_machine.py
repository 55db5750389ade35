"""bench/whole_machine.py: the steady-state fit, the ratios and the table, its arguments and the
commands it runs; no timing is asserted."""

import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from bench import whole_machine as wm
from bench.speed import STRIDED

REPO = Path(__file__).resolve().parents[1]


def test_steady_state_is_the_line_through_two_run_lengths():
    per_unit, startup = wm.steady_state((5, 8.0 + 5 * 0.4), (25, 8.0 + 25 * 0.4))
    assert per_unit == pytest.approx(0.4) and startup == pytest.approx(8.0)
    with pytest.raises(ValueError, match="two run lengths"):
        wm.steady_state((5, 10.0), (5, 11.0))


def test_best_threads_has_the_lowest_median_and_the_fewer_threads_on_a_tie():
    assert wm.best_threads({1: [1.0, 1.0, 9.0], 2: [0.9, 0.8, 0.9]}) == 2
    assert wm.best_threads({2: [0.5], 1: [0.5]}) == 1


def test_paired_ratio_is_the_median_of_each_rounds_ratio():
    assert wm.paired_ratio([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]) == 2.0
    assert wm.paired_ratio([1.0, 2.0], [0.5, 0.5]) == 3.0  # median of 2x and 4x
    with pytest.raises(ValueError):
        wm.paired_ratio([1.0], [1.0, 2.0])


def finished(units: int, per_unit: float, startup: float, cores: float, processes: int):
    wall = startup + units * per_unit
    return wm.Finished(wall=wall, cpu=startup + units * per_unit * cores, processes=processes)


def sitting_results(default_s: float = 0.5, rounds: int = 3) -> wm.Results:
    """A sitting whose steady states are known: the reference 1.0 s/iter at 1 thread, 0.8 at 2;
    fewshot's default `default_s`, at threads=1 1.25; test episodes a tenth of that."""
    results = wm.Results()
    for _ in range(rounds):
        for threads, s in ((1, 1.0), (2, 0.8)):
            results.add(
                wm.Job(wm.REFERENCE, threads=threads),
                {
                    "threads": threads,
                    "s_train": s,
                    "s_test": s / 10,
                    "startup": 2.0,
                    "busy_train": float(threads),
                    "busy_test": float(threads),
                    "wait_policy": "PASSIVE",
                },
            )
        for row, s, cores, processes in (
            (wm.DEFAULT, default_s, 1.9, 3),
            (wm.ONE_THREAD, 1.25, 1, 1),
        ):
            for n in (5, 25):
                results.add(wm.Job(row, wm.TRAIN, n), finished(n, s, 9.0, cores, processes))
            for n in (20, 220):
                results.add(wm.Job(row, wm.TEST, n), finished(n, s / 10, 7.0, cores, processes))
    return results


ARGS = Namespace(steps=[5, 25], episodes=[20, 220])


def test_report_gives_steady_states_start_ups_and_ratios_against_the_floors():
    lines = wm.report(sitting_results(), ARGS, busy=False)
    text = "\n".join(lines)
    best = next(line for line in lines if line.startswith("reference, best (2 thr.)"))
    assert best.split()[4:6] == ["0.800", "12.5"]  # s/iter; test episodes/s
    default = next(line for line in lines if line.startswith(wm.DEFAULT))
    # s/iter, episodes/s, start-ups (train, test), cores busy in the steady state (train, test)
    assert default.split()[2:] == ["0.500", "20.0", "9.0", "7.0", "1.90", "1.90"]
    assert "1.60x (rounds 1.60-1.60)  floor 1.6x (idle 2-core machine): met" in text
    assert "floor 1.7x (idle 2-core machine): NOT met" in text  # test: 1.6x as well
    assert "train per core, threads=1 / reference at 1    0.80x" in text
    assert "threads not given (fewshot's default); processes at once, train / test: 3 / 3" in text
    assert "one process, torch threads 2, OMP_WAIT_POLICY=PASSIVE" in text


def test_report_beside_a_busy_neighbour_holds_fewshot_to_1x():
    text = "\n".join(wm.report(sitting_results(default_s=0.9), ARGS, busy=True))
    assert "0.89x (rounds 0.89-0.89)  floor 1.0x (beside a busy neighbour): NOT met" in text


def test_a_steady_state_lost_in_the_noise_reads_not_available():
    results = sitting_results()
    long = results.fewshot[wm.DEFAULT, wm.TRAIN, 25]
    results.fewshot[wm.DEFAULT, wm.TRAIN, 25] = [
        wm.Finished(f.wall - 20.0, f.cpu, f.processes) for f in long
    ]  # the longer run took less time than the shorter
    lines = wm.report(results, ARGS, busy=False)
    train_ratio = next(line for line in lines if line.startswith("  train, fewshot default"))
    assert "n/a" in train_ratio and "floor" not in train_ratio
    default = next(line for line in lines if line.startswith(wm.DEFAULT))
    assert default.split()[-2] == "n/a"  # no cores busy without a steady state


def test_rounds_alternate_and_reverse_every_other_round(monkeypatch, tmp_path):
    order = []

    def reference(bench, job, iters, episodes):
        order.append(job.label)
        return {"s_train": 1.0, "s_test": 0.1}

    def fewshot(bench, job):
        order.append(job.label)
        return wm.Finished(10.0, 10.0, 1)

    monkeypatch.setattr(wm, "run_reference", reference)
    monkeypatch.setattr(wm, "run_fewshot", fewshot)
    args = Namespace(
        rounds=3,
        reference_threads=[1, 2],
        steps=[5, 25],
        episodes=[20, 220],
        reference_iters=1,
        reference_episodes=1,
    )
    results = wm.measure(args, wm.Bench(tmp_path, tmp_path, {}), say=lambda line: None)
    jobs = [job.label for job in wm.round_jobs([1, 2], [5, 25], [20, 220])]
    assert order == jobs + jobs[::-1] + jobs
    assert jobs[:2] == ["reference at 1 thread(s)", "reference at 2 thread(s)"]
    assert len(results.reference[2]) == 3 and len(results.fewshot[wm.DEFAULT, wm.TEST, 220]) == 3


def omniglot(tmp_path: Path) -> Path:
    (tmp_path / "images_background.zip").touch()
    (tmp_path / "images_evaluation").mkdir()
    return tmp_path


def test_arguments_default_to_every_thread_count_and_resolve_the_data_root(tmp_path):
    args = wm.parse(["--data-root", str(omniglot(tmp_path))], cores=2)
    assert args.reference_threads == [1, 2] and args.data_root == tmp_path.resolve()
    assert args.steps == [5, 30] and args.episodes == [20, 420] and not args.beside_busy


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: --data-root"),
        (["--data-root", "{empty}"], "no images_background or images_evaluation"),
        (["--data-root", "{data}", "--steps", "25", "5"], "--steps 25 5: two counts"),
        (["--data-root", "{data}", "--episodes", "1", "10"], "at least 2 episodes"),
        (["--data-root", "{data}", "--rounds", "0"], "--rounds must be at least 1"),
        (["--data-root", "{data}", "--reference-threads", "0"], "thread counts are at least 1"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "data").mkdir()
    folders = {"{empty}": str(tmp_path / "empty"), "{data}": str(omniglot(tmp_path / "data"))}
    with pytest.raises(SystemExit) as exit_:
        wm.parse([folders.get(a, a) for a in argv], cores=2)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_fewshot_runs_as_a_user_runs_it_in_the_benchs_own_folders(tmp_path):
    bench = wm.Bench(Path("/data/omniglot"), tmp_path, {})
    default = bench.train_command(25, None, tmp_path / "run")
    assert default[1] == str(REPO / "train.py")
    assert not any(a.startswith("threads=") for a in default)  # the default
    assert {"trainer.max_steps=25", "test_after_training=false", "backbone.stride=2"} <= set(
        default
    )
    assert f"hydra.run.dir={tmp_path / 'run'}" in default
    assert f"data.cache_dir={tmp_path / 'cache'}" in default
    assert "threads=1" in bench.train_command(25, 1, tmp_path / "run")
    evaluate = bench.evaluate_command(220, None, tmp_path / "ev")
    assert f"ckpt={bench.checkpoint}" in evaluate and "episodes=220" in evaluate
    assert not any(a.startswith("threads=") for a in evaluate)
    assert "threads=1" in bench.checkpoint_command()  # untimed: one process writes the checkpoint


def test_the_workload_is_the_strided_omniglot_net_of_bench_speed():
    assert {**wm.NET, "channels_last": "auto"} == STRIDED
    assert "algo.inner_steps=5" in wm.WORKLOAD and "algo.meta_batch_size=8" in wm.WORKLOAD


def test_children_get_no_thread_count_and_passive_waits_unless_set():
    env = wm.child_environment({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/bin"})
    assert env == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    assert wm.child_environment({"OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_reference_child_reports_its_steady_state_and_start_up():
    threads = torch.get_num_threads()
    try:
        result = wm.reference_child(threads=1, iters=1, episodes=1, launched=time.time() - 5)
    finally:
        torch.set_num_threads(threads)
    assert result["threads"] == 1 and result["startup"] >= 5
    assert result["s_train"] > 0 and result["s_test"] > 0 and result["busy_train"] > 0


def test_neighbour_seconds_and_the_process_tree():
    assert wm.seconds_listed("ready\n0.71\n0.69\n") == [0.71, 0.69]
    assert wm.descendants(os.getpid()) >= 1


def test_speed_runs_as_a_script_from_anywhere_and_names_the_whole_machine_mode(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "speed.py"), "--whole-machine"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "--whole-machine: error: the following arguments are required: --data-root" in out.stderr


def test_a_run_names_its_processes_from_its_own_log():
    log = "[2026][__main__][INFO] - MAML: 1 meta-parameters\n[2026][__main__][INFO] - 2 processes of 1 CPU thread each\n"
    assert wm.Finished(1.0, 1.0, 1, log).says == "2 processes of 1 CPU thread each"
    assert wm.Finished(1.0, 1.0, 1, "nothing about it").says is None
