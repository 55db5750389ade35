"""The console: Lightning's known noise silenced by name, every other message left alone."""

import logging
import warnings

from fewshot.training.build import build_trainer
from fewshot.training.console import KNOWN_WARNINGS, quiet_lightning
from tests.helpers import compose_train


def test_lightnings_tip_and_known_warnings_are_silenced_and_nothing_else(caplog, tmp_path):
    quiet_lightning()
    with caplog.at_level(logging.INFO):
        build_trainer(compose_train("trainer.enable_progress_bar=false"), tmp_path)
    assert "Tip:" not in caplog.text
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_lightning()  # after catch_warnings reset the filters, as at start-up
        for message, category in KNOWN_WARNINGS:
            warnings.warn(message.replace("\\", "") + " and so on", category, stacklevel=1)
        warnings.warn("a warning of the user's own", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a warning of the user's own"]
