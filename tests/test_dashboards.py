"""TensorBoard shows each run's hyperparameters beside its final metrics, accuracy against the
inner step, and a labelled training episode; read back with TensorBoard's own readers."""

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
from tensorboard.plugins.hparams import plugin_data_pb2

from fewshot.experiments.runs import Run
from fewshot.training.dashboards import INNER_STEP_DIR, INNER_STEP_TAG, episode_grid, flat_hparams


def test_hparams_are_flattened_to_the_names_users_override():
    flat = flat_hparams({"way": 5, "algo": {"meta_lr": 1e-3, "grad_clip": None}, "ckpt_path": None})
    assert flat == {"way": 5, "algo.meta_lr": 1e-3, "algo.grad_clip": "None", "ckpt_path": "None"}


def test_episode_grid_puts_each_class_on_its_own_row_support_left_query_right():
    way, shot, query, size = 3, 2, 4, 28
    # Every image of class c is the flat grey level 0.2 + 0.3 c; labels arrive shuffled.
    support_y, query_y = torch.tensor([2, 0, 1, 1, 0, 2]), torch.tensor([1, 0, 2] * query)
    support_x = (0.2 + 0.3 * support_y.float()).view(-1, 1, 1, 1).expand(-1, 1, size, size)
    query_x = (0.2 + 0.3 * query_y.float()).view(-1, 1, 1, 1).expand(-1, 1, size, size)
    grid = episode_grid(support_x, support_y, query_x, query_y)
    assert grid.dtype == torch.uint8 and grid.shape[0] == 3
    tile = size * 2 + 2  # scaled up to at least 56 pixels, plus make_grid's padding
    header, support_width = 16, shot * tile + 2
    for row in range(way):
        y = header + 2 + row * tile + tile // 2
        expected = round(255 * (0.2 + 0.3 * row))
        support_centres = [2 + i * tile + tile // 2 for i in range(shot)]
        query_centres = [support_width + 12 + 2 + i * tile + tile // 2 for i in range(query)]
        for x in support_centres + query_centres:
            assert abs(int(grid[0, y, x]) - expected) <= 1, (row, x)
    assert grid[:, header + 3, 2 + 11].tolist() == [255, 220, 0]  # a label's mark


@pytest.fixture(scope="module")
def completed_runs(sweep_with_failures):
    sweep_dir, _ = sweep_with_failures
    return sweep_dir, [d.parent for d in sorted(sweep_dir.glob("*/checkpoints"))]


def hparams_plugin_data(accumulator: EventAccumulator) -> dict:
    return {
        tag: plugin_data_pb2.HParamsPluginData.FromString(content)
        for tag, content in accumulator.PluginTagToContent("hparams").items()
    }


def test_each_run_logs_its_hyperparameters_with_its_final_metrics(completed_runs):
    _, runs = completed_runs
    assert len(runs) == 2
    for run in runs:
        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        data = hparams_plugin_data(events)
        declared = {m.name.tag for m in data["_hparams_/experiment"].experiment.metric_infos}
        assert declared == {"hp/val_acc_best", "hp/val_acc", "hp/train_loss"}
        hparams = data["_hparams_/session_start_info"].session_start_info.hparams
        overrides = OmegaConf.load(run / ".hydra" / "overrides.yaml")
        meta_lr = next(float(o.split("=")[1]) for o in overrides if o.startswith("algo.meta_lr="))
        assert hparams["algo.meta_lr"].number_value == pytest.approx(meta_lr)
        assert hparams["algo.base_lr"].number_value == 0.4
        assert hparams["data.name"].string_value == "omniglot"
        best = events.Scalars("hp/val_acc_best")
        assert best[-1].value == pytest.approx(Run(run).read_result()["val/acc"])
        assert best[-1].step == 4


def test_a_sweep_shows_one_hparams_session_per_completed_job(completed_runs):
    sweep_dir, runs = completed_runs
    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(sweep_dir))
    multiplexer.Reload()
    sessions = multiplexer.PluginRunToTagToContent("hparams")
    assert sorted(sessions) == sorted(f"{r.name}/tensorboard" for r in runs)


def test_validation_accuracy_is_logged_against_the_inner_step(completed_runs):
    _, runs = completed_runs
    events = EventAccumulator(str(runs[0] / "tensorboard"))
    events.Reload()
    curves = EventAccumulator(str(runs[0] / "tensorboard" / INNER_STEP_DIR))
    curves.Reload()
    curve = curves.Scalars(INNER_STEP_TAG.format(step=4))  # the validation after 4 meta-steps
    assert [e.step for e in curve] == [0, 1, 2, 3]  # before adaptation, then 3 test-time steps
    per_step = [events.Scalars(f"val/acc_step{k}")[-1].value for k in range(4)]
    assert [e.value for e in curve] == pytest.approx(per_step)


def test_the_first_training_episode_is_logged_as_an_image(completed_runs):
    _, runs = completed_runs
    events = EventAccumulator(str(runs[0] / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    (image,) = events.Images("episode/train")
    # 5 classes of 1 support + 15 query images of 28 pixels scaled to 56, one row per class
    assert image.height == 16 + 5 * 58 + 2
    assert image.width == (1 * 58 + 2) + 12 + (15 * 58 + 2)
