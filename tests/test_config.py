"""Every config composes, builds, and bad values are refused naming their key."""

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fewshot import config
from fewshot.config import check_config
from fewshot.errors import ConfigError
from fewshot.evaluation.protocol import protocol
from fewshot.training.build import build_module
from fewshot.training.module import OUTER_LOOP_KEYS
from tests.helpers import compose_train

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds(experiment):
    cfg = compose_train(f"experiment={experiment}")
    check_config(cfg)
    module = build_module(cfg)
    assert module.learner.backbone.head.out_features == cfg.way
    named = re.search(r"_(\d+)w(\d+)s$", experiment)  # a paper preset names its task
    if named:
        assert (cfg.way, cfg.shot) == (int(named[1]), int(named[2]))


def test_experiments_carry_the_papers_settings():
    cfg = compose_train("experiment=maml_omniglot_20w1s")
    assert (cfg.algo.base_lr, cfg.algo.inner_steps, cfg.algo.meta_batch_size) == (0.1, 5, 16)
    assert cfg.data.split == "vinyals"


def test_miniimagenet_experiments_carry_the_papers_settings():
    cfg = compose_train("experiment=metalstm_miniimagenet_5w1s")
    assert (cfg.algo.inner_epochs, cfg.algo.inner_batch_size, cfg.algo.grad_clip) == (12, 5, 0.25)
    assert (cfg.backbone.channels, cfg.data.image_size, cfg.data.channels) == (32, 84, 3)
    assert (cfg.algo.batch_norm_train, cfg.algo.batch_norm_test) == ("transductive", "support")
    cfg = compose_train("experiment=maml_miniimagenet_5w5s")
    assert (cfg.algo.base_lr, cfg.algo.inner_steps, cfg.algo.inner_steps_test) == (0.01, 5, 10)
    assert (cfg.algo.meta_batch_size, cfg.backbone.channels, cfg.query) == (2, 32, 15)


def test_evaluate_config_composes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=["ckpt=some.ckpt", "episodes=100"])
    assert cfg.episodes == 100 and cfg.data.root is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("way=1", "way=1 is out of range"),
        ("shot=0", "shot=0 is out of range"),
        ("query=0", "query=0 is out of range"),
        ("algo.meta_lr=0", "algo.meta_lr=0 is out of range"),
        ("algo.base_lr=-0.1", "algo.base_lr=-0.1 is out of range"),
        ("algo.inner_steps=0", "algo.inner_steps=0 is out of range"),
        ("algo.meta_batch_size=0", "algo.meta_batch_size=0 is out of range"),
        ("trainer.max_steps=10", "trainer.val_check_interval=500 exceeds trainer.max_steps=10"),
        ("way=five", "way='five' is out of range"),
        ("algo=metalstm algo.inner_epochs=0", "algo.inner_epochs=0 is out of range"),
        ("algo=metalstm algo.inner_batch_size=2.5", "algo.inner_batch_size=2.5 is out of range"),
        ("algo=metalstm algo.hidden_size=0", "algo.hidden_size=0 is out of range"),
        ("algo=metalstm algo.grad_clip=-1", "algo.grad_clip=-1 is out of range"),
        ("algo=metalstm algo.learn_init=maybe", "algo.learn_init='maybe' is out of range"),
        ("trainer.precision=16-mixed", "trainer.precision='16-mixed' is out of range"),
        ("algo.batch_norm_test=query", "algo.batch_norm_test='query' is out of range"),
        ("algo.adapt_only=head", "algo.adapt_only='head' is out of range"),
        (
            "backbone.stride=2",
            "backbone: block 3 of 4 leaves no spatial size for data.image_size=28",
        ),
        ("algo.task_batching=vmap algo.compile=true", "algo.compile=true cannot run with algo"),
        ("algo.task_batching=grouped algo.compile=true", "algo.compile=true cannot run with algo"),
    ],
)
def test_out_of_range_values_name_their_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        check_config(compose_train(*override.split()))


def test_bf16_on_a_cpu_that_emulates_it_warns_once(monkeypatch, caplog):
    def warnings():
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

    bf16_on = {
        a: compose_train("trainer.precision=bf16-mixed", f"trainer.accelerator={a}")
        for a in ("cpu", "gpu")
    }
    monkeypatch.setattr(config, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "amx_bf16"}))
    check_config(bf16_on["cpu"])  # native bfloat16
    monkeypatch.setattr(config, "cpu_flags", lambda: frozenset({"avx2"}))
    check_config(bf16_on["gpu"])  # not run on the CPU
    check_config(compose_train("trainer.accelerator=cpu"))  # float32
    monkeypatch.setattr(config, "cpu_flags", lambda: None)  # flags unknown (not Linux)
    check_config(bf16_on["cpu"])
    assert warnings() == []
    monkeypatch.setattr(config, "cpu_flags", lambda: frozenset({"avx2"}))
    check_config(bf16_on["cpu"])
    check_config(bf16_on["cpu"])
    (warning,) = warnings()
    assert warning.startswith("trainer.precision=bf16-mixed on a CPU without native bfloat16")
    assert "is emulated: slower than float32 here" in warning
    assert not re.search(r"\d(\.\d+)?x\b", warning)  # measured ratios drift: they are the docs'


ALGORITHMS = sorted(p.stem for p in (CONF / "algo").glob("*.yaml"))


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_every_learners_protocol_records_its_settings_as_json(algo):
    cfg = compose_train(f"algo={algo}")
    recorded = json.loads(json.dumps(protocol(cfg)))
    assert recorded["algorithm"] == algo
    assert recorded["settings"] == {
        k: v
        for k, v in OmegaConf.to_container(cfg.algo, resolve=True).items()
        if k not in OUTER_LOOP_KEYS and k != "_target_"
    }
