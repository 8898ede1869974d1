#!/usr/bin/env bash
# The GPU checks in one command, for a lent GPU machine (see bench/README.md, "GPU"):
# the gpu-marked tests, then the anchor benchmark (cpu.py tracin on ResNet-9). Results go to $OUT (or ./gpu-out).
# Peers travel as wheels in .whl/ (captum, dattri: pip download them here first).
set -uo pipefail
out="${OUT:-gpu-out}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"
python3 bench/cpu.py tracin --workloads resnet9 --device cuda --repeats 5 --max-wait 5 \
    --libraries datatrace,datatrace-tf32,datatrace-bf16,captum,dattri,vmap \
    --json "$out/results_gpu.json" 2>&1 | grep -v "it/s" | tee "$out/bench_gpu.log"
