"""Each component declares its settings beside its code, and fewshot.config checks a run's config
against those of the components it names: a new method or backbone brings its own ranges, and
fewshot/config.py does not change."""

from pathlib import Path
from typing import ClassVar

import pytest
from omegaconf import OmegaConf, open_dict

from fewshot import config
from fewshot.config import check_config, declared_settings, learner_from
from fewshot.errors import ConfigError
from fewshot.methods.maml import MAML
from fewshot.methods.mamlpp import MAMLPlusPlus
from fewshot.methods.metalstm import MetaLSTM
from fewshot.models.conv4 import Conv4
from fewshot.settings import POSITIVE, Rule, int_at_least
from fewshot.training.module import OUTER_LOOP_KEYS
from tests.helpers import compose_train, small_backbone
from tests.methods.nearest_centroid import NearestCentroid

CONF = Path(__file__).resolve().parents[1] / "conf"
ALGORITHMS = sorted(p.stem for p in (CONF / "algo").glob("*.yaml"))


class ScaledCentroids(NearestCentroid):
    """A method that exists only here: nearest centroids with a temperature, which it declares
    with its range beside its code; fewshot.config knows nothing of it."""

    settings: ClassVar[dict[str, Rule]] = {"way": int_at_least(2), "temperature": POSITIVE}

    def __init__(self, backbone, way: int, temperature: float) -> None:
        super().__init__(backbone, way)
        self.temperature = temperature


class NarrowConv4(Conv4):
    """A backbone that exists only here: Conv4 of at most 8 channels, on images from 10 px."""

    settings: ClassVar[dict[str, Rule]] = {
        **Conv4.settings,
        "channels": ((lambda v: v in range(1, 9)), "an integer 1..8"),
    }

    @classmethod
    def check_fits(cls, backbone, image_size: int) -> None:
        if image_size < 10:
            raise ConfigError(f"data.image_size={image_size} is too small for NarrowConv4")


def with_method(cfg, target: type, **settings):
    """`cfg` with an `algo` that names `target` and holds the outer loop's keys and `settings`."""
    outer = {k: v for k, v in cfg.algo.items() if k in OUTER_LOOP_KEYS}
    with open_dict(cfg):
        cfg.algo = {**outer, "_target_": f"{target.__module__}.{target.__qualname__}", **settings}
    return cfg


def test_a_setting_a_method_class_declares_is_checked_naming_its_key():
    assert "inner_steps" in MAML.settings and "algo.inner_steps" not in config.RULES
    with pytest.raises(ConfigError, match=r"^algo\.inner_steps=0 is out of range: expected an "):
        check_config(compose_train("algo.inner_steps=0"))
    # Declared by MAML++ alone, checked where MAML++ runs.
    assert "msl_iterations" in MAMLPlusPlus.settings and "msl_iterations" not in MAML.settings
    with pytest.raises(ConfigError, match=r"^algo\.msl_iterations=-1 is out of range"):
        check_config(compose_train("algo=mamlpp", "algo.msl_iterations=-1"))
    with pytest.raises(ConfigError, match=r"^algo\.inner_batch_size=0 is out of range"):
        check_config(compose_train("algo=metalstm", "algo.inner_batch_size=0"))


def test_a_method_defined_outside_fewshot_has_its_own_settings_checked():
    good = with_method(compose_train("way=3"), ScaledCentroids, way=3, temperature=0.5)
    check_config(good)
    assert declared_settings(good)["algo.temperature"] == POSITIVE
    assert "algo.base_lr" not in declared_settings(good)  # MAML's, not this method's
    learner = learner_from(good.algo, small_backbone(classes=3))
    assert isinstance(learner, ScaledCentroids) and learner.temperature == 0.5
    bad = with_method(compose_train("way=3"), ScaledCentroids, way=3, temperature=0)
    with pytest.raises(ConfigError, match=r"^algo\.temperature=0 is out of range: expected a nu"):
        check_config(bad)


def test_a_backbone_defined_outside_fewshot_has_its_settings_and_geometry_checked():
    target = f"{NarrowConv4.__module__}.{NarrowConv4.__qualname__}"
    check_config(compose_train(f"backbone._target_={target}", "backbone.channels=8"))
    with pytest.raises(ConfigError, match=r"^backbone\.channels=64 is out of range: expected an "):
        check_config(compose_train(f"backbone._target_={target}"))
    with pytest.raises(ConfigError, match=r"^data\.image_size=9 is too small for NarrowConv4"):
        check_config(
            compose_train(f"backbone._target_={target}", "backbone.channels=8", "data.image_size=9")
        )


def test_a_target_that_names_no_class_is_refused_naming_its_key():
    with pytest.raises(ConfigError, match=r"^algo\._target_='fewshot\.methods\.maml\.NoSuch'"):
        check_config(compose_train("algo._target_=fewshot.methods.maml.NoSuch"))


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_every_algo_key_is_declared_by_its_method_or_the_outer_loop(algo):
    """Nothing goes unchecked: each key of conf/algo/<algo>.yaml is the learner's declared
    setting or the outer loop's, and the learner declares no key the option lacks."""
    cfg = compose_train(f"algo={algo}")
    method = config.component_class(cfg, "algo")
    learner_keys = set(cfg.algo) - {"_target_", *OUTER_LOOP_KEYS}
    assert learner_keys == set(method.settings)


def test_every_backbone_key_a_run_chooses_is_declared_by_conv4():
    backbone = OmegaConf.to_container(compose_train().backbone, resolve=False)
    following = {"name", "_target_", "in_channels", "image_size", "num_classes"}  # the data's
    assert set(backbone) - following <= set(Conv4.settings)
    with pytest.raises(ConfigError, match=r"^backbone\.pool='no' is out of range: expected true"):
        check_config(compose_train("backbone.pool=no"))


def test_settings_are_inherited_by_variants():
    assert set(MetaLSTM.settings) >= {"batch_norm_train", "batch_norm_test", "hidden_size"}
    assert MAMLPlusPlus.settings.items() >= MAML.settings.items()
