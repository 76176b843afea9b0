#!/usr/bin/env bash
# The whole command of each part-carrying device call (benchmarks/gpu/README.md): which parts of the GPU run's
# payload are on the device machine so far, each checked against its sha256.
cd "$(dirname "${BASH_SOURCE[0]}")/../.." && exec "${PYTHON:-python3}" benchmarks/gpu/pack.py check --gpu-dir "${GPU_DIR:-.gpu}"
