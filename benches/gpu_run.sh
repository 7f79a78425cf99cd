#!/usr/bin/env bash
# Runs benches/gpu_check.py on a GPU machine without internet, from files
# carried in .gpu/: the abi3 eplb-xfer wheel, nixl-cu13 unpacked (nixl.tgz,
# without nixl_ep) and a numpy wheel (used only if numpy is missing).
# Results go to $OUT (or /tmp) as gpu.json. Usage: bash benches/gpu_run.sh [gpu_check args]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
X=$(mktemp -d)
python3 -m zipfile -e .gpu/eplb_xfer-*.whl "$X/wheel"
mkdir -p "$X/nixl" && tar xzf .gpu/nixl.tgz -C "$X/nixl"
if ! python3 -c "import numpy" 2>/dev/null; then
    python3 -m zipfile -e .gpu/numpy-*.whl "$X/numpy"
    export PYTHONPATH="$X/numpy"
fi
export PYTHONPATH="$X/wheel:$X/nixl${PYTHONPATH:+:$PYTHONPATH}"
export EPLB_XFER_NIXL_LIB="$X/nixl/.nixl_cu13.mesonpy.libs/libnixl_capi.so"
export UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y UCX_WARN_UNUSED_ENV_VARS=n
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
python3 -c "import torch, eplb_xfer; print('torch', torch.__version__, 'eplb_xfer', eplb_xfer.__file__)"
python3 benches/gpu_check.py --out "$OUT/gpu.json" "$@"
