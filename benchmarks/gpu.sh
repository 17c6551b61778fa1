#!/usr/bin/env bash
# The GPU column of benchmarks/README.md, in one go, on a machine with a CUDA GPU and the project
# installed (`make install`; Fashion-MNIST where the prepare stage finds it, or BENCH_FASHION_MNIST=<dir>):
#
#   bash benchmarks/gpu.sh            # about 5 minutes on one H100/H200-class GPU
#
# 1. engine overhead with ray.use_gpu (1 GPU worker) vs a bare loop on the same GPU;
# 2. PGD-20 throughput on cuda: project vs torchattacks, plus bf16 autocast and torch.compile variants,
#    small CNN and PreAct ResNet-18.
# Results land in benchmarks/results/*_cuda.json; the last line is a JSON summary.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -m benchmarks --only attack engine --device cuda --threads "${BENCH_THREADS:-4}"
