"""Data pickles are read as data: a pickle that would run code is refused before it runs."""

import os
import pickle

import numpy as np
import pytest

from fewshot.data.pickles import load_pickle
from fewshot.errors import DataError
from tests.helpers import python2_pickle


class CreatesAFile:
    """Unpickling this with pickle.load would call os.system and create `target`."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    target = tmp_path / "created-by-the-pickle"
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    path.write_bytes(pickle.dumps({"image_data": CreatesAFile(target)}))
    with pytest.raises(DataError, match=r"mini-imagenet-cache-train.pkl names posix.system"):
        load_pickle(path)
    assert not target.exists()
    pickle.loads(path.read_bytes())  # the file is a real exploit: an ordinary load runs it
    assert target.exists()


def test_numpy_arrays_load_from_python_3_and_python_2_pickles(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for protocol in (2, 4, 5):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps({"data": array, "labels": [1, np.int64(2)]}, protocol))
        loaded = load_pickle(path)
        assert np.array_equal(loaded["data"], array) and loaded["labels"] == [1, 2]
    loaded = load_pickle(python2_pickle({"data": array, "name": "n01"}, tmp_path / "py2.pkl"))
    assert np.array_equal(loaded["data"], array) and loaded["name"] == "n01"


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"<!DOCTYPE html><html><body>Quota exceeded</body></html>", "is an HTML page"),
        (pickle.dumps({"data": np.zeros((64, 64), np.uint8)})[:2000], "is truncated"),
        (b"PK\x03\x04 a zip, say", "is not a readable pickle"),
    ],
    ids=["html", "truncated", "zip"],
)
def test_a_file_that_is_not_a_whole_pickle_is_named_in_one_line(tmp_path, content, reason):
    path = tmp_path / "train_labels.pkl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"train_labels.pkl {reason}") as error:
        load_pickle(path)
    assert "\n" not in str(error.value)
