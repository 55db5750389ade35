#!/usr/bin/env bash
# One GPU session (#18) in one call of the device tool, whose minutes are few:
#   bash bench/gpu_session.sh prepare   # here, with the package registries: wheels and Omniglot
#   bash bench/gpu_session.sh run       # there: the gpu tests, the bench on cuda, then MAML
#                                       # Omniglot 5w1s meta-iterations for the time left
# The GPU machine has torch, Lightning and tensorboard but not Hydra, and reaches no network:
# `prepare` puts Hydra's wheels in .whl/ and the Omniglot zips in data/omniglot/ (both ignored
# by git), which the device call carries (carry: [".whl", "data"]). Logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."

prepare() {
    rm -rf .whl && mkdir -p .whl data/omniglot
    python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 -d .whl \
        hydra-core==1.3.2 omegaconf==2.3.0
    python -m pip wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3  # no wheel on PyPI
    cp ../shared/data/omniglot/images_*.zip data/omniglot/
    du -sh .whl data
}

run() {
    local out=${OUT:-/tmp/gpu_session} end=$((SECONDS + ${BUDGET_S:-540}))
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"
    # The files that hold gpu tests: collecting the others would import the sweep extras.
    timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider $(grep -rlE "cuda_device|DEVICES" tests --include="test_*.py") 2>&1 | tee "$out/pytest_gpu.log"
    timeout 240 python3 -m bench.speed --device cuda --iters 5 --rounds 1 --memory-steps 2>&1 | tee "$out/bench_cuda.log"
    local left=$((end - SECONDS - 20))
    if ((left > 30)); then
        # As many meta-iterations of the paper preset as fit; Lightning's bar shows it/s.
        timeout "$left" python3 train.py experiment=maml_omniglot_5w1s data.root=data/omniglot \
            trainer.enable_progress_bar=false trainer.log_every_n_steps=10 \
            hydra.run.dir=/tmp/gpu_run 2>&1 | tee "$out/train.log"
        python3 - "$out" <<'EOF'
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

events = EventAccumulator("/tmp/gpu_run/tensorboard")
events.Reload()
loss = events.Scalars("train/loss")
if len(loss) > 1:
    rate = (loss[-1].wall_time - loss[0].wall_time) / (loss[-1].step - loss[0].step)
    line = f"maml_omniglot_5w1s: {rate:.3f} s/meta-iteration over steps {loss[0].step}-{loss[-1].step}"
else:
    line = "maml_omniglot_5w1s: fewer than two logged steps"
print(line)
(Path(sys.argv[1]) / "train_rate.txt").write_text(line + "\n")
EOF
    fi
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash bench/gpu_session.sh prepare|run" >&2; exit 2 ;;
esac
