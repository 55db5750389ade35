"""What the tests share that is not a fixture: builders of small learners, episodes and datasets in
the real formats, checkpoints and scripts run as a user runs them, SLURM and TensorBoard readers."""

import fcntl
import hashlib
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn

from fewshot.checkpoints.format import group_option
from fewshot.checkpoints.reading import load_checkpoint
from fewshot.config import learner_from
from fewshot.data.episodes import ClassImages, Episodes
from fewshot.methods import EpisodeResults, Learner, TaskLoop, run_tasks
from fewshot.methods.tasks import Backward, TaskScorer
from fewshot.models.conv4 import Conv4
from fewshot.models.functional import Statistics, Weights

REPO = Path(__file__).resolve().parents[1]


CONF = REPO / "conf"


# Checkpoints written by the code before the core redesign (tests/fixtures/make_reference.py).
OLD_CHECKPOINTS = REPO / "tests" / "fixtures" / "checkpoints"


OMNIGLOT = Path(os.environ.get("FEWSHOT_OMNIGLOT", REPO.parent / "shared" / "data" / "omniglot"))


# hydra/launcher=slurm on the CPU-only test cluster: no GPU, one of its 2 CPUs per job.
SLURM_LAUNCHER = [
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
]


def slurm(*command: str, check: bool = True) -> str:
    """Run a SLURM command; its stdout."""
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 or not check, proc.stderr
    return proc.stdout


def wait_for(condition, what: str | Callable[[], str], timeout: float = 300):
    """Poll `condition` until it returns something true; return that. `what` names the wait in
    the timeout's message (a callable: said as things stand at the timeout)."""
    deadline = time.monotonic() + timeout  # a guard against hanging, not a measurement
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


def job_state(job_id: str) -> dict[str, str]:
    """SLURM's record of a job (`scontrol show job`): field -> value, e.g. JobState, Restarts."""
    words = slurm("scontrol", "-o", "show", "job", job_id).split()
    return dict(w.split("=", 1) for w in words if "=" in w)


def submitted_job_id(sweep_dir: Path) -> str:
    """The SLURM id of a one-job sweep's job: a plain job (no array), its folder named by its id."""
    wait_for(lambda: (sweep_dir / ".submitit").is_dir(), "the sweep's submission")
    (job_id,) = [p.name for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()]
    return job_id


def ended(
    proc: subprocess.Popen,
    log: Path,
    sweep_dir: Path,
    timeout: float = 300,
    requeued: str | None = None,
) -> int:
    """Wait for a launched sweep; its exit status. `requeued`: the id of a job of it that SLURM
    requeues, which is started whenever it waits (start_requeued). If the sweep does not end,
    fail with what it and its SLURM jobs printed, and SLURM's record of them."""
    deadline = time.monotonic() + timeout  # a guard against hanging, not a measurement
    while proc.poll() is None and time.monotonic() < deadline:
        if requeued is not None:
            start_requeued(requeued)
        time.sleep(0.5)
    if proc.poll() is not None:
        return proc.returncode
    proc.kill()
    jobs = sorted((sweep_dir / ".submitit").glob("*/*_log.*"))
    ids = sorted({p.parent.name for p in jobs})
    states = [slurm("scontrol", "-o", "show", "job", i, check=False) for i in ids]
    told = [f"== {p}\n{p.read_text()[-3000:]}" for p in [log, *jobs]]
    raise AssertionError("\n".join([f"the sweep did not end in {timeout} s", *told, *states]))


