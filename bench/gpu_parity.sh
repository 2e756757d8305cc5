#!/usr/bin/env bash
# On the GPU machine, after bench/device_setup.sh: the engine-core parity and batch-invariance
# tests on CUDA (fp32), in graph mode and with Inductor, plus every test marked gpu.
export COMPILED_SERVE_TEST_DEVICE=cuda PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -p no:cacheprovider -m heavy tests/engine/test_engine_hf_parity.py tests/engine/test_batch_invariance.py 2>&1 | tee "$OUT/gpu_parity_graph.log" | tail -5
COMPILED_SERVE_TEST_COMPILE_MODE=inductor python3 -m pytest -q -p no:cacheprovider -m heavy tests/engine/test_engine_hf_parity.py -k llama 2>&1 | tee "$OUT/gpu_parity_inductor.log" | tail -5
python3 -m pytest -q -p no:cacheprovider -m gpu tests --ignore=tests/server 2>&1 | tee "$OUT/gpu_marked.log" | tail -5
