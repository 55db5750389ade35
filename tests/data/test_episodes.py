import pytest
import torch
from torch.utils.data import DataLoader

from fewshot.data.episodes import FixedEpisodes, MetaBatchStream, share
from tests.helpers import labelled_classes


def identities(x: torch.Tensor) -> list[tuple[int, int]]:
    """(class, index) of every image in a [..., 1, 2, 2] tensor."""
    flat = x.reshape(-1, 4)
    return [(int(c), int(i)) for c, i in flat[:, :2]]


@pytest.fixture
def classes():
    return labelled_classes()


def test_task_has_episode_shapes_and_balanced_labels(classes):
    task = FixedEpisodes(classes, "test", way=5, shot=3, query=4, count=1, seed=0)[0]
    assert task.support_x.shape == (15, 1, 2, 2) and task.query_x.shape == (20, 1, 2, 2)
    assert torch.bincount(task.support_y).tolist() == [3] * 5
    assert torch.bincount(task.query_y).tolist() == [4] * 5


def test_support_and_query_are_disjoint_and_each_label_is_one_class(classes):
    tasks = list(FixedEpisodes(classes, "test", 5, 2, 15, count=20, seed=1))
    assert len(tasks) == 20
    for task in tasks:
        support, query = identities(task.support_x), identities(task.query_x)
        assert not set(support) & set(query)
        assert len(set(support + query)) == len(support) + len(query)
        label_to_class = {}
        for (cls, _), y in zip(support + query, torch.cat([task.support_y, task.query_y])):
            assert label_to_class.setdefault(int(y), cls) == cls
        assert len(set(label_to_class.values())) == 5


def test_labels_are_assigned_to_classes_at_random(classes):
    first_classes = {
        identities(task.support_x)[0][0]
        for task in FixedEpisodes(classes, "test", 5, 1, 1, count=30, seed=0)
    }
    assert len(first_classes) > 3


def test_fixed_episodes_depend_only_on_seed_split_and_index(classes):
    a = FixedEpisodes(classes, "test", 5, 1, 15, count=10, seed=3)
    b = FixedEpisodes(classes, "test", 5, 1, 15, count=50, seed=3)
    for i in (0, 7, 9):
        assert all(torch.equal(x, y) for x, y in zip(a[i], b[i]))
    other_seed = FixedEpisodes(classes, "test", 5, 1, 15, count=10, seed=4)
    other_split = FixedEpisodes(classes, "val", 5, 1, 15, count=10, seed=3)
    assert not torch.equal(a[0].query_x, other_seed[0].query_x)
    assert not torch.equal(a[0].query_x, other_split[0].query_x)
    assert not torch.equal(a[0].query_x, a[1].query_x)
    with pytest.raises(IndexError):
        a[10]


def test_training_stream_resumes_at_a_step_with_the_same_batches(classes):
    stream = iter(MetaBatchStream(classes, 5, 1, 5, tasks=4, seed=0))
    batches = [next(stream) for _ in range(5)]
    assert batches[0].support_x.shape == (4, 5, 1, 2, 2)
    resumed = next(iter(MetaBatchStream(classes, 5, 1, 5, tasks=4, seed=0, start=3)))
    assert torch.equal(resumed.query_x, batches[3].query_x)
    assert not torch.equal(batches[0].query_x, batches[1].query_x)


def test_loader_workers_keep_the_single_process_order(classes):
    stream = MetaBatchStream(classes, 5, 1, 5, tasks=2, seed=0)
    single = [b.query_x for _, b in zip(range(6), DataLoader(stream, batch_size=None))]
    multi = [
        b.query_x for _, b in zip(range(6), DataLoader(stream, batch_size=None, num_workers=2))
    ]
    assert all(torch.equal(x, y) for x, y in zip(single, multi))


@pytest.mark.parametrize("processes", [2, 3])
def test_processes_sharing_a_meta_batch_train_on_the_one_process_tasks(classes, processes):
    tasks = 5  # uneven over 2 and 3 processes
    whole = MetaBatchStream(classes, 5, 1, 5, tasks=tasks, seed=0).batch(7)
    shares = [
        MetaBatchStream(classes, 5, 1, 5, tasks, seed=0, share=share(tasks, r, processes)).batch(7)
        for r in range(processes)
    ]
    assert sorted(len(s.query_x) for s in shares) == sorted(
        len(share(tasks, r, processes)) for r in range(processes)
    )
    assert torch.equal(torch.cat([s.query_x for s in shares]), whole.query_x)


def test_processes_sharing_fixed_episodes_score_each_once_in_order(classes):
    whole = FixedEpisodes(classes, "test", 5, 1, 5, count=7, seed=0)
    shares = [FixedEpisodes(classes, "test", 5, 1, 5, 7, 0, share=share(7, r, 3)) for r in range(3)]
    assert [len(s) for s in shares] == [2, 2, 3]
    scored = [e.query_x for s in shares for e in s]
    assert all(torch.equal(a, b.query_x) for a, b in zip(scored, whole, strict=True))
