"""A checkpoint's stored config is data: nothing in it is imported, called or resolved, on any
route that reads one; fewshot's own checkpoints, old and new, still load."""

import copy
import re
import sys
import uuid
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from fewshot.checkpoints.format import PAST_TARGETS, options, upgraded
from fewshot.checkpoints.reading import load_checkpoint
from fewshot.config import resolved_config
from fewshot.errors import ConfigError, DataError
from fewshot.evaluation.predict import Predictor
from fewshot.evaluation.protocol import restored_module
from fewshot.training.build import build_module
from tests.helpers import CONF, OLD_CHECKPOINTS, compose_train, run_script


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A module of the test's own that records its import (and any call) in a marker file:
    a config that names it and is acted on leaves the marker behind."""
    name = f"fewshot_probe_{uuid.uuid4().hex[:8]}"
    folder, marker = tmp_path / "probe", tmp_path / "probe_ran"
    folder.mkdir()
    (folder / f"{name}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n"
        "def touch(*args, **kwargs):\n    return None\n"
        "class Thing:\n    def __init__(self, *args, **kwargs):\n        pass\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", str(folder))  # the scripts' children import from here too
    yield name, marker
    sys.modules.pop(name, None)


def test_the_probe_records_its_import_when_hydra_instantiates_it(probe):
    """The control for the tests below: acted on as the stored config used to be, the probe
    leaves its marker."""
    name, marker = probe
    hydra.utils.instantiate({"_target_": f"{name}.touch"})
    assert marker.read_text() == "imported"


def plant(config: dict, key: str, value) -> dict:
    """A copy of a stored config with `value` at the dotted `key`."""
    config = copy.deepcopy(config)
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return config


# (where, what is planted, the key the refusal names): every place a stored config reaches
# Hydra's instantiate, an import or a resolver.
PAYLOADS = [
    ("algo._target_", "{probe}.Thing", "algo._target_"),
    ("data._target_", "{probe}.touch", "data._target_"),
    ("backbone._target_", "{probe}.Thing", "backbone._target_"),
    (
        "algo.meta_lr_schedule",
        {"_target_": "{probe}.touch", "_partial_": True},
        "algo.meta_lr_schedule._target_",
    ),
    (
        "algo.meta_lr_schedule",
        {
            "_target_": "pathlib.Path.write_text",
            "_args_": [{"_target_": "{probe}.Thing"}, "owned"],
        },
        "algo.meta_lr_schedule._args_",
    ),
    (
        "algo.meta_lr_schedule",
        {
            "_target_": "torch.optim.lr_scheduler.StepLR",
            "_partial_": True,
            "step_size": {"_target_": "{probe}.touch"},
        },
        "algo.meta_lr_schedule.step_size._target_",
    ),
    ("trainer.plugins", {"_target_": "{probe}.Thing"}, "trainer.plugins._target_"),
    ("algo._recursive_", True, "algo._recursive_"),
    ("seed", "${oc.env:HOME}", "seed"),
    ("data.root", "${{probe}:x}", "data.root"),
    ("algo.name", "../../../{probe}", "algo.name"),
    ("data.name", "{probe}", "data.name"),
    ("backbone.name", "resnet99", "backbone.name"),
]


def filled(value, probe_name: str):
    """The payload with the probe's module name in every string."""
    if isinstance(value, dict):
        return {k: filled(v, probe_name) for k, v in value.items()}
    if isinstance(value, list):
        return [filled(v, probe_name) for v in value]
    return value.replace("{probe}", probe_name) if isinstance(value, str) else value