def start_requeued(job_id: str) -> dict[str, str]:
    """If the job waits after a requeue, start it now; SLURM's record of it (job_state).

    SLURM holds a requeued job for about two minutes (BeginTime), set when the requeue
    completes, which can come after the job reads PENDING: so this is called for as long as
    the job is awaited. A job whose relaunch failed is held until released."""
    state = job_state(job_id)
    if state["JobState"] == "PENDING" and int(state.get("Restarts", 0)) > 0:
        if "held" in state.get("Reason", "").lower():  # e.g. launch_failed_requeued_held
            slurm("scontrol", "release", job_id, check=False)
        slurm("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
    return state


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for the run: tag -> [(step, value)] over all event files."""
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def checkpoint_step(path: Path) -> int | None:
    if not path.is_file():
        return None
    return load_checkpoint(path)[1]["global_step"]


def logged_past_checkpoint(run_dir: Path) -> int | None:
    """The step of last.ckpt once the run has logged a training step at or past it, else None."""
    step = checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
    logged = scalars(run_dir).get("train/loss", []) if step is not None else []
    return step if logged and max(s for s, _ in logged) >= step else None


def meta_gradients(last_ckpt: Path, processes: int) -> tuple[list, list, list]:
    """For the first meta-iteration of a run of `processes` processes: (the meta-gradient its
    optimiser was given, one process's over the whole meta-batch, the first process's share
    alone). After one Adam step, exp_avg = (1 - beta1) * the meta-gradient."""
    from fewshot.data.episodes import MetaBatchStream, share
    from fewshot.methods import plain_backward
    from fewshot.training.build import build_datamodule, build_module

    last = load_checkpoint(last_ckpt)[1]
    assert last["global_step"] == 1
    (state,) = last["optimizer_states"]
    (group,) = state["param_groups"]
    beta1 = group["betas"][0]
    run_grads = [state["state"][i]["exp_avg"] / (1 - beta1) for i in group["params"]]

    cfg = OmegaConf.create(last["fewshot_config"])
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # as train.py: the same init
    module = build_module(cfg)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    tasks = cfg.algo.meta_batch_size

    def grads_over(tasks_drawn: range | None) -> list[torch.Tensor]:
        stream = MetaBatchStream(
            datamodule.splits["train"],
            cfg.way,
            cfg.shot,
            cfg.query,
            tasks,
            cfg.seed,
            share=tasks_drawn,
        )
        batch = module.on_after_batch_transfer(stream.batch(0), 0)
        module.zero_grad()
        run_tasks(module.tasks, batch, training=True, backward=plain_backward)
        return [p.grad.clone() for p in module.learner.parameters()]

    return run_grads, grads_over(None), grads_over(share(tasks, 0, processes))


def labelled_classes(num_classes: int = 12, per_class: int = 20) -> ClassImages:
    """Images whose pixels spell out (class, index), so a test can tell which image it got."""
    images = torch.zeros(num_classes, per_class, 1, 2, 2, dtype=torch.uint8)
    images[:, :, 0, 0, 0] = torch.arange(num_classes)[:, None]
    images[:, :, 0, 0, 1] = torch.arange(per_class)[None, :]
    return ClassImages(images, [f"class{c}" for c in range(num_classes)])


class _Shell:
    """Unpickling it runs `command`: what a checkpoint holds that runs code when opened."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def checkpoint_that_runs_code(path: Path, marker: Path) -> Path:
    """A real fewshot checkpoint (an old one, tests/fixtures) with one entry more, whose
    unpickling creates `marker`: a load that runs code leaves the file behind."""
    checkpoint = torch.load(OLD_CHECKPOINTS / "maml.ckpt", map_location="cpu", weights_only=True)
    checkpoint["shared_by"] = _Shell(f"touch {marker}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under `folder`: relative path -> (modification time, SHA-256 of its bytes)."""
    return {
        str(path.relative_to(folder)): (
            path.stat().st_mtime_ns,
            hashlib.sha256(path.read_bytes()).hexdigest(),
        )
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def made_once(folder: Path, make: Callable[[Path], object]) -> Path:
    """`folder`, filled by `make(folder)` in the first process that asks for it; the others
    (pytest-xdist's workers) wait for it under a file lock and share it. A `make` that failed
    leaves no folder behind to share: the next process to ask tries again."""
    done = folder.with_name(f"{folder.name}.done")
    with open(folder.with_name(f"{folder.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            make(folder)
            done.touch()
    return folder


def run_script(script: str, *overrides: str, expect_ok: bool = True):
    """Run train.py or evaluate.py as a user does; fail showing its stderr unless `expect_ok` is False."""
    proc = subprocess.run(
        [sys.executable, script, *overrides],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def start_script(script: str, *overrides: str, log: Path) -> subprocess.Popen:
    """Start train.py or evaluate.py as a user does, its stdout and stderr into `log`."""
    with open(log, "w") as out:  # the child keeps its own copy of the file
        return subprocess.Popen(
            [sys.executable, script, *overrides],
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def run_sweep_with_failures(sweep_dir: Path, quick_overrides: list[str]):
    """Jobs 0 and 1 ask for a TPU (there is none) and fail; jobs 2 and 3 train on the CPU."""
    return run_script(
        "train.py",
        "-m",
        *quick_overrides,
        "trainer.accelerator=tpu,cpu",
        "algo.meta_lr=1e-3,1e-4",
        f"hydra.sweep.dir={sweep_dir}",
        expect_ok=False,
    )


def make_miniimagenet(
    root: Path, layout: str, classes=(4, 2, 2), per_class: int = 20, size: int = 16
) -> Path:
    """A small Mini-ImageNet in `layout` 'folders' ({train,val,test}/<wnid>/*.jpg) or 'csv'
    (images/*.jpg + {train,val,test}.csv). Class c of the whole set is tinted by colour c % 3
    (0 red, 1 green, 2 blue) and the same seed gives byte-identical JPEGs in both layouts."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    c = 0
    for split, count in zip(("train", "val", "test"), classes):
        rows = ["filename,label"]
        for _ in range(count):
            wnid = f"n{c:08d}"
            for i in range(per_class):
                pixels = torch.randint(0, 60, (size, size, 3), generator=g, dtype=torch.uint8)
                pixels[..., c % 3] += 180
                name = f"{wnid}{i + 1:08d}.jpg"
                folder = root / "images" if layout == "csv" else root / split / wnid
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.numpy()).save(folder / name, quality=95)
                rows.append(f"{name},{wnid}")
            c += 1
        if layout == "csv":
            (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def conv_episode(
    way: int = 3, shot: int = 2, query: int = 4, tasks: int = 2, channels: int = 1, size: int = 12
) -> Episodes:
    """A meta-batch of random images in [0, 1] (grey 12x12 by default) with balanced labels
    0..way-1."""
    torch.manual_seed(0)
    x = torch.rand(tasks, way * (shot + query), channels, size, size)
    labels = torch.arange(way)
    return Episodes(
        x[:, : way * shot],
        labels.repeat_interleave(shot).expand(tasks, -1),
        x[:, way * shot :],
        labels.repeat_interleave(query).expand(tasks, -1),
    )


def compose_train(*overrides: str):
    """train.py's config, composed as Hydra composes it for these command-line overrides."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def make_learner(name: str, backbone: nn.Module, **settings) -> Learner:
    """A learner as train.py builds it from conf/algo/<name>.yaml, with `settings` changed."""
    algo = OmegaConf.merge(group_option("algo", name), settings)
    return learner_from(algo, backbone)


def small_backbone(image_size: int = 12, classes: int = 3) -> Conv4:
    return Conv4(1, image_size, classes, channels=4, padding=1, stride=1, pool=True, blocks=2)


TRANSDUCTIVE = {"batch_norm_train": "transductive", "batch_norm_test": "transductive"}


# Per learner: small settings, and how many weights its `adapt` yields at evaluation.
SMALL = {
    "maml": ({"base_lr": 0.5, "inner_steps": 2, "inner_steps_test": 3}, 1 + 3),
    "metalstm": ({"inner_epochs": 2, "inner_batch_size": 4}, 1 + 2 * 2),  # 6 support images
    "metasgd": ({"base_lr": 0.5, "inner_steps": 2, "inner_steps_test": 3}, 1 + 3),
    "anil": ({"base_lr": 0.5, "inner_steps": 2, "inner_steps_test": 3}, 1 + 3),
    "mamlpp": (
        {"base_lr": 0.5, "inner_steps": 2, "inner_steps_test": 3, "msl_iterations": 5},
        1 + 3,
    ),
}


LEARNER_NAMES = list(SMALL)


def small(name: str, **settings) -> tuple[Learner, int]:
    """A small learner on 12 px images, and the number of weights its `adapt` yields at
    evaluation."""
    torch.manual_seed(0)
    defaults, yields = SMALL[name]
    return make_learner(name, small_backbone(), **{**defaults, **TRANSDUCTIVE, **settings}), yields


def meta_batch(
    learner: Learner | TaskScorer,
    batch: Episodes,
    training: bool,
    track_steps: bool = False,
    backward: Backward | None = None,
    iteration: int = 0,
) -> EpisodeResults:
    """`run_tasks` on a learner (in a loop) or a task scorer."""
    tasks = learner if isinstance(learner, TaskScorer) else TaskLoop(learner)
    return run_tasks(tasks, batch, training, track_steps, backward, iteration)


class FunctionalLinear(nn.Linear):
    """A linear backbone without batch norm, for meta-gradients derived by hand."""

    def forward_with(
        self, weights: Weights, x: Tensor, statistics: Statistics | None = None
    ) -> Tensor:
        return F.linear(x, weights["weight"], weights.get("bias"))

    def embed_with(
        self, weights: Weights, x: Tensor, statistics: Statistics | None = None
    ) -> Tensor:
        return x  # the layer is all head

    def statistics(self, weights: Weights, x: Tensor) -> Statistics:
        return {}


class _Python2Pickler(pickle._Pickler):
    """Pickles as Python 2 wrote them: bytes and str as Python 2 `str` (BINSTRING), which
    Python 3 reads back only with encoding="latin1" (MetaOptNet's, CIFAR's, tiered's files)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def python2_pickle(obj, path: Path) -> Path:
    with open(path, "wb") as f:
        _Python2Pickler(f, protocol=2).dump(obj)
    return path


def mini_arrays(classes=(4, 2, 2), per_class: int = 5, size: int = 84, seed: int = 0) -> dict:
    """split -> wnid -> uint8 [per_class, size, size, 3]: a small Mini-ImageNet as arrays, class
    c of the whole set tinted in channel c % 3 (as make_miniimagenet's JPEGs are)."""
    g = torch.Generator().manual_seed(seed)
    splits, c = {}, 0
    for split, count in zip(("train", "val", "test"), classes):
        splits[split] = {}
        for _ in range(count):
            pixels = torch.randint(
                0, 60, (per_class, size, size, 3), generator=g, dtype=torch.uint8
            )
            pixels[..., c % 3] += 180
            splits[split][f"n{c:08d}"] = pixels.numpy()
            c += 1
    return splits


def write_mini_layout(root: Path, layout: str, arrays: dict) -> Path:
    """`arrays` (from mini_arrays) in `layout`: 'cache' / 'cache-validation' (the
    mini-imagenet-cache pickles), 'metaoptnet' (Python 2 pickles), or 'png' class folders."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    label = 0
    for split, classes in arrays.items():
        if layout == "png":
            for wnid, images in classes.items():
                (root / split / wnid).mkdir(parents=True)
                for i, image in enumerate(images):
                    Image.fromarray(image).save(root / split / wnid / f"{wnid}{i + 1:08d}.png")
            continue
        images = np.concatenate(list(classes.values()))
        if layout.startswith("cache"):
            name = "validation" if split == "val" and layout == "cache-validation" else split
            counts = np.cumsum([0] + [len(v) for v in classes.values()])
            class_dict = {w: list(range(a, b)) for w, a, b in zip(classes, counts, counts[1:])}
            with open(root / f"mini-imagenet-cache-{name}.pkl", "wb") as f:
                pickle.dump({"image_data": images, "class_dict": class_dict}, f, protocol=4)
        else:
            name = "train_phase_train" if split == "train" else split
            labels = [label + i for i, v in enumerate(classes.values()) for _ in range(len(v))]
            catname2label = {w: label + i for i, w in enumerate(classes)}
            label += len(classes)
            python2_pickle(
                {"data": images, "labels": labels, "catname2label": catname2label},
                root / f"miniImageNet_category_split_{name}.pickle",
            )
    return root


def make_tiered(root: Path, classes=(3, 2, 2), per_class: int = 4, size: int = 84) -> Path:
    """A small tieredImageNet release: {split}_images_png.pkl (a list of PNG bytes as
    cv2.imencode gives them, uint8 [K, 1]) and {split}_labels.pkl, as Python 2 pickles.
    Class c has per_class + c % 2 images (tiered's classes are unequal), category c // 2."""
    import io

    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    c = 0
    for split, count in zip(("train", "val", "test"), classes):
        pngs, specific, general = [], [], []
        for k in range(count):
            for _ in range(per_class + c % 2):
                pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
                pngs.append(np.frombuffer(buffer.getvalue(), np.uint8).reshape(-1, 1))
                specific.append(k)
                general.append(k // 2)
            c += 1
        labels = {
            "label_specific": np.array(specific),
            "label_general": np.array(general),
            "label_specific_str": [f"n{split}{k:05d}" for k in range(count)],
            "label_general_str": [f"{split}_category{k}" for k in range((count + 1) // 2)],
        }
        python2_pickle(pngs, root / f"{split}_images_png.pkl")
        python2_pickle(labels, root / f"{split}_labels.pkl")
    return root


# CIFAR-100's superclasses (coarse_label_names, in order) and their classes.
CIFAR100_SUPERCLASSES = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}


def make_cifar100(root: Path, train: int = 2, test: int = 1) -> Path:
    """cifar-100-python.tar.gz as the official one is laid out (Python 2 pickles train, test,
    meta), with `train` + `test` images per class; pixel [0, 0, 0] of an image is its class."""
    import tarfile

    fine_names = sorted(n for names in CIFAR100_SUPERCLASSES.values() for n in names)
    coarse_names = list(CIFAR100_SUPERCLASSES)
    coarse_of = {
        n: coarse_names.index(s) for s, names in CIFAR100_SUPERCLASSES.items() for n in names
    }
    g = torch.Generator().manual_seed(0)
    members = {}
    for part, count in (("train", train), ("test", test)):
        fine = [c for _ in range(count) for c in range(100)]
        data = torch.randint(0, 256, (len(fine), 3072), generator=g, dtype=torch.uint8).numpy()
        data[:, 0] = fine
        members[part] = {
            "data": data,
            "fine_labels": fine,
            "coarse_labels": [coarse_of[fine_names[c]] for c in fine],
            "filenames": [f"{part}_{i}.png" for i in range(len(fine))],
            "batch_label": f"{part} batch",
        }
    members["meta"] = {"fine_label_names": fine_names, "coarse_label_names": coarse_names}
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
        for name, obj in members.items():
            python2_pickle(obj, root / name)
            tar.add(root / name, arcname=f"cifar-100-python/{name}")
            (root / name).unlink()
    return root


def linear_task(seed: int = 0):
    """A 2-class task on 3 features: support 6, query 8 (x float32, y int64)."""
    g = torch.Generator().manual_seed(seed)
    sx, qx = torch.randn(6, 3, generator=g), torch.randn(8, 3, generator=g)
    sy, qy = torch.randint(0, 2, (6,), generator=g), torch.randint(0, 2, (8,), generator=g)
    return sx, sy, qx, qy


def cross_entropy_grad_and_hessian(W, x, y):
    """Gradient and Hessian of mean cross-entropy of logits x W^T w.r.t. W (row-major), by hand:
    grad = (p - onehot)^T x / n,  H = sum_i kron(diag(p_i) - p_i p_i^T, x_i x_i^T) / n."""
    p = torch.softmax(x @ W.T, dim=1)
    grad = (p - F.one_hot(y, W.shape[0]).double()).T @ x / len(x)
    hessian = sum(
        torch.kron(torch.diag(pi) - torch.outer(pi, pi), torch.outer(xi, xi))
        for pi, xi in zip(p, x)
    )
    return grad, hessian / len(x)


# The GPU path (#18): tests marked `gpu` run on CUDA and skip elsewhere; most are the same test
# body run on every device of DEVICES, so the CPU run exercises the code path in CI.
NO_CUDA = "no CUDA device here (torch.cuda.is_available() is false): pytest -m gpu on a GPU"


ON_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]


DEVICES = ["cpu", pytest.param("cuda", marks=ON_CUDA)]


def random_classes(num_classes: int, per_class: int = 8, size: int = 12, seed: int = 0):
    """Random uint8 grey images [num_classes, per_class, 1, size, size] as a class split."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_classes, per_class, 1, size, size), generator=g)
    return ClassImages(images.to(torch.uint8), [f"class{c}" for c in range(num_classes)])


def small_datamodule(on_device: bool | str = False, meta_batch_size: int = 2):
    """An EpisodeDataModule of 3-way 2-shot 2-query tasks on random 12 px images (for
    small_backbone), 2 validation and 2 test episodes, no files read."""
    from fewshot.data.datamodule import EpisodeDataModule

    data = OmegaConf.create({"workers": 0, "on_device": on_device})
    datamodule = EpisodeDataModule(data, 3, 2, 2, meta_batch_size, 2, 2, seed=0)
    datamodule.splits = {
        "train": random_classes(10, seed=1),
        "val": random_classes(6, seed=2),
        "test": random_classes(6, seed=3),
    }
    return datamodule


def small_module(name: str, batching: str = "loop", compiled: bool = False, **settings):
    """An EpisodicModule on a small learner (see `small`), meta_lr 1e-3, no clipping."""
    from fewshot.methods import task_scorer
    from fewshot.training.module import EpisodicModule

    learner, _ = small(name, **settings)
    return EpisodicModule(learner, task_scorer(learner, batching, compiled), 1e-3, None, {})


def small_trainer(accelerator: str, max_steps: int = 3, **options) -> pl.Trainer:
    """A Trainer as train.py's (manual steps, validation by step count, the divergence guard)
    without files: validates every 2 steps."""
    from fewshot.training.divergence import StopOnNonFinite

    settings = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        val_check_interval=2,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=max_steps,
        check_val_every_n_epoch=None,
        inference_mode=False,
        callbacks=[StopOnNonFinite("lower algo.meta_lr")],
        **{**settings, **options},
    )