def evil_checkpoint(path: Path, key: str, value) -> Path:
    """A real fewshot checkpoint (a committed one) with `value` planted at `key` of its config."""
    checkpoint = torch.load(OLD_CHECKPOINTS / "maml.ckpt", map_location="cpu", weights_only=True)
    checkpoint["fewshot_config"] = plant(checkpoint["fewshot_config"], key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("key, value, named", PAYLOADS, ids=[p[2] for p in PAYLOADS])
def test_a_planted_stored_config_is_refused_naming_its_key_and_nothing_is_imported(
    probe, tmp_path, key, value, named
):
    name, marker = probe
    ckpt = evil_checkpoint(tmp_path / "shared" / "best.ckpt", key, filled(value, name))
    before = files_under(tmp_path / "shared")
    with pytest.raises(
        ConfigError, match=f"ckpt={re.escape(str(ckpt))} is refused: .*{re.escape(named)}="
    ) as err:
        load_checkpoint(ckpt)
    assert "\n" not in str(err.value)
    assert not marker.exists() and name not in sys.modules
    assert files_under(tmp_path / "shared") == before


def test_predictor_from_checkpoint_refuses_a_planted_config(probe, tmp_path):
    name, marker = probe
    ckpt = evil_checkpoint(tmp_path / "best.ckpt", "backbone._target_", f"{name}.Thing")
    with pytest.raises(ConfigError, match=r"backbone\._target_"):
        Predictor.from_checkpoint(ckpt)
    assert not marker.exists() and name not in sys.modules


SCHEDULE_PAYLOAD = {"_target_": "{probe}.touch", "_partial_": True}


def script_route(route: str, ckpt: Path, tmp_path: Path) -> list[str]:
    """The command line that opens `ckpt` on `route` (evaluate.py's ckpt= and run=, predict.py,
    train.py resuming), with Hydra's own folder in tmp_path."""
    hydra_dir = f"hydra.run.dir={tmp_path / 'hydra'}"
    if route == "evaluate ckpt=":
        return ["evaluate.py", f"ckpt={ckpt}", "episodes=4", hydra_dir]
    if route == "evaluate run=":  # its table, which says why the run has no score, apart
        table = f"output={tmp_path / 'table.md'}"
        return ["evaluate.py", f"run={ckpt.parent.parent}", "episodes=4", table, hydra_dir]
    if route == "predict":
        support = tmp_path / "support"
        for c in range(5):
            (support / f"c{c}").mkdir(parents=True)
            Image.new("L", (28, 28), 255 * (c % 2)).save(support / f"c{c}" / "a.png")
        return [
            "predict.py",
            f"ckpt={ckpt}",
            f"support={support}",
            f"query={support / 'c0'}",
            hydra_dir,
        ]
    return [
        "train.py",
        f"ckpt_path={ckpt}",
        "threads=1",
        "trainer.enable_progress_bar=false",
        hydra_dir,
    ]


@pytest.mark.parametrize(
    "route", ["evaluate ckpt=", "evaluate run=", "predict", "train ckpt_path="]
)
def test_every_script_refuses_a_planted_checkpoint_in_one_line_and_changes_nothing(
    probe, tmp_path, route
):
    name, marker = probe
    run = tmp_path / "shared_run"
    ckpt = run / "checkpoints" / ("last.ckpt" if route.startswith("train") else "best.ckpt")
    evil_checkpoint(ckpt, "algo.meta_lr_schedule", filled(SCHEDULE_PAYLOAD, name))
    before = files_under(run)
    proc = run_script(*script_route(route, ckpt, tmp_path), expect_ok=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    said = errors[-1] if errors else ""
    if route == "evaluate run=":
        assert str(ckpt) in said
        said = (tmp_path / "table.md").read_text()
    assert "algo.meta_lr_schedule._target_" in said, proc.stderr[-2000:]
    assert not marker.exists()
    assert files_under(run) == before


def a_checkpoint_of_today(algo: str) -> dict:
    """What train.py stores for `algo` today (Lightning's keys less the optimiser's)."""
    cfg = compose_train(f"algo={algo}")
    module = build_module(cfg)
    checkpoint = {"state_dict": module.state_dict(), "global_step": 0}
    module.on_save_checkpoint(checkpoint)
    return checkpoint


@pytest.mark.parametrize("algo", options("algo"))
def test_a_checkpoint_written_today_loads_and_rebuilds_its_module(algo, tmp_path):
    path = tmp_path / f"{algo}.ckpt"
    torch.save(a_checkpoint_of_today(algo), path)
    stored, checkpoint = load_checkpoint(path)
    assert stored.algo.name == algo and stored.backbone.name == "conv4"
    module = restored_module(stored, checkpoint, path)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in checkpoint["state_dict"].items())


def test_mamlpps_stored_schedule_is_rebuilt_from_torchs_scheduler_module(tmp_path):
    path = tmp_path / "mamlpp.ckpt"
    torch.save(a_checkpoint_of_today("mamlpp"), path)
    stored, _ = load_checkpoint(path)
    scheduler = build_module(stored).configure_optimizers()["lr_scheduler"]
    assert type(scheduler) is torch.optim.lr_scheduler.CosineAnnealingLR
    assert scheduler.T_max == stored.trainer.max_steps


@pytest.mark.parametrize("path", sorted(OLD_CHECKPOINTS.glob("*.ckpt")), ids=lambda p: p.stem)
def test_committed_checkpoints_take_fewshots_own_components(path):
    stored, _ = load_checkpoint(path)
    for group in PAST_TARGETS:
        assert stored[group]._target_ == PAST_TARGETS[group][stored[group].name][0]


@pytest.mark.parametrize("group", list(PAST_TARGETS))
def test_every_option_has_its_own_target_first_in_the_table_of_past_targets(group):
    """A component that moves must keep its old path in the table: this fails until the
    table's first entry is the new one."""
    assert sorted(PAST_TARGETS[group]) == options(group)
    for name in options(group):
        own = OmegaConf.load(CONF / group / f"{name}.yaml").get("_target_")
        if own is not None:  # anil takes maml's through its defaults list
            assert PAST_TARGETS[group][name][0] == own


def test_a_past_target_of_the_option_is_accepted_and_replaced_by_fewshots_own(monkeypatch):
    config = resolved_config(compose_train())
    config["algo"]["_target_"] = "fewshot.algorithms.maml.MAML"  # as if it had moved
    monkeypatch.setitem(
        PAST_TARGETS["algo"], "maml", ("fewshot.methods.maml.MAML", config["algo"]["_target_"])
    )
    assert upgraded(config).algo._target_ == "fewshot.methods.maml.MAML"


def test_a_target_of_another_option_is_refused_naming_fewshots_own():
    config = plant(
        resolved_config(compose_train()), "algo._target_", "fewshot.methods.metalstm.MetaLSTM"
    )
    with pytest.raises(
        ConfigError,
        match=r"algo\._target_=.*MetaLSTM.*fewshot's own: fewshot\.methods\.maml\.MAML",
    ):
        upgraded(config)


@pytest.mark.parametrize("vmap, batching", [(True, "vmap"), (False, "loop")])
def test_a_stored_config_with_vmap_tasks_runs_its_tasks_as_it_did(vmap, batching):
    stored = resolved_config(compose_train())  # as a checkpoint holds it
    stored["algo"].pop("task_batching")
    stored["algo"]["vmap_tasks"] = vmap
    assert upgraded(stored).algo.task_batching == batching
    assert "vmap_tasks" not in upgraded(stored).algo


@pytest.mark.parametrize(
    "entry, state",
    [("state_dict", ("state_dict",)), ("optimizer_states", ("state_dict", "optimizer_states"))],
)
def test_a_checkpoint_holding_nan_is_refused_naming_the_tensor(tmp_path, entry, state):
    checkpoint = torch.load(OLD_CHECKPOINTS / "maml.ckpt", map_location="cpu", weights_only=True)
    if entry == "state_dict":
        name = next(iter(checkpoint["state_dict"]))
        checkpoint["state_dict"][name] = torch.full_like(
            checkpoint["state_dict"][name], float("nan")
        )
    else:
        moments = checkpoint["optimizer_states"][0]["state"][0]
        moments["exp_avg"] = moments["exp_avg"] * float("inf")
    path = tmp_path / "diverged.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(DataError, match=rf"ckpt={path} is refused: {entry}\..* NaN or infinite"):
        load_checkpoint(path, state=state)


def test_a_run_folders_overrides_are_read_as_text_never_resolved(tmp_path, monkeypatch):
    from fewshot.experiments.runs import Run

    monkeypatch.setenv("FEWSHOT_TEST_SECRET", "hunter2")
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text(
        "- seed=${oc.env:FEWSHOT_TEST_SECRET}\n- hydra.run.dir=outputs/${now:%H}\n"
    )
    assert Run(tmp_path).overrides() == [
        "seed=${oc.env:FEWSHOT_TEST_SECRET}",
        "hydra.run.dir=outputs/${now:%H}",
    ]


@pytest.mark.parametrize("algo", ["maml", "metasgd", "mamlpp", "metalstm"])
def test_a_checkpoint_written_before_the_learners_moved_still_loads(algo, tmp_path):
    """Written when the methods lived in fewshot.learners: the old target is in the table."""
    checkpoint = a_checkpoint_of_today(algo)
    old = PAST_TARGETS["algo"][algo][0].replace("fewshot.methods.", "fewshot.learners.")
    checkpoint["fewshot_config"]["algo"]["_target_"] = old
    torch.save(checkpoint, tmp_path / "old.ckpt")
    stored, _ = load_checkpoint(tmp_path / "old.ckpt")
    assert stored.algo._target_ == PAST_TARGETS["algo"][algo][0]
